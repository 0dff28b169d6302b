#!/usr/bin/env python3
"""Extract per-utterance speaker embeddings: every audio file below DB_PATH (.wav, .flac, .m4a, .mp3,
.ogg, .opus) becomes a float32 (num_eval, D) .npy at the same relative path below EMBED_DIR, whatever
its suffix (VoxCeleb2's .m4a tree and VoxCeleb1's .wav tree give the same layout).

Beside the embeddings it keeps `utt2dur` (Kaldi's format: `<utt> <seconds>`, the length of the audio
each embedding saw) and `manifest.json` (extractor, weights file and its sha256, crop settings, mixed
precision, the project's commit). --max_seconds S embeds only the first S seconds of each file (short
test sets).

Safe to interrupt and re-run: each file is written atomically as soon as it is computed, files that
already exist are skipped (unless --overwrite), a tree made with other settings is refused (unless
--overwrite), and nothing is ever deleted.

An audio file that cannot be read (not audio, empty, no samples, silent) is logged with its reason
and skipped; the others are embedded, `failed_audio.txt` in EMBED_DIR lists the failed ones, and the
run ends with an error (exit status 2). A re-run tries only the files without an embedding, and
removes that list (its own file) when every file has one."""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime
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

from m_utils import (
    HARDWARE_OPTIONS,
    DistContext,
    Option,
    Options,
    UserError,
    add_options,
    bf16_is_native,
    check_options,
    clear_leftovers,
    fault_point,
    launch,
    resolve_device,
    run_lock,
    run_main,
    save_npy_atomic,
    setup_logging,
    write_text_atomic,
)
from models.m_Extractors import DEFAULT_EXTRACTOR, EXTRACTORS, extractor_entry, load_extractor, weights_path
from models.m_Features import HOP, SAMPLE_RATE
from stores.keys import AUDIO_SUFFIXES, read_manifest, read_utt2dur

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

# Written beside the embeddings (formats in the module's docstring and the README).
UTT2DUR = "utt2dur"
MANIFEST = "manifest.json"
# The audio files the last run could not read, one path a line (their reasons are in its log);
# removed by a run that reads them all.
FAILED_LIST = "failed_audio.txt"
# Manifest fields that make embeddings incomparable: a tree is never extended with other values.
SAME_SETTINGS = ("extractor", "checkpoint_sha256", "eval_frames", "num_eval", "max_seconds")
# The names this script writes (their temporaries are a killed run's leftovers).
WRITTEN_NAMES = rf"[^/]+\.npy|{UTT2DUR}|{re.escape(MANIFEST)}|{re.escape(FAILED_LIST)}"
REPO = Path(__file__).resolve().parent

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
        found += [
            Path(folder, name).relative_to(root) for name in files if name.lower().endswith(AUDIO_SUFFIXES)
        ]
    return sorted(found, key=Path.as_posix)


def output_path(embed_dir: Path, rel: Path) -> Path:
    return embed_dir / rel.with_suffix(".npy")


def utt_key(rel: Path) -> str:
    """The store key of an audio file: its path below the tree, forward slashes, suffix removed."""
    return rel.with_suffix("").as_posix()


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


class FailedFiles(UserError):
    """Audio files that could not be read: every other file was embedded, and FAILED_LIST names them."""


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
        joined = fifo.read() if fifo.samples else None
        if joined is None:
            raise AudioError("no samples")
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


def max_samples(max_seconds: float | None) -> int | None:
    """The 16 kHz samples --max_seconds keeps of each file (at least one); None keeps all."""
    return None if max_seconds is None else max(1, round(max_seconds * SAMPLE_RATE))


def audio_seconds(path: Path) -> float:
    """The length of an audio file in seconds: from its header where it declares one (soundfile's frame
    count; the stream duration of an mp4, as decode_compressed cuts to it), else from decoding it."""
    try:
        if path.suffix.lower() in SOUNDFILE_SUFFIXES:
            info = soundfile.info(path)
            if info.frames > 0:
                return info.frames / info.samplerate
        else:
            with av.open(str(path)) as container:
                declared = declared_samples(container.streams.audio[0]) if container.streams.audio else None
                if declared:
                    return declared / container.streams.audio[0].codec_context.sample_rate
    except (RuntimeError, OSError, ValueError, av.FFmpegError):
        pass  # decoding says what is wrong
    audio, _ = read_audio(path)
    return len(audio) / SAMPLE_RATE


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
    return np.stack([audio[start : start + crop] for start in starts]).astype(np.float32)


@dataclass
class Item:
    """One decoded file: its (num_eval, samples) float32 crops and the seconds of audio they were taken
    from, or why it failed. The crops are a tensor so that a DataLoader worker hands them over in shared
    memory instead of a pickled copy."""

    index: int
    crops: torch.Tensor | None = None
    error: str | None = None
    source_rate: int = SAMPLE_RATE
    seconds: float = 0.0


class CropDataset(Dataset):
    """Decodes and crops audio files (in DataLoader workers); with `keep` only the first `keep` samples
    of each file are cropped."""

    def __init__(self, paths: list[Path], eval_frames: int, num_eval: int, keep: int | None = None):
        self.paths, self.eval_frames, self.num_eval, self.keep = paths, eval_frames, num_eval, keep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        try:
            audio, rate = read_audio(self.paths[index])
        except AudioError as err:
            return Item(index, error=str(err))
        if self.keep is not None:
            audio = audio[: self.keep]
        crops = torch.from_numpy(make_crops(audio, self.eval_frames, self.num_eval))
        return Item(index, crops, source_rate=rate, seconds=len(audio) / SAMPLE_RATE)


# ----------------------------------------------------------------------------------------------
# Durations and manifest beside the embeddings


def utt2dur_text(durations: dict[str, float]) -> str:
    """Kaldi's utt2dur: one `<utt> <seconds>` line per utterance, sorted by utt, seconds to 1 ms."""
    return "".join(f"{utt} {durations[utt]:.3f}\n" for utt in sorted(durations))


def update_utt2dur(embed_dir: Path, known: dict[str, float], new: dict[str, float]) -> None:
    """Write `known` (the file's entries) updated with `new`, where that changes the file."""
    path = embed_dir / UTT2DUR
    merged = {**known, **new}
    text = utt2dur_text(merged)
    if merged and (not path.exists() or path.read_text() != text):
        write_text_atomic(path, text)


def skipped_durations(
    job: Job, skipped: list[Path], known: dict[str, float], show: bool = True
) -> dict[str, float]:
    """Durations of files embedded by an earlier run that utt2dur lacks (a run from before utt2dur, or
    one that was interrupted), from their headers or decoded; a file that cannot be read gets none.
    `show`: a progress bar."""
    missing = [rel for rel in skipped if utt_key(rel) not in known]
    if missing:
        log.info(
            "reading the durations of %d file(s) embedded earlier and missing from %s",
            len(missing),
            job.embed_dir / UTT2DUR,
        )
    keep = max_samples(job.max_seconds)
    limit = math.inf if keep is None else keep / SAMPLE_RATE
    durations = {}
    for rel in tqdm(missing, unit="file", disable=not show or not missing, dynamic_ncols=True):
        try:
            durations[utt_key(rel)] = min(audio_seconds(job.db_path / rel), limit)
        except AudioError as err:
            log.warning("%s: no duration for %s (%s)", job.db_path / rel, UTT2DUR, err)
    return durations


def gather_on_main(ctx: DistContext, entries: dict[str, Any]) -> dict[str, Any]:
    """Every rank's entries (durations, failures) on rank 0 (others get theirs back); a process outside
    a group keeps its own."""
    if not (ctx.distributed and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return entries
    parts: list[Any] = [None] * ctx.world_size
    torch.distributed.gather_object(entries, parts if ctx.is_main else None, dst=0)
    return {key: value for part in parts for key, value in part.items()} if ctx.is_main else entries


def update_failed_list(embed_dir: Path, failures: dict[str, str]) -> None:
    """Write FAILED_LIST with the paths of `failures` (path -> reason), where that changes it; with
    none, remove the list an earlier run wrote."""
    path = embed_dir / FAILED_LIST
    if failures:
        text = "".join(f"{failed}\n" for failed in sorted(failures))
        if not path.exists() or path.read_text() != text:
            write_text_atomic(path, text)
    elif path.is_file():
        path.unlink()
        log.info("%s: removed, every file it listed is embedded now", path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(root: Path = REPO) -> str | None:
    """The commit checked out in `root` (`git rev-parse HEAD`); None where git is not installed or
    `root` is not a git checkout (a folder inside another checkout is not one)."""
    if not (root / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit) else None


def make_manifest(args: argparse.Namespace, checkpoint: Path | None) -> dict[str, Any]:
    """What made the embeddings of this run (`args.mixedprec`: what runs, after the CPU check)."""
    return {
        "extractor": args.model,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint),
        "eval_frames": args.eval_frames,
        "num_eval": args.num_eval,
        "sample_rate": SAMPLE_RATE,
        "max_seconds": args.max_seconds,
        "mixedprec": args.mixedprec,
        "git_commit": git_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def check_manifest(embed_dir: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """A tree whose manifest names other settings (SAME_SETTINGS) is not extended: that would mix
    embeddings made two ways. With `overwrite` every file is recomputed and the run goes on."""
    path = embed_dir / MANIFEST
    existing = read_manifest(path)
    if existing is None:
        return
    differ = [
        f"{key} {existing.get(key)!r} (this run: {manifest[key]!r})"
        for key in SAME_SETTINGS
        if existing.get(key) != manifest[key]
    ]
    if differ and not overwrite:
        raise UserError(
            f"{path}: the embeddings in {embed_dir} were made with other settings: "
            f"{'; '.join(differ)}. Use another --embed_dir, or --overwrite to recompute them all"
        )
    if differ:
        log.warning("%s: other settings (%s); --overwrite recomputes every file", path, "; ".join(differ))
    elif not overwrite:
        for key in ("mixedprec", "git_commit"):
            if existing.get(key) != manifest[key]:
                log.info(
                    "%s: %s %r, this run %r; the manifest keeps the run that began the tree",
                    path,
                    key,
                    existing.get(key),
                    manifest[key],
                )


def write_manifest(embed_dir: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """The manifest records the run that began the tree, or with `overwrite` the one that remakes it
    (check_manifest has seen that a kept one agrees with this run); one that differs only in its time
    is kept."""
    path = embed_dir / MANIFEST
    existing = read_manifest(path)
    unchanged = existing is not None and dict(existing, created=None) == dict(manifest, created=None)
    if (existing is not None and not overwrite) or unchanged:
        return
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True, kw_only=True)
class Job:
    """What every process needs to know; the fields named like options take their values."""

    db_path: Path
    embed_dir: Path
    files: tuple[Path, ...]
    eval_frames: int
    num_eval: int
    batch_size: int = 0
    nDataLoaderThread: int | None = None
    device: str = "auto"
    overwrite: bool = False
    mixedprec: bool = False
    max_seconds: float | None = None
    manifest: dict[str, Any] | None = None  # written by rank 0 before it starts (None: not written)

    @classmethod
    def from_options(
        cls, args: argparse.Namespace, files: list[Path], manifest: dict[str, Any] | None = None
    ) -> Job:
        """The job of the parsed options `args` (each field from the option of its name)."""
        values = {field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)}
        return cls(
            **{
                **values,
                "db_path": Path(args.db_path),
                "embed_dir": Path(args.embed_dir),
                "files": tuple(files),
                "manifest": manifest,
            }
        )


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
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def batch_size_for(
    requested: int, device: torch.device, eval_frames: int, num_eval: int, mixedprec: bool = False
) -> int:
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


def embed_batch(
    model: nn.Module, items: list[Item], device: torch.device, mixedprec: bool = False
) -> np.ndarray:
    """All crops of `items` in one forward pass -> (len(items), num_eval, D) float32; with `mixedprec`
    under bfloat16 autocast (the extractors keep their front ends, and GE2E its LSTM, in float32)."""
    crops = torch.cat([item.crops for item in items]).to(device)  # type: ignore[misc]  # decoded items only
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
    number of unreadable files to the shared counter `failed_total` (a multiprocessing Value). Rank 0
    writes the manifest first, and utt2dur and FAILED_LIST last, with every rank's durations and
    failures."""
    setup_logging()
    if ctx.is_main and job.manifest is not None:
        write_manifest(job.embed_dir, job.manifest, job.overwrite)
    shard = job.files[ctx.rank :: ctx.world_size]
    todo = [rel for rel in shard if job.overwrite or not output_path(job.embed_dir, rel).exists()]
    who = f"rank {ctx.rank}/{ctx.world_size}: " if ctx.distributed else ""
    log.info(
        "%s%d file(s), %d already done, %d to extract", who, len(shard), len(shard) - len(todo), len(todo)
    )
    started = time.perf_counter()
    durations, failures = embed_files(ctx, job, model, todo)
    elapsed = time.perf_counter() - started
    log.info(
        "%swrote %d embedding file(s) in %.1f s (%.2f utt/s), skipped %d already present, %d failed",
        who,
        len(durations),
        elapsed,
        len(durations) / max(elapsed, 1e-9),
        len(shard) - len(todo),
        len(failures),
    )
    for failed, reason in failures.items():
        log.error("failed: %s: %s", failed, reason)
    with failed_total.get_lock():
        failed_total.value += len(failures)
    known = read_utt2dur(job.embed_dir / UTT2DUR) or {}
    done = set(todo)
    durations.update(skipped_durations(job, [rel for rel in shard if rel not in done], known, ctx.is_main))
    durations = gather_on_main(ctx, durations)
    failures = gather_on_main(ctx, failures)
    if ctx.is_main:
        update_utt2dur(job.embed_dir, known, durations)
        update_failed_list(job.embed_dir, failures)


def embed_files(
    ctx: DistContext, job: Job, model: nn.Module, todo: list[Path]
) -> tuple[dict[str, float], dict[str, str]]:
    """Embed and write the files `todo`: the seconds of audio each written embedding saw (by utt key),
    and why each file that could not be read failed (by its path)."""
    device = resolve_device(job.device, ctx.local_rank)
    prepare_device(device)
    if device.type == "cpu" and ctx.distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    model = model.to(device).eval()
    batch_size = batch_size_for(job.batch_size, device, job.eval_frames, job.num_eval, job.mixedprec)
    dataset = CropDataset(
        [job.db_path / rel for rel in todo], job.eval_frames, job.num_eval, max_samples(job.max_seconds)
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=list,
        num_workers=workers_for(job.nDataLoaderThread, device, ctx.world_size),
    )
    durations: dict[str, float] = {}
    failures: dict[str, str] = {}
    rates_seen = {SAMPLE_RATE}
    with (
        torch.inference_mode(),
        tqdm(total=len(todo), unit="utt", disable=not ctx.is_main or not todo, dynamic_ncols=True) as bar,
    ):
        for batch in loader:
            good = [item for item in batch if item.error is None]
            for item in batch:
                if item.error is not None:
                    failures[str(job.db_path / todo[item.index])] = item.error
                    log.warning("skipped %s: %s", job.db_path / todo[item.index], item.error)
                elif item.source_rate not in rates_seen:
                    rates_seen.add(item.source_rate)
                    log.info(
                        "resampling %d Hz audio to %d Hz (first: %s)",
                        item.source_rate,
                        SAMPLE_RATE,
                        todo[item.index],
                    )
            if good:
                embeddings = embed_batch(model, good, device, job.mixedprec)
                for item, embedding in zip(good, embeddings, strict=True):
                    save_npy_atomic(output_path(job.embed_dir, todo[item.index]), embedding)
                    fault_point("gen_embs.file")
                    durations[utt_key(todo[item.index])] = item.seconds
            bar.update(len(batch))
    return durations, failures


# ----------------------------------------------------------------------------------------------
# Command line


OPTIONS: Options = {
    "db_path": Option(DB_PATH, str, "audio tree (default %(default)s)"),
    "embed_dir": Option(
        EMBED_DIR, str, "embedding tree, with utt2dur and manifest.json (default %(default)s)"
    ),
    "model": Option(
        DEFAULT_EXTRACTOR, str, f"extractor: {', '.join(sorted(EXTRACTORS))} (default %(default)s)"
    ),
    "initial_model": Option(
        None, str, "weights file (e.g. baseline_v2_ap.model); default: the extractor's own"
    ),
    "random_init": Option(False, bool, "untrained weights (for tests)"),
    "eval_frames": Option(400, int, "crop length in 10 ms frames", bounds=(1, None)),
    "num_eval": Option(10, int, "crops (embeddings) per utterance", bounds=(1, None)),
    "max_seconds": Option(
        None, float, "embed only the first this many seconds of each file (short test sets)"
    ),
    "batch_size": Option(0, int, "utterances per forward pass; 0: chosen for the device", bounds=(0, None)),
    "nDataLoaderThread": Option(
        None,
        int,
        f"audio decoding worker processes (default: {CPU_WORKERS} on a CPU; on "
        f"a GPU machine its cores less one, at most {MAX_CUDA_WORKERS})",
        bounds=(0, None),
    ),
    "overwrite": Option(False, bool, "recompute files that already exist, whatever settings made them"),
    **HARDWARE_OPTIONS,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_options(parser, OPTIONS)
    args = parser.parse_args(argv)
    check_options(args, OPTIONS)
    extractor_entry(args.model, "--model")
    # the one bound above a value (0) rather than from it
    if args.max_seconds is not None and not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        raise UserError(f"--max_seconds must be a number of seconds above 0, got {args.max_seconds}")
    return args


def mixed_precision(asked: bool, device: torch.device) -> bool:
    """Whether --mixedprec runs bfloat16 autocast on `device`: only where bfloat16 is fast (a GPU, a
    CPU with bfloat16 instructions); elsewhere it says once that float32 runs instead."""
    if not asked or device.type != "cpu":
        return asked
    if bf16_is_native(device):
        log.info("--mixedprec on a CPU: bfloat16 autocast (this CPU has bfloat16 instructions)")
        return True
    log.info(
        "--mixedprec: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), where bfloat16 is "
        "emulated and many times slower; running float32"
    )
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    db_path, embed_dir = Path(args.db_path), Path(args.embed_dir)
    if not db_path.is_dir():
        raise UserError(f"{db_path}: audio folder not found (set DB_PATH or --db_path)")
    args.mixedprec = mixed_precision(args.mixedprec, resolve_device(args.device))
    checkpoint = weights_path(args.model, args.initial_model, args.random_init)
    model = load_extractor(args.model, args.initial_model, args.random_init, device="cpu")
    files = find_audio(db_path)
    if not files:
        raise UserError(f"{db_path}: no audio files ({', '.join(AUDIO_SUFFIXES)}) below it")
    check_unique_outputs(files)
    first = "" if args.max_seconds is None else f", the first {args.max_seconds:g} s of each file"
    log.info(
        "%s: %d audio file(s) -> %s, extractor %s (%d-dim), %d crop(s) of %d frames%s",
        db_path,
        len(files),
        embed_dir,
        args.model,
        model.embed_dim,
        args.num_eval,
        args.eval_frames,
        first,
    )
    job = Job.from_options(args, files, make_manifest(args, checkpoint))
    failed_total = torch.multiprocessing.get_context("spawn").Value("i", 0)
    try:
        embed_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{embed_dir}: cannot create the embedding folder ({err.strerror})") from None
    with run_lock(embed_dir, "embed_dir"):  # one extraction at a time writes into embed_dir
        check_tree(job)
        folders = {embed_dir} | {output_path(embed_dir, rel).parent for rel in files}
        clear_leftovers(sorted(folders), WRITTEN_NAMES, embed_dir)
        launch(
            extract,
            (job, model, failed_total),
            distributed=args.distributed,
            device=args.device,
            nprocs=args.nprocs,
            port=args.port,
        )
    if failed_total.value:
        raise FailedFiles(
            f"{failed_total.value} audio file(s) could not be read (the log above says why) "
            f"and have no embedding; {embed_dir / FAILED_LIST} lists them. Every other file "
            "is embedded: a run after they are fixed or removed embeds only them"
        )
    return 0


def check_tree(job: Job) -> None:
    """Before any work: the embedding tree's manifest agrees with this run and its utt2dur is readable.
    A tree with embeddings and no manifest (made before manifests) is assumed to share these settings."""
    if job.manifest is not None:
        check_manifest(job.embed_dir, job.manifest, job.overwrite)
    read_utt2dur(job.embed_dir / UTT2DUR)
    if (
        not (job.embed_dir / MANIFEST).exists()
        and not job.overwrite
        and any(output_path(job.embed_dir, rel).exists() for rel in job.files)
    ):
        log.warning(
            "%s: embeddings made before manifests are kept; %s records this run's settings, which "
            "they are assumed to share (--overwrite recomputes them)",
            job.embed_dir,
            MANIFEST,
        )


if __name__ == "__main__":
    run_main(main)
