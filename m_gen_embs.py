#!/usr/bin/env python3
"""Extract per-utterance speaker embeddings: every audio file below DB_PATH (.wav, .flac, .m4a, .mp3,
.ogg, .opus) becomes a float32 (num_eval, D) .npy at the same relative path below EMBED_DIR, whatever
its suffix (VoxCeleb2's .m4a tree and VoxCeleb1's .wav tree give the same layout).

Safe to interrupt and re-run: each file is written atomically as soon as it is computed, files that
already exist are skipped (unless --overwrite), and nothing is ever deleted."""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile
import torch
from scipy.signal import resample_poly
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from m_DataLoader import AUDIO_SUFFIXES
from m_utils import (
    HARDWARE_OPTIONS,
    DistContext,
    UserError,
    add_options,
    bf16_is_native,
    launch,
    resolve_device,
    run_lock,
    run_main,
    save_npy_atomic,
    setup_logging,
)
from models.m_Extractors import DEFAULT_EXTRACTOR, EXTRACTORS, load_extractor
from models.m_Features import HOP, SAMPLE_RATE

DB_PATH = "data/voxceleb1"
EMBED_DIR = "data/embeddings/voxceleb1"

# Utterances per forward pass when --batch_size is left at 0 (tests/BENCHMARK.md has the figures).
# On a CPU both extractors already run near the cores' arithmetic peak with one utterance of
# 10 x 400 frames, and larger passes only spill the caches. A GPU needs many utterances a pass.
CPU_FRAMES_PER_PASS = 6400
CUDA_UTTERANCES_PER_PASS = 16
# With --mixedprec (bfloat16) a pass costs less memory and time, and a larger one pays.
CUDA_BF16_UTTERANCES_PER_PASS = 64
# Decoding workers when --nDataLoaderThread is not given. On a CPU they share the cores with the
# extractor, which needs them more; on a GPU machine the cores have nothing else to do, and AAC
# (.m4a) decodes about ten times slower than .wav is read, so each process gets its share of them.
CPU_WORKERS = 4
MAX_CUDA_WORKERS = 16

# Read with soundfile; every other suffix of AUDIO_SUFFIXES is decoded with PyAV (FFmpeg's libraries).
SOUNDFILE_SUFFIXES = (".wav", ".flac")

log = logging.getLogger("m_gen_embs")


# ----------------------------------------------------------------------------------------------
# Files


def find_audio(root: Path) -> list[Path]:
    """Paths (relative to `root`) of every audio file (AUDIO_SUFFIXES, any case), following links,
    sorted."""
    found, visited = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        found += [Path(folder, name).relative_to(root) for name in files
                  if name.lower().endswith(AUDIO_SUFFIXES)]
    return sorted(found, key=Path.as_posix)


def output_path(embed_dir: Path, rel: Path) -> Path:
    return embed_dir / rel.with_suffix(".npy")


def check_unique_outputs(files: list[Path]) -> None:
    """Two audio files that would write the same .npy (e.g. a.wav and a.flac) are an error."""
    seen: dict[Path, Path] = {}
    for rel in files:
        target = rel.with_suffix(".npy")
        if target in seen:
            raise UserError(f"{seen[target]} and {rel} would both be written to {target}; rename one")
        seen[target] = rel


# ----------------------------------------------------------------------------------------------
# Audio and crops


class AudioError(Exception):
    """An audio file that cannot be used; it is reported and skipped."""


def read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    """A .wav/.flac file's (samples, channels) float64 samples and rate."""
    try:
        return soundfile.read(path, dtype="float64", always_2d=True)
    except Exception as err:
        raise AudioError(f"cannot decode: {err}") from err


def decode_compressed(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 samples and rate of the first audio stream of an .m4a (AAC), .mp3,
    .ogg or .opus file, decoded with PyAV on one thread (the DataLoader's workers give the parallelism).

    FFmpeg's decoder drops the priming samples the file declares, as the `ffmpeg` program does (an
    mp4's edit list: FFmpeg's AAC encoder writes 1024 of them; the LAME header of an mp3; Opus'
    pre-skip). The padding that fills the last codec frame is cut here, where the container declares
    the stream's duration (an mp4 does) and the decoder gives less than one frame more than it."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError("no audio stream")
            stream = container.streams.audio[0]
            stream.codec_context.thread_count = 1
            as_float = av.AudioResampler(format="fltp")  # planar float32; rate and channels kept
            fifo, last_frame = av.AudioFifo(), 0  # one array at the end costs less than one a frame
            for frame in chain(container.decode(stream), [None]):  # None: flush the resampler
                for planar in as_float.resample(frame):
                    planar.pts = None  # the fifo refuses a gap between timestamps; the samples are good
                    fifo.write(planar)
                    last_frame = planar.samples
            declared = declared_samples(stream)
        if not fifo.samples:
            raise AudioError("no samples")
        joined = fifo.read()
    except (av.FFmpegError, ValueError) as err:  # ValueError: a stream whose format changes midway
        raise AudioError(f"cannot decode: {err}") from err
    samples = joined.to_ndarray()
    if declared is not None and 0 < samples.shape[1] - declared < last_frame:
        samples = samples[:, :declared]
    return samples.T, joined.sample_rate


def declared_samples(stream: av.AudioStream) -> int | None:
    """The stream's duration in samples as its container declares it, None where it declares none."""
    if stream.duration is None or stream.time_base is None or not stream.codec_context.sample_rate:
        return None
    return round(stream.duration * stream.time_base * stream.codec_context.sample_rate)


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono 16 kHz float64 samples (channels averaged, other rates resampled) and the file's rate."""
    read = read_soundfile if path.suffix.lower() in SOUNDFILE_SUFFIXES else decode_compressed
    data, rate = read(path)
    if data.size == 0:
        raise AudioError("no samples")
    audio = data.mean(axis=1, dtype=np.float64)
    if not np.isfinite(audio).all():
        raise AudioError("non-finite samples")
    if not audio.any():
        raise AudioError("silent (every sample is zero)")
    if rate != SAMPLE_RATE:
        common = math.gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // common, rate // common)
    return audio, rate


def crop_length(eval_frames: int) -> int:
    return eval_frames * HOP + 240


def crop_starts(n_samples: int, crop: int, num_eval: int) -> np.ndarray:
    """Evenly spaced integer starts from 0 to n_samples - crop (truncated, as the original repository)."""
    return np.linspace(0, n_samples - crop, num=num_eval).astype(np.int64)


def make_crops(audio: np.ndarray, eval_frames: int, num_eval: int) -> np.ndarray:
    """(num_eval, crop) float32 crops; audio not longer than a crop is first extended by wrapping."""
    crop = crop_length(eval_frames)
    if len(audio) <= crop:
        audio = np.pad(audio, (0, crop - len(audio) + 1), mode="wrap")
    starts = crop_starts(len(audio), crop, num_eval)
    return np.stack([audio[start:start + crop] for start in starts]).astype(np.float32)


@dataclass
class Item:
    """One decoded file: its (num_eval, samples) float32 crops, or why it failed. The crops are a
    tensor so that a DataLoader worker hands them over in shared memory instead of a pickled copy."""

    index: int
    crops: torch.Tensor | None = None
    error: str | None = None
    source_rate: int = SAMPLE_RATE


class CropDataset(Dataset):
    """Decodes and crops audio files (in DataLoader workers)."""

    def __init__(self, paths: list[Path], eval_frames: int, num_eval: int):
        self.paths, self.eval_frames, self.num_eval = paths, eval_frames, num_eval

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        try:
            audio, rate = read_audio(self.paths[index])
        except AudioError as err:
            return Item(index, error=str(err))
        crops = torch.from_numpy(make_crops(audio, self.eval_frames, self.num_eval))
        return Item(index, crops, source_rate=rate)


# ----------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class Job:
    """What every process needs to know."""

    db_path: Path
    embed_dir: Path
    files: tuple[Path, ...]
    eval_frames: int
    num_eval: int
    batch_size: int
    workers: int | None
    device: str
    overwrite: bool
    mixedprec: bool = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep freed memory there.

    By default each allocation over 128 KB (up to 32 MB as it adapts) is fresh memory from the
    kernel, paid with a page fault per 4 KB on first touch, a large share of a ResNetSE34V2 pass's
    time. With this setting the next pass reuses the memory of the last one (the process keeps its
    peak size).
    Returns False, changing nothing, where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def batch_size_for(requested: int, device: torch.device, eval_frames: int, num_eval: int,
                   mixedprec: bool = False) -> int:
    """Utterances per forward pass: --batch_size, or where it is 0 the measured best for the device."""
    if requested:
        return requested
    if device.type == "cuda":
        return CUDA_BF16_UTTERANCES_PER_PASS if mixedprec else CUDA_UTTERANCES_PER_PASS
    return max(1, CPU_FRAMES_PER_PASS // (eval_frames * num_eval))


def workers_for(requested: int | None, device: torch.device, world_size: int = 1) -> int:
    """Decoding workers of one process: --nDataLoaderThread, else CPU_WORKERS on a CPU and on a GPU
    machine its share of the cores less one for the process itself (at most MAX_CUDA_WORKERS)."""
    if requested is not None:
        return requested
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(MAX_CUDA_WORKERS, cores // world_size - 1))
    return min(CPU_WORKERS, cores)


def embed_batch(model: nn.Module, items: list[Item], device: torch.device,
                mixedprec: bool = False) -> np.ndarray:
    """All crops of `items` in one forward pass -> (len(items), num_eval, D) float32; with `mixedprec`
    under bfloat16 autocast (the extractors keep their front ends, and GE2E its LSTM, in float32)."""
    crops = torch.cat([item.crops for item in items]).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixedprec):
        embeddings = model(crops)
    return embeddings.float().cpu().numpy().reshape(len(items), -1, model.embed_dim)


def prepare_device(device: torch.device) -> None:
    """This process's settings for extraction on `device`."""
    if device.type == "cuda":
        # Every pass but the last has the same shapes: cuDNN's autotuned kernels pay off.
        torch.backends.cudnn.benchmark = True
    else:
        keep_freed_memory()


def extract(ctx: DistContext, job: Job, model: nn.Module, failed_total: Any) -> None:
    """Embed this rank's share of the files (every world_size-th), skipping finished ones; adds its
    number of unreadable files to the shared counter `failed_total` (a multiprocessing Value)."""
    setup_logging()
    shard = job.files[ctx.rank::ctx.world_size]
    todo = [rel for rel in shard if job.overwrite or not output_path(job.embed_dir, rel).exists()]
    who = f"rank {ctx.rank}/{ctx.world_size}: " if ctx.distributed else ""
    log.info("%s%d file(s), %d already done, %d to extract", who, len(shard), len(shard) - len(todo),
             len(todo))
    device = resolve_device(job.device, ctx.local_rank)
    prepare_device(device)
    if device.type == "cpu" and ctx.distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    model = model.to(device).eval()
    batch_size = batch_size_for(job.batch_size, device, job.eval_frames, job.num_eval, job.mixedprec)
    loader = DataLoader(CropDataset([job.db_path / rel for rel in todo], job.eval_frames, job.num_eval),
                        batch_size=batch_size, num_workers=workers_for(job.workers, device, ctx.world_size),
                        collate_fn=list)
    failures: list[str] = []
    rates_seen = {SAMPLE_RATE}
    written, started = 0, time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(todo), unit="utt", disable=not ctx.is_main or not todo,
                                      dynamic_ncols=True) as bar:
        for batch in loader:
            good = [item for item in batch if item.error is None]
            for item in batch:
                if item.error is not None:
                    failures.append(f"{job.db_path / todo[item.index]}: {item.error}")
                    log.warning("skipped %s", failures[-1])
                elif item.source_rate not in rates_seen:
                    rates_seen.add(item.source_rate)
                    log.info("resampling %d Hz audio to %d Hz (first: %s)", item.source_rate, SAMPLE_RATE,
                             todo[item.index])
            if good:
                embeddings = embed_batch(model, good, device, job.mixedprec)
                for item, embedding in zip(good, embeddings, strict=True):
                    save_npy_atomic(output_path(job.embed_dir, todo[item.index]), embedding)
                written += len(good)
            bar.update(len(batch))
    elapsed = time.perf_counter() - started
    log.info("%swrote %d embedding file(s) in %.1f s (%.2f utt/s), skipped %d already present, %d failed",
             who, written, elapsed, written / max(elapsed, 1e-9), len(shard) - len(todo), len(failures))
    for failure in failures:
        log.error("failed: %s", failure)
    with failed_total.get_lock():
        failed_total.value += len(failures)


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db_path", default=DB_PATH, help="audio tree (default %(default)s)")
    parser.add_argument("--embed_dir", default=EMBED_DIR, help="embedding tree (default %(default)s)")
    parser.add_argument("--model", default=DEFAULT_EXTRACTOR,
                        help=f"extractor: {', '.join(sorted(EXTRACTORS))} (default %(default)s)")
    parser.add_argument("--initial_model", default=None, help="weights file (e.g. baseline_v2_ap.model)")
    parser.add_argument("--eval_frames", type=int, default=400, help="crop length in 10 ms frames")
    parser.add_argument("--num_eval", type=int, default=10, help="crops (embeddings) per utterance")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="utterances per forward pass; 0 (default): chosen for the device")
    parser.add_argument("--nDataLoaderThread", type=int, default=None,
                        help=f"audio decoding worker processes (default: {CPU_WORKERS} on a CPU; on a GPU "
                             f"machine its cores less one, at most {MAX_CUDA_WORKERS})")
    parser.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    parser.add_argument("--random_init", action="store_true", help="untrained weights (for tests)")
    add_options(parser, HARDWARE_OPTIONS)
    args = parser.parse_args(argv)
    for name in ("eval_frames", "num_eval", "nprocs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("batch_size", "nDataLoaderThread"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    return args


def mixed_precision(asked: bool, device: torch.device) -> bool:
    """Whether --mixedprec runs bfloat16 autocast on `device`: only where bfloat16 is fast (a GPU, a
    CPU with bfloat16 instructions); elsewhere it says once that float32 runs instead."""
    if not asked or device.type != "cpu":
        return asked
    if bf16_is_native(device):
        log.info("--mixedprec on a CPU: bfloat16 autocast (this CPU has bfloat16 instructions)")
        return True
    log.info("--mixedprec: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), where bfloat16 is "
             "emulated and many times slower; running float32")
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    db_path, embed_dir = Path(args.db_path), Path(args.embed_dir)
    if not db_path.is_dir():
        raise UserError(f"{db_path}: audio folder not found (set DB_PATH or --db_path)")
    args.mixedprec = mixed_precision(args.mixedprec, resolve_device(args.device))
    model = load_extractor(args.model, args.initial_model, args.random_init, device="cpu")
    files = find_audio(db_path)
    if not files:
        raise UserError(f"{db_path}: no audio files ({', '.join(AUDIO_SUFFIXES)}) below it")
    check_unique_outputs(files)
    log.info("%s: %d audio file(s) -> %s, extractor %s (%d-dim), %d crop(s) of %d frames", db_path,
             len(files), embed_dir, args.model, model.embed_dim, args.num_eval, args.eval_frames)
    job = Job(db_path, embed_dir, tuple(files), args.eval_frames, args.num_eval, args.batch_size,
              args.nDataLoaderThread, args.device, args.overwrite, args.mixedprec)
    failed_total = torch.multiprocessing.get_context("spawn").Value("i", 0)
    try:
        embed_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{embed_dir}: cannot create the embedding folder ({err.strerror})") from None
    with run_lock(embed_dir, "embed_dir"):  # one extraction at a time writes into embed_dir
        launch(extract, (job, model, failed_total), distributed=args.distributed, device=args.device,
               nprocs=args.nprocs, port=args.port)
    if failed_total.value:
        log.error("%d file(s) could not be read and have no embedding", failed_total.value)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
