#!/usr/bin/env python3
"""Speed and memory benchmark (issue 6): the data path, training, scoring and extraction.

    python tests/bench.py --out bench_out                  # realistic default size (make bench)
    python tests/bench.py --out /tmp/b --utterances 300 --speakers 10 --dim 32 ...   # toy size
    python tests/bench.py --out /tmp/b --stages decode_wav decode_m4a --audio_files 200  # some stages

Builds a synthetic embedding tree `<spk>/<session>/<nnnnn>.npy` with its speaker files and lists
under OUT/data (once; a re-run of the same size reuses it), then runs every stage in its own forked
process, so that each stage's peak memory is its own. A stage times the project's way (the project's
own code) and, in the same process, a baseline on the same files: a re-creation of how the original
repository did the same work (one file per sample, a per-trial loop, one utterance a pass). The audio
stages compare formats instead: decoding .wav and .m4a files of the same audio, and m_gen_embs' whole
path on each. Prints one table, writes it as a JSON list of records, and prints the JSON path last.

The scale stages of issue 19 have data of their own (every size a --vox2_* / --blink_* flag):
pack_vox2 and store_open a VoxCeleb2-shaped tree (1,092,009 files of (10, 256), 5,994 speakers,
145,000 videos: 12.5 GiB, written once by --vox2_processes processes), train_vox2_steps a
VoxBlink2-sized float16 store (9,904,382 x 256, 5 GB) and a 100,000-row one, written block by block.

A stage is one row of STAGES (a Stage: name, unit, runner, the data it needs, its goals, bf16) plus
its runner, a function (args, tree, meter) -> StageResult. A goal is a RatioGoal (project/baseline,
per device), a StepTimeGoal (an epoch against its arithmetic limit), a GrowthGoal (a step against the
same step from a smaller store) or a MemoryGoal (a factor, MEMORY_FACTOR unless given, x a sum of
MemoryBudget's sizes; a new size is one field of MemoryBudget).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from functools import partial
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from audio_files import write_encoded
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from m_comb_embs import THREADS, combine, speaker_embeddings
from m_DataLoader import (
    Batch,
    EmbeddingData,
    Sampling,
    TrialSet,
    load_embeddings,
    load_speaker_embeddings,
    read_list,
)
from m_gen_embs import (
    Item,
    Job,
    batch_size_for,
    embed_batch,
    extract,
    find_audio,
    make_crops,
    prepare_device,
    read_audio,
    workers_for,
)
from m_gen_list import make_lists
from m_network import SpeakerNet, Trainer, clear_gradients
from m_utils import DistContext, Option, Options, add_options, bf16_is_native, resolve_device
from models.GE2E import packaged_weights
from models.m_Extractors import load_extractor
from models.m_Features import SAMPLE_RATE
from models.m_Models import get_model
from scoring.backends import make_backend
from scoring.metrics import compute_eer, evaluate_scores, score_trials
from stores.arrays import EMBEDDING_TYPES
from stores.fresh import check_store
from stores.open import forget_freshness, tree_hash_of
from stores.packed import is_packed_store
from stores.stamps import TREE_STORE, store_path_of, tree_sources
from stores.write import StoreBuilder

RECORD_KEYS = ("name", "project_per_s", "baseline_per_s", "ratio", "peak_rss_mb")
COMPUTE_KEY = "compute_only_per_s"
GPU_KEY = "peak_gpu_mb"
PEAK_KEY = "bf16_peak_fraction"  # ResNetSE34V2's FLOP rate over the card's dense bfloat16 peak
# Dense bfloat16 tensor-core peak in TFLOP/s by a fragment of the CUDA device's name (first match).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0))
# The m4a stage runs ResNetSE34V2 on at most this many files of each format on a CPU (about 0.3 s an
# utterance there); on a GPU on all --audio_files.
CPU_EXTRACT_FILES = 32
TRAIN_SLACK = 1.15
GPU_TRAIN_SLACK = 1.10  # an epoch on a GPU (set for the chunked batch path, since removed: to re-measure)
MEMORY_FACTOR = 1.5
MODEL = "MyLinearNetv2"
STEP_MODEL = "MyResidualNet"  # train_vox2_steps: the model of the VoxCeleb2 training run
STORE_OPEN_FACTOR = 1.2  # store_open: peak RSS within 1.2x the (N, D) float32 matrix
STEP_GROWTH = 1.15  # train_vox2_steps: a step from the VoxBlink2-sized store within 1.15x the small one's
STEP_RSS_BYTES = 8e9  # train_vox2_steps: peak RSS under 8 GB
EMBEDDING_TYPE = {"normal": "B", "distribution": "C"}  # multiple_embedding_flag of each list's runs
LIST_NAME = "bench"
SEED = 10
VOX1_SPEAKERS = 1251  # VoxCeleb1's speakers, whose utterances the VoxCeleb1-E list pairs
VOX1E_TYPE = "B"  # scored by L2 distance, as the score stage (type C would copy the table to normalise it)
ASNORM_TOPK = 300
VIDEO_ID = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"))
MB = 2 ** 20


# ----------------------------------------------------------------------------------------------
# The synthetic tree


@dataclass(frozen=True)
class Tree:
    """Where one size of synthetic data lives under OUT/data."""

    root: Path

    @property
    def embed_dir(self) -> Path:
        return self.root / "embeddings"

    def list_path(self, kind: str) -> Path:
        return self.root / "lists" / f"{LIST_NAME}_{kind}_list.txt"


def shape_of(args: argparse.Namespace) -> dict[str, int]:
    return {key: getattr(args, key) for key in ("utterances", "speakers", "sessions", "crops", "dim")}


def written_once(root: Path, shape: dict, what: str, write: Callable[[], None]) -> None:
    """The bench's data of `shape` under `root`, made by `write` unless a complete one is there (its
    `.complete` marker, written last, names the shape)."""
    marker = root / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        say(f"reusing {what} {root}")
        return
    write()
    marker.write_text(json.dumps(shape))


def ensure_tree(args: argparse.Namespace) -> Tree:
    """The tree of this size, written unless a complete one is already there."""
    shape = shape_of(args)
    tree = Tree(Path(args.out) / "data" / "_".join(f"{key}{value}" for key, value in shape.items()))

    def write() -> None:
        say(f"writing a synthetic tree of {args.utterances} utterances ({args.crops}, {args.dim}) "
            f"under {tree.root} (once)")
        write_embeddings(tree.embed_dir, args)
        make_lists(tree.embed_dir, LIST_NAME, tree.root / "lists", SEED, kinds=("normal", "distribution"))

    written_once(tree.root, shape, "the synthetic tree", write)
    return tree


def write_embeddings(embed_dir: Path, args: argparse.Namespace) -> None:
    """Utterance files (speaker + session offset + noise, per crop) and each speaker's B and C files."""
    rng = np.random.default_rng(SEED)
    counts = np.diff(np.linspace(0, args.utterances, args.speakers + 1).astype(np.int64))
    for index, count in enumerate(tqdm(counts, desc="speakers", unit="spk", leave=False)):
        name = f"id{10000 + index:05d}"
        session = np.arange(count) * args.sessions // count
        offsets = rng.standard_normal((args.sessions, args.dim))
        block = (rng.standard_normal(args.dim) + offsets[session][:, None]
                 + rng.standard_normal((count, args.crops, args.dim))).astype(np.float32)
        for u in range(count):
            first = int(np.searchsorted(session, session[u]))
            path = embed_dir / name / f"sess{session[u]:07d}" / f"{u - first + 1:05d}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, block[u])
        for kind, embedding in speaker_embeddings(block.astype(np.float64).mean(axis=1)).items():
            np.save(embed_dir / EMBEDDING_TYPES[kind].speaker_file.format(name), embedding)


def synthetic_audio(count: int, seconds: float) -> list[np.ndarray]:
    """`count` waveforms of three random tones plus a little noise, 16 kHz float64."""
    rng = np.random.default_rng(SEED)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return [0.1 * np.sin(2 * np.pi * rng.uniform(100, 3000, (3, 1)) * t).sum(axis=0)
            + 0.02 * rng.standard_normal(len(t)) for _ in range(count)]


def ensure_audio_trees(args: argparse.Namespace) -> dict[str, Path]:
    """--audio_files files of each format, <spk>/<video>/<nnnnn>.wav and .m4a, links to the
    --audio_utterances synthetic utterances (written once per size; the page cache holds them either
    way, and the links cost no disk); suffix -> the tree's root."""
    size = f"{args.audio_files}x{args.audio_utterances}x{args.audio_seconds:g}s"
    root = Path(args.out) / "data" / f"audio_{size}"
    trees = {suffix: root / suffix.lstrip(".") for suffix in (".wav", ".m4a")}
    marker = root / ".complete"
    if marker.is_file():
        return trees
    sources = root / "sources"
    for index, audio in enumerate(synthetic_audio(args.audio_utterances, args.audio_seconds)):
        sources.mkdir(parents=True, exist_ok=True)
        soundfile.write(sources / f"{index}.wav", audio, SAMPLE_RATE)
        write_encoded(sources / f"{index}.m4a", audio, SAMPLE_RATE)
    for suffix, tree in trees.items():
        for index in range(args.audio_files):
            speaker, video = f"id{10000 + index // 20:05d}", f"video{index // 5 % 4}"
            path = tree / speaker / video / f"{index + 1:05d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # left by an interrupted run
            path.symlink_to((sources / f"{index % args.audio_utterances}{suffix}").resolve())
    marker.touch()
    return trees


def make_trials(speaker: np.ndarray, count: int, rng: np.random.Generator,
                every_utterance: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trials alternately of the same speaker (another utterance) and of a random utterance; the
    enrolment (left) utterances at random, or with `every_utterance` each in turn, in random order."""
    order = np.argsort(speaker, kind="stable")
    sizes = np.bincount(speaker)
    starts = np.cumsum(sizes) - sizes
    position = np.empty(len(speaker), np.int64)
    position[order] = np.arange(len(speaker)) - starts[speaker[order]]
    left = (rng.permutation(np.arange(count) % len(speaker)) if every_utterance
            else rng.integers(len(speaker), size=count))
    own = speaker[left]
    shift = rng.integers(1, np.maximum(sizes[own], 2))
    same = order[starts[own] + (position[left] + shift) % sizes[own]]
    right = np.where(np.arange(count) % 2 == 0, same, rng.integers(len(speaker), size=count))
    return left, right, (speaker[left] == speaker[right]).astype(np.int8)


@dataclass(frozen=True)
class Vox1e:
    """A VoxCeleb1-E-sized trial list and the (utterances, D) float32 matrix of the files it names
    (rows in the order of the sorted paths, as TrialSet wants them), under OUT/data."""

    root: Path

    @property
    def list_path(self) -> Path:
        return self.root / "vox1e_test_list.txt"

    @property
    def matrix_path(self) -> Path:
        return self.root / "embeddings.npy"


def vox1e_of(args: argparse.Namespace) -> Vox1e:
    size = f"u{args.vox1e_utterances}_t{args.vox1e_trials}_dim{args.dim}"
    return Vox1e(Path(args.out) / "data" / f"vox1e_{size}")


def vox1e_speakers(utterances: int) -> int:
    return min(VOX1_SPEAKERS, utterances // 2)


def ensure_vox1e(args: argparse.Namespace) -> Vox1e:
    """The VoxCeleb1-E-sized data, written unless complete: paths of the official form
    (`id10270/x6uYqmx31kE/00001.wav`), speakers' utterances in videos of up to 8, embeddings a
    speaker centre plus noise, L2-normalised. Each utterance enrols in about trials/utterances trials."""
    data = vox1e_of(args)
    marker = data.root / ".complete"
    if marker.is_file():
        say(f"reusing the VoxCeleb1-E-sized data {data.root}")
        return data
    say(f"writing a trial list of {args.vox1e_trials} lines over {args.vox1e_utterances} utterances "
        f"under {data.root} (once)")
    rng = np.random.default_rng(SEED)
    speakers = vox1e_speakers(args.vox1e_utterances)
    counts = np.diff(np.linspace(0, args.vox1e_utterances, speakers + 1).astype(np.int64))
    videos = (counts + 7) // 8
    video_ids = ["".join(chars) for chars in VIDEO_ID[rng.integers(len(VIDEO_ID), size=(videos.sum(), 11))]]
    first_video = np.cumsum(videos) - videos
    # Sorted as TrialSet orders its rows; the speaker's id leads, so each speaker's rows stay together.
    names = sorted(f"id{10270 + index:05d}/{video_ids[first_video[index] + u // 8]}/{u % 8 + 1:05d}.wav"
                   for index, count in enumerate(counts) for u in range(count))
    speaker = np.repeat(np.arange(speakers), counts)
    left, right, labels = make_trials(speaker, args.vox1e_trials, rng, every_utterance=True)
    data.root.mkdir(parents=True, exist_ok=True)
    with open(data.list_path, "w") as file:
        file.writelines(f"{label} {names[i]} {names[j]}\n"
                        for label, i, j in zip(labels, left, right, strict=True))
    matrix = rng.standard_normal((len(names), args.dim), dtype=np.float32)
    centres = rng.standard_normal((speakers, args.dim), dtype=np.float32)
    for start in range(0, len(matrix), 4096):
        block = matrix[start:start + 4096]
        block += centres[speaker[start:start + 4096]]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    np.save(data.matrix_path, matrix)
    marker.write_text("complete\n")
    return data


# ----------------------------------------------------------------------------------------------
# VoxCeleb2- and VoxBlink2-sized data (issue 19): a tree of (crops, D) files, float16 stores


@dataclass(frozen=True)
class Vox2:
    """A VoxCeleb2-shaped tree under OUT/data: `<spk>/<video>/<nnnnn>.npy` files of (crops, D)
    float32 with each speaker's B and C files, the normal list of every utterance, and `part`: links
    to its first speakers' folders (about --file_part files), the per-file side of store_open."""

    root: Path

    @property
    def embed_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def list_path(self) -> Path:
        return self.root / "vox2_normal_list.txt"

    @property
    def part_dir(self) -> Path:
        return self.root / "part"

    @property
    def part_list(self) -> Path:
        return self.root / "part_normal_list.txt"


def vox2_shape(args: argparse.Namespace) -> dict[str, int]:
    return {key: getattr(args, f"vox2_{key}") for key in ("utterances", "speakers", "videos", "crops", "dim")}


def vox2_of(args: argparse.Namespace) -> Vox2:
    name = "vox2_" + "_".join(f"{key}{value}" for key, value in vox2_shape(args).items())
    return Vox2(Path(args.out) / "data" / name)


def spread(total: int, parts: int) -> np.ndarray:
    """`total` split into `parts` near-equal counts."""
    return np.diff(np.linspace(0, total, parts + 1).astype(np.int64))


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy header of a float32 array of `shape` (every file of the tree has the same)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def write_vox2_speaker(task: tuple[Path, int, int, int, int, int]) -> list[str]:
    """One speaker's utterance files (a video offset plus noise per crop around the speaker's centre;
    raw writes of a fixed header and the data) and its B and C files; returns its list lines, in
    the order m_gen_list writes them (the tree's sorted paths, which are the packed store's rows)."""
    embed_dir, crops, dim, index, count, videos = task
    rng = np.random.default_rng([SEED, index])
    name = f"id{10000 + index:05d}"
    video_ids = ["".join(chars) for chars in VIDEO_ID[rng.integers(len(VIDEO_ID), size=(videos, 11))]]
    video = np.arange(count) * videos // count
    first = np.searchsorted(video, video)
    block = rng.standard_normal((count, crops, dim), dtype=np.float32)
    block += (rng.standard_normal(dim, dtype=np.float32)
              + rng.standard_normal((videos, dim), dtype=np.float32)[video])[:, None]
    header = npy_header((crops, dim))
    for video_id in video_ids:
        (embed_dir / name / video_id).mkdir(parents=True, exist_ok=True)
    lines = []
    for u in range(count):
        rel = f"{name}/{video_ids[video[u]]}/{u - first[u] + 1:05d}.npy"
        with open(embed_dir / rel, "wb") as file:
            file.write(header + block[u].tobytes())
        lines.append(f"{name} {rel}\n")
    for kind, embedding in speaker_embeddings(block.astype(np.float64).mean(axis=1)).items():
        np.save(embed_dir / EMBEDDING_TYPES[kind].speaker_file.format(name), embedding)
    return sorted(lines, key=lambda line: line.split()[1].split("/"))  # m_gen_list's order


def check_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed * 1.2 > free:
        raise SystemExit(f"bench: {folder} has {free / 2 ** 30:.1f} GiB free, the data needs about "
                         f"{needed / 2 ** 30:.1f} GiB; make the size smaller")


def ensure_vox2(args: argparse.Namespace) -> Vox2:
    """The VoxCeleb2-shaped tree of this size, written unless complete (--vox2_processes writers)."""
    data = vox2_of(args)
    written_once(data.root, vox2_shape(args), "the VoxCeleb2-shaped tree", lambda: write_vox2(data, args))
    return data


def write_vox2(data: Vox2, args: argparse.Namespace) -> None:
    """Write the VoxCeleb2-shaped tree, its normal list and the per-file part (--vox2_processes writers)."""
    size = args.vox2_utterances * 4096 * (-(-(128 + 4 * args.vox2_crops * args.vox2_dim) // 4096))
    check_disk(data.root, size)
    say(f"writing a VoxCeleb2-shaped tree of {args.vox2_utterances} files ({args.vox2_crops}, "
        f"{args.vox2_dim}) under {data.root} (once, {size / 2 ** 30:.1f} GiB)")
    counts = spread(args.vox2_utterances, args.vox2_speakers)
    videos = spread(args.vox2_videos, args.vox2_speakers)
    tasks = [(data.embed_dir, args.vox2_crops, args.vox2_dim, k, int(n), int(max(1, min(v, n))))
             for k, (n, v) in enumerate(zip(counts, videos, strict=True))]
    with multiprocessing.get_context("fork").Pool(args.vox2_processes) as pool, \
            open(data.list_path, "w") as listed:
        for lines in tqdm(pool.imap(write_vox2_speaker, tasks, chunksize=4), total=len(tasks),
                          desc="speakers", unit="spk", leave=False):
            listed.writelines(lines)
    write_part(data, counts, args.file_part)


def write_part(data: Vox2, counts: np.ndarray, files: int) -> None:
    """Links to the first speakers' folders and B files holding at least `files` utterances, and
    their list (the first lines of the whole list)."""
    speakers = int(np.searchsorted(np.cumsum(counts), files)) + 1
    shutil.rmtree(data.part_dir, ignore_errors=True)  # links only, left by an interrupted run
    data.part_dir.mkdir(parents=True)
    for index in range(min(speakers, len(counts))):
        name = f"id{10000 + index:05d}"
        for entry in (name, *(kind.speaker_file.format(name) for kind in EMBEDDING_TYPES.values())):
            (data.part_dir / entry).symlink_to((data.embed_dir / entry).resolve())
    with open(data.list_path) as whole:
        data.part_list.write_text("".join(islice(whole, int(counts[:speakers].sum()))))


@dataclass(frozen=True)
class Blink:
    """VoxBlink2-sized float16 stores under OUT/data (`big`: --blink_rows, `small`:
    --blink_small_rows, as many utterances a speaker), each with the normal list of all its rows."""

    root: Path

    def store(self, size: str) -> Path:
        return self.root / f"{size}.store"

    def list_path(self, size: str) -> Path:
        return self.root / f"{size}_normal_list.txt"


def blink_sizes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """rows and speakers of the two stores."""
    small_speakers = max(2, round(args.blink_speakers * args.blink_small_rows / args.blink_rows))
    return {"big": (args.blink_rows, args.blink_speakers), "small": (args.blink_small_rows, small_speakers)}


def blink_of(args: argparse.Namespace) -> Blink:
    return Blink(Path(args.out) / "data" / f"blink_r{args.blink_rows}_s{args.blink_speakers}_"
                                           f"small{args.blink_small_rows}_dim{args.vox2_dim}")


def ensure_blink(args: argparse.Namespace) -> Blink:
    """Both stores, each written unless complete, in a child process (the keys of 9.9M rows take
    about a GB there, not in the bench's main process)."""
    data = blink_of(args)
    for size, (rows, speakers) in blink_sizes(args).items():
        if (data.root / f".{size}_complete").is_file():
            say(f"reusing the {rows}-row float16 store {data.store(size)}")
            continue
        check_disk(data.root, rows * (args.vox2_dim * 2 + 60))
        say(f"writing a {rows} x {args.vox2_dim} float16 store of {speakers} speakers, "
            f"{data.store(size)} (once)")
        process = multiprocessing.get_context("fork").Process(
            target=write_blink_store, args=(data, size, rows, speakers, args.vox2_dim))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"bench: writing {data.store(size)} failed (exit code {process.exitcode})")
        (data.root / f".{size}_complete").touch()
    return data


BLINK_BLOCK = 65536  # rows generated and written at a time: the float32 matrix is never whole


def write_blink_store(data: Blink, size: str, rows: int, speakers: int, dim: int) -> None:
    """A float16 store of random unit vectors (a speaker's centre plus noise) straight through
    StoreBuilder, block by block; its B and C tables are the centres; and its list."""
    rng = np.random.default_rng([SEED, rows])
    counts = spread(rows, speakers)
    speaker_of = np.repeat(np.arange(speakers, dtype=np.int32), counts)
    within = np.arange(rows) - np.repeat(np.cumsum(counts) - counts, counts)
    names = [f"id{k:06d}" for k in range(speakers)]
    keys = [f"{names[s]}/v{w // 8:04d}/{w % 8 + 1:05d}" for s, w in zip(speaker_of.tolist(), within.tolist(),
                                                                         strict=True)]
    centres = rng.standard_normal((speakers, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    with StoreBuilder(data.store(size), rows, dim, "float16") as builder:
        for start in tqdm(range(0, rows, BLINK_BLOCK), desc="rows", unit="block", leave=False):
            block = centres[speaker_of[start:start + BLINK_BLOCK]]
            block += 0.1 * rng.standard_normal(block.shape, dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            builder.put(start, block, np.ones(len(block), np.float32))
        builder.finish(keys, names, speaker_of, {name: centres for name in EMBEDDING_TYPES},
                       {"source": "bench (random unit vectors)", "source_kind": "arrays", "stamp": None})
    with open(data.list_path(size), "w") as listed:
        for start in range(0, rows, BLINK_BLOCK):
            listed.writelines(f"{key.split('/', 1)[0]} {key}\n" for key in keys[start:start + BLINK_BLOCK])


# ----------------------------------------------------------------------------------------------
# Measuring


def status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMeter:
    """Peak resident memory above this process's size when the meter was made.

    `start()` resets the kernel's high-water mark (5 into /proc/self/clear_refs), so a setup
    transient before it does not count; where that is impossible the lifetime peak is used.
    """

    def __init__(self):
        self.base = status_mb("VmRSS") or 0.0

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> dict[str, float]:
        """The record's peak fields since start(): host RSS, and GPU memory where CUDA is in use."""
        peaks = {"peak_rss_mb": round(self.peak_mb(), 1)}
        if torch.cuda.is_initialized():
            peaks[GPU_KEY] = round(torch.cuda.max_memory_allocated() / MB, 1)
        return peaks

    def peak_mb(self) -> float:
        peak = status_mb("VmHWM")
        if peak is None:
            scale = 1 if sys.platform == "darwin" else 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB
        return peak - self.base


def timed(work: Callable[[], object]) -> float:
    """Seconds of `work`, its GPU kernels finished."""
    start = time.perf_counter()
    work()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def repeated_rate(work: Callable[[], object], units: float, min_seconds: float) -> float:
    """units/s of `work`, run again until `min_seconds` have passed (at least once)."""
    runs, elapsed = 0, 0.0
    while runs == 0 or elapsed < min_seconds:
        elapsed += timed(work)
        runs += 1
    return units * runs / elapsed


def sampled_epoch_seconds(loader: DataLoader, sample: int, step: Callable[[Batch], None]) -> float:
    """Seconds of one epoch of `loader` (a fresh iterator, as each epoch of the original repository),
    from its first `sample` batches: the time to the first one, plus the mean time of the others for each
    batch left. Exact when `sample` covers the epoch."""
    total = len(loader)
    start, first, taken = time.perf_counter(), 0.0, 0
    iterator = iter(loader)
    for batch in iterator:
        step(batch)
        taken += 1
        if taken == 1:
            first = time.perf_counter() - start
        if taken >= sample:
            break
    elapsed = time.perf_counter() - start
    del iterator
    if taken >= total:
        return elapsed
    per_batch = (elapsed - first) / (taken - 1) if taken > 1 else first
    return first + per_batch * (total - 1)


def train_step(net: SpeakerNet, optimizer: torch.optim.Optimizer, batch: Batch,
               baseline: bool = False) -> None:
    """One optimiser step of `net` on `batch`, and nothing else. The baseline zeroes gradients with
    torch's default (set_to_none), as the original repository did; the project as its Trainer does."""
    if baseline:
        optimizer.zero_grad(set_to_none=True)
    else:
        clear_gradients(optimizer, batch.inputs.device)
    loss, _ = net(batch)
    loss.backward()
    optimizer.step()


def new_trainer(loss: str, dim: int, device: torch.device, model: str = MODEL) -> Trainer:
    torch.manual_seed(SEED)
    return Trainer(SpeakerNet(model, loss, nOut=dim), device)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors moved to `device`, as the original repository moved each batch (.cuda())."""
    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


# ----------------------------------------------------------------------------------------------
# The baseline: the original repository's way of working, re-created for measurement


def reduce_file(path: Path) -> np.ndarray:
    """Open one embedding file, average its crops, L2-normalise: the original repository's work per sample."""
    mean = np.load(path).mean(axis=0)
    return mean / np.linalg.norm(mean)


class PerFileDataset(Dataset):
    """One file per sample, as the original repository: every item opens its utterance's file anew.
    Speaker targets are held in memory (which favours the baseline)."""

    def __init__(self, tree: Tree, records: list[tuple], targets: torch.Tensor, speakers: list[str]):
        index = {spk: i for i, spk in enumerate(speakers)}
        self.files = [tree.embed_dir / rel for _, rel in records]
        self.speaker = [index[spk] for spk, _ in records]
        self.targets = targets

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return torch.from_numpy(reduce_file(self.files[i])), self.targets[self.speaker[i]], self.speaker[i]


def collate_batch(samples: list[tuple[torch.Tensor, torch.Tensor, int]]) -> Batch:
    inputs, targets, labels = zip(*samples, strict=True)
    return Batch(inputs=torch.stack(inputs), targets=torch.stack(targets), labels=torch.tensor(labels))


class SpeakerPairsDataset(Dataset):
    """The original repository's DA data path: item k is speaker k's step; its pair files are reopened."""

    def __init__(self, tree: Tree, records: list[tuple], targets: torch.Tensor, speakers: list[str]):
        self.root = tree.embed_dir
        self.speakers = speakers
        self.pairs: dict[str, list[tuple]] = {spk: [] for spk in speakers}
        for spk, a, b, flag in records:
            self.pairs[spk].append((a, b, flag))
        self.targets = targets

    def __len__(self) -> int:
        return len(self.speakers)

    def __getitem__(self, k: int) -> Batch:
        pairs = self.pairs[self.speakers[k]]
        rows = [reduce_file(self.root / rel) for a, b, _ in pairs for rel in (a, b)]
        return Batch(inputs=torch.from_numpy(np.stack(rows)),
                     targets=self.targets[k].expand(len(rows), -1).clone(),
                     labels=torch.full((len(rows),), k), pair_same=torch.tensor([f == 1 for *_, f in pairs]),
                     pair_speaker=torch.full((len(pairs),), k))


def per_file_loader(args: argparse.Namespace, tree: Tree, kind: str) -> DataLoader:
    """A one-file-per-sample DataLoader over the same list, with nDataLoaderThread workers."""
    records = read_list(tree.list_path(kind), kind)
    speakers = sorted({r[0] for r in records})
    targets = torch.from_numpy(load_speaker_embeddings(tree.embed_dir, speakers, EMBEDDING_TYPE[kind],
                                                       args.dim))
    if kind == "distribution":
        return DataLoader(SpeakerPairsDataset(tree, records, targets, speakers), batch_size=None,
                          shuffle=True, num_workers=args.workers)
    return DataLoader(PerFileDataset(tree, records, targets, speakers), batch_size=args.batch_size,
                      shuffle=True, num_workers=args.workers, collate_fn=collate_batch)


def per_trial_scores(matrix: np.ndarray, left: np.ndarray, right: np.ndarray,
                    device: torch.device) -> list[float]:
    """One Python iteration and one device transfer per trial, as the original repository scored."""
    scores = []
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        a = torch.from_numpy(matrix[i]).to(device)
        b = torch.from_numpy(matrix[j]).to(device)
        scores.append(-float(F.pairwise_distance(a[None], b[None]).detach().cpu().numpy().mean()))
    return scores


def original_trial_parse(path: Path) -> dict[str, int]:
    """The original repository's reading of a trial list: every line read and split, the distinct
    files collected and sorted, a dictionary from file to its embedding (here its row)."""
    with open(path) as file:
        lines = file.readlines()
    files = []
    for line in lines:
        data = line.split()
        files += [data[1], data[2]]
    return {name: row for row, name in enumerate(sorted(set(files)))}


def python_error_rates(scores: list[float], labels: list[int]) -> tuple[list[float], list[float]]:
    """Miss and false-alarm rates at every score, built one element at a time in Python lists."""
    ordered = [labels[k] for k in sorted(range(len(scores)), key=scores.__getitem__)]
    targets = sum(ordered)
    nontargets = len(ordered) - targets
    misses, accepted, fnrs, fprs = 0, 0, [], []
    for label in ordered:
        misses += label
        accepted += 1 - label
        fnrs.append(misses / targets)
        fprs.append(1 - accepted / nontargets)
    return fnrs, fprs


def python_min_dcf(fnrs: list[float], fprs: list[float], p_target: float) -> float:
    best = min(fnr * p_target + fpr * (1 - p_target) for fnr, fpr in zip(fnrs, fprs, strict=True))
    return best / min(p_target, 1 - p_target)


def per_trial_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """EER on sklearn's ROC curve and minDCF(0.05, 0.01) from Python-list error rates."""
    fnrs, fprs = python_error_rates(scores.tolist(), labels.tolist())
    return compute_eer(scores, labels)[0], python_min_dcf(fnrs, fprs, 0.05), python_min_dcf(fnrs, fprs, 0.01)


# ----------------------------------------------------------------------------------------------
# Stages: each runs in its own forked process and returns its record and notes


@dataclass
class StageResult:
    record: dict
    notes: list[str]


def make_record(name: str, project: float, baseline: float | None, peaks: dict[str, float],
                compute_only: float | None = None) -> dict:
    record = {"name": name, "project_per_s": round(project, 3),
              "baseline_per_s": None if baseline is None else round(baseline, 3),
              "ratio": None if baseline is None else round(project / baseline, 2), **peaks}
    if compute_only is not None:
        record[COMPUTE_KEY] = round(compute_only, 3)
    return record


def load_list(args: argparse.Namespace, tree: Tree, kind: str) -> EmbeddingData:
    return EmbeddingData(tree.list_path(kind), tree.embed_dir, kind, EMBEDDING_TYPE[kind], args.dim,
                         args.device, threads=args.workers)


def stage_load(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
    meter.start()
    start = time.perf_counter()
    data = load_list(args, tree, "normal")
    seconds = time.perf_counter() - start
    return StageResult(make_record("load", len(data) / seconds, None, meter.peaks()),
                       ["load: first load of the normal list (page cache warm); the baseline has no "
                        "load step (it read files every epoch: see data_path), so no ratio"])


def stage_data_path(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
    data = load_list(args, tree, "normal")
    meter.start()
    sampling = Sampling(batch_size=args.batch_size, seed=SEED)
    batches = sum(1 for _ in data.batches(1, sampling))
    project = repeated_rate(lambda: sum(1 for _ in data.batches(1, sampling)), batches,
                            args.min_seconds)
    peak = meter.peaks()
    loader = per_file_loader(args, tree, "normal")
    baseline = len(loader) / sampled_epoch_seconds(loader, args.baseline_batches, lambda batch: None)
    return StageResult(make_record("data_path", project, baseline, peak),
                       [sampled_note("data_path", args.baseline_batches, len(loader), "batches")])


def sampled_note(name: str, sample: int, total: int, what: str) -> str:
    if sample >= total:
        return f"{name}: baseline timed over the whole epoch ({total} {what})"
    return f"{name}: baseline timed on its first {sample} of {total} {what}, extrapolated to the epoch"


def stage_train(name: str, kind: str, loss: str) -> Callable[..., StageResult]:
    """One epoch of MODEL with `loss` on the `kind` list: project, compute only, baseline."""

    def run(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
        data = load_list(args, tree, kind)
        sampling = Sampling(batch_size=args.batch_size, seed=SEED)
        sizes = [batch.size for batch in data.batches(1, sampling)]
        rows = sum(sizes)
        trainer = new_trainer(loss, args.dim, args.device)

        def epoch_time(epoch: int) -> float:
            return timed(lambda: trainer.train_epoch(data, epoch, sampling))

        meter.start()
        first_epoch = epoch_time(1)
        peak = meter.peaks()  # epoch 1 also builds the optimiser state: the peak epoch
        # Spread over the epoch: DA steps differ in size (one speaker's pairs each).
        total = len(sizes)
        stride = max(1, total // args.compute_batches)
        batches = list(islice(data.batches(1, sampling), 0, None, stride))
        batches = batches[:args.compute_batches]

        def compute_time() -> float:
            return timed(lambda: [train_step(trainer.net, trainer.optimizer, batch) for batch in batches])

        # Each the better of two runs, the two kinds alternating: the first epoch also pays one-time
        # costs (optimiser state, a GPU's lazily loaded kernels), and this machine's speed drifts.
        compute_seconds = [compute_time()]
        seconds = min(first_epoch, epoch_time(2))
        compute_seconds.append(compute_time())
        compute = sum(batch.size for batch in batches) / min(compute_seconds)
        baseline = new_trainer(loss, args.dim, args.device)
        loader = per_file_loader(args, tree, kind)
        baseline_seconds = sampled_epoch_seconds(
            loader, args.baseline_batches,
            lambda batch: train_step(baseline.net, baseline.optimizer, batch_to(batch, args.device), True))
        notes = [sampled_note(name, args.baseline_batches, len(loader), "steps"),
                 f"{name}: project time is the better of epochs 1 and 2, compute-only the better of "
                 f"two runs, one after each epoch",
                 f"{name}: compute-only timed on {len(batches)} of the epoch's {total} batches (every "
                 f"{stride}th), built beforehand, pushed through the project epoch's model and optimiser"]
        return StageResult(make_record(name, rows / seconds, rows / baseline_seconds, peak, compute), notes)

    return run


def stage_score(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
    records = read_list(tree.list_path("normal"), "normal")
    matrix = load_embeddings(tree.embed_dir, [rel for _, rel in records], args.dim, args.workers,
                             show_progress=False)
    index = {spk: i for i, spk in enumerate(sorted({spk for spk, _ in records}))}
    speaker = np.array([index[spk] for spk, _ in records], np.int64)
    left, right, labels = make_trials(speaker, args.trials, np.random.default_rng(SEED))
    # Held where training keeps its embeddings: on the GPU when there is one.
    table = matrix if args.device.type == "cpu" else torch.from_numpy(matrix).to(args.device)
    meter.start()
    project = repeated_rate(lambda: evaluate_scores(score_trials(table, left, right, cosine=False), labels),
                            args.trials, args.min_seconds)
    peak = meter.peaks()
    scores = score_trials(table, left, right, cosine=False)
    sample = min(args.baseline_trials, args.trials)
    loop = timed(lambda: per_trial_scores(matrix, left[:sample], right[:sample], args.device))
    metrics = timed(lambda: per_trial_metrics(scores, labels))
    baseline = args.trials / (loop * args.trials / sample + metrics)
    note = (f"score: baseline per-trial loop timed on {sample} of {args.trials} trials and extrapolated, "
            f"its EER/minDCF on all {args.trials}" + ("; on CPU its per-trial device transfer is a no-op"
                                                     if args.device.type == "cpu" else ""))
    return StageResult(make_record("score", project, baseline, peak), [note])


def vox1e_trial_set(args: argparse.Namespace, matrix: np.ndarray) -> TrialSet:
    """The VoxCeleb1-E-sized TrialSet as --check builds it (the list parsed, its files indexed), with
    the embeddings supplied from `matrix` instead of read from 145,000 files."""
    data = vox1e_of(args)
    return TrialSet(data.list_path, data.root, args.dim, load=lambda files: matrix)


def on_device(matrix: np.ndarray, device: torch.device) -> np.ndarray | torch.Tensor:
    """The table where training keeps its embeddings: on the GPU when there is one."""
    return matrix if device.type == "cpu" else torch.from_numpy(matrix).to(device)


def stage_score_vox1e(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    data = vox1e_of(args)
    matrix = np.load(data.matrix_path)  # what reading the embedding files would give; not timed
    meter.start()
    start = time.perf_counter()
    trials = vox1e_trial_set(args, matrix)
    table = on_device(trials.embeddings, args.device)
    scores = score_trials(table, trials.left, trials.right, VOX1E_TYPE == "C")
    evaluate_scores(scores, trials.labels)
    seconds = time.perf_counter() - start
    peak = meter.peaks()
    parse = timed(lambda: original_trial_parse(data.list_path))
    sample = min(args.baseline_trials, len(trials))
    loop = timed(lambda: per_trial_scores(trials.embeddings, trials.left[:sample], trials.right[:sample],
                                          args.device))
    metrics = timed(lambda: per_trial_metrics(scores, trials.labels))
    baseline = len(trials) / (parse + loop * len(trials) / sample + metrics)
    notes = [f"score_vox1e: {len(trials)} trials over {len(trials.files)} utterances ({args.dim}-dim, type "
             f"{VOX1E_TYPE}); project: the list parsed and indexed by TrialSet (embeddings supplied from one "
             f"matrix, loaded before the timing, counted in the peak), scored, EER and minDCF; baseline: the "
             f"list read whole and split, the per-trial loop timed on {sample} trials and extrapolated, its "
             f"EER/minDCF"]
    return StageResult(make_record("score_vox1e", len(trials) / seconds, baseline, peak), notes)


def stage_backend_asnorm(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    rng = np.random.default_rng(SEED)
    matrix = np.load(vox1e_of(args).matrix_path)
    meter.start()
    trials = vox1e_trial_set(args, matrix)
    table = on_device(trials.embeddings, args.device)
    # Training embeddings: two utterances of each cohort speaker.
    speakers = np.repeat(np.arange(args.cohort_speakers), 2)
    training = rng.standard_normal((args.cohort_speakers, args.dim), dtype=np.float32)[speakers]
    training += rng.standard_normal(training.shape, dtype=np.float32)
    backend = make_backend("asnorm", VOX1E_TYPE == "C", asnorm_topk=ASNORM_TOPK)
    fit = timed(partial(backend.fit, on_device(training, args.device), speakers))
    del training
    score = timed(lambda: backend.score(table, trials.left, trials.right))
    peak = meter.peaks()
    note = (f"backend_asnorm: AS-Norm (top {ASNORM_TOPK}) of {len(trials)} trials over {len(trials.files)} "
            f"utterances against {args.cohort_speakers} cohort speakers (fitted on 2 utterances each in "
            f"{fit:.2f} s); time: the scoring; peak: the trial set, the fit and the scoring; no baseline")
    return StageResult(make_record("backend_asnorm", len(trials) / score, None, peak), [note])


def bf16_peak_flops(device: torch.device) -> float | None:
    """The card's dense bfloat16 peak in FLOP/s, from BF16_PEAK_TFLOPS; None for a CPU or another card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for fragment, tflops in BF16_PEAK_TFLOPS if fragment in name), None)


def flops_per_utterance(model: torch.nn.Module, item: Item, device: torch.device) -> float:
    """Floating-point operations of one utterance's pass (matrix products and convolutions, counted by
    torch's FlopCounterMode; the STFT is not among them)."""
    with FlopCounterMode(display=False) as counter:
        embed_batch(model, [item], device)
    return float(counter.get_total_flops())


def stage_extract(name: str, extractor: str, mixedprec: bool = False) -> Callable[..., StageResult]:
    """`extractor` on synthetic audio: m_gen_embs' batches of utterances (under bfloat16 autocast with
    `mixedprec`, as --mixedprec) vs one utterance a pass in float32."""

    def run(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
        notes = []
        random_init = extractor != "GE2E" or packaged_weights() is None
        model = load_extractor(extractor, random_init=random_init).to(args.device)
        if random_init:
            notes.append(f"{name}: random weights (the speed does not depend on them)")
        items = [Item(i, torch.from_numpy(make_crops(audio, args.eval_frames, args.num_eval)))
                 for i, audio in enumerate(synthetic_audio(args.audio_utterances, args.audio_seconds))]
        sample = items[:args.baseline_utterances]
        size = batch_size_for(args.extract_batch, args.device, args.eval_frames, args.num_eval, mixedprec)
        with torch.inference_mode():
            # The baseline first: m_gen_embs then changes how this process's malloc keeps memory (on
            # a CPU) or lets cuDNN autotune (on CUDA).
            embed_batch(model, items[:1], args.device)
            baseline = len(sample) / timed(lambda: [embed_batch(model, [item], args.device)
                                                    for item in sample])
            prepare_device(args.device)
            notes.append(f"{name}: the project's passes run with m_gen_embs' settings for the device "
                         + ("(cuDNN's autotuner)" if args.device.type == "cuda" else
                            "(malloc keeps freed memory)"))
            embed_batch(model, items[:size], args.device, mixedprec)
            meter.start()
            project = len(items) / timed(lambda: [embed_batch(model, items[i:i + size], args.device,
                                                              mixedprec) for i in range(0, len(items), size)])
            peak = meter.peaks()
            flops = flops_per_utterance(model, items[0], args.device) if extractor == "ResNetSE34V2" else None
        notes.append(f"{name}: {len(items)} utterances of {args.audio_seconds:g} s, {args.num_eval} crops of "
                     f"{args.eval_frames} frames each, {min(size, len(items))} utterance(s) per pass"
                     f"{' in bfloat16 autocast' if mixedprec else ''}; baseline (one utterance per pass, "
                     f"float32) timed on {len(sample)} of them")
        record = make_record(name, project, baseline, peak)
        if flops is not None:
            peak_flops = bf16_peak_flops(args.device)
            record[PEAK_KEY] = None if peak_flops is None else round(project * flops / peak_flops, 4)
            notes.append(f"{name}: {flops / 1e9:.1f} GFLOP per utterance (FlopCounterMode), "
                         + (f"{project * flops / 1e12:.1f} TFLOP/s of the card's {peak_flops / 1e12:g}"
                            if peak_flops else "no bfloat16 peak known for this device"))
        return StageResult(record, notes)

    return run


def stage_decode(suffix: str) -> Callable[..., StageResult]:
    """m_gen_embs' decoding (read_audio: decode, mix to mono, check) of --audio_files `suffix` files of
    the same audio in this one process: files/s per core."""

    def run(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
        root = ensure_audio_trees(args)[suffix]
        paths = [root / rel for rel in find_audio(root)]
        def decode_all() -> None:
            for path in paths:
                read_audio(path)  # each result dropped before the next, as a worker hands it on

        read_audio(paths[0])
        meter.start()
        rate = len(paths) / timed(decode_all)
        name = f"decode_{suffix.lstrip('.')}"
        return StageResult(make_record(name, rate, None, meter.peaks()),
                           [f"{name}: {len(paths)} files of {args.audio_seconds:g} s, decoded one after the "
                            f"other in one process on one core (the crops excluded); no baseline"])

    return run


def stage_extract_m4a(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
    """m_gen_embs' whole path (DataLoader workers decoding and cropping, passes, atomic writes) with
    ResNetSE34V2 on .m4a files against the same on .wav files of the same audio: the ratio says whether
    decoding keeps up."""
    trees = ensure_audio_trees(args)
    count = args.audio_files if args.device.type == "cuda" else min(args.audio_files, CPU_EXTRACT_FILES)
    mixedprec = args.device.type == "cuda"
    model = load_extractor("ResNetSE34V2", random_init=True)
    logging.getLogger("m_gen_embs").setLevel(logging.WARNING)
    failed = multiprocessing.Value("i", 0)

    def files_per_second(suffix: str, files: int) -> float:
        root = trees[suffix]
        job = Job(db_path=root, embed_dir=root.parent / f"embeddings_{root.name}",
                  files=tuple(find_audio(root)[:files]), eval_frames=args.eval_frames, num_eval=args.num_eval,
                  batch_size=args.extract_batch, device=args.device.type, overwrite=True, mixedprec=mixedprec)
        return files / timed(lambda: extract(DistContext(), job, model, failed))

    size = batch_size_for(args.extract_batch, args.device, args.eval_frames, args.num_eval, mixedprec)
    # cuDNN's autotuning and lazy loading, not timed: a full pass and the timed runs' last, shorter one
    files_per_second(".wav", size + count % size)
    meter.start()
    m4a = files_per_second(".m4a", count)
    peak = meter.peaks()
    wav = files_per_second(".wav", count)
    if failed.value:
        raise RuntimeError(f"extract_resnetse34v2_m4a: {failed.value} file(s) failed")
    workers = workers_for(None, args.device)
    return StageResult(make_record("extract_resnetse34v2_m4a", m4a, wav, peak),
                       [f"extract_resnetse34v2_m4a: m_gen_embs' path on {count} .m4a files (project) and "
                        f"the same on .wav files of the same audio (baseline): {workers} decoding workers, "
                        f"random weights{', --mixedprec' if mixedprec else ''}; ratio = m4a / wav"])


def in_child(work: Callable[[], object]) -> object:
    """`work()` in a forked process: nothing it opens or caches (stores, freshness) outlives it."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=lambda: send.send(work()))
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = None
    process.join()
    if process.exitcode != 0 or result is None:
        raise RuntimeError(f"bench: a timed child process failed (exit code {process.exitcode})")
    return result


def ready_seconds(list_path: Path, root: Path, dim: int, threads: int) -> tuple[float, float, int]:
    """(seconds, peak MB above the start, rows) for a run to have every training embedding of the
    list ready: the trainer's EmbeddingData, every row of its table read once (numpy's sum)."""
    forget_freshness()
    meter = PeakMeter()
    meter.start()
    start = time.perf_counter()
    data = EmbeddingData(list_path, root, "normal", "B", dim, "cpu", threads=threads)
    np.sum(data.table.numpy(), dtype=np.float64)
    return time.perf_counter() - start, meter.peak_mb(), len(data)


def read_through(paths: Iterable[Path]) -> None:
    """Read files once (untimed): the page cache holds them, as after the runs before."""
    for path in paths:
        with open(path, "rb") as file:
            while file.read(1 << 24):
                pass


def evict(paths: Iterable[Path]) -> None:
    """Drop these files (only these) from the page cache (POSIX_FADV_DONTNEED): the next read
    comes from the disk, as on a machine where they have not been read since they were written."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def store_is_fresh(embed_dir: Path) -> bool:
    """Whether the tree's packed store exists and matches its files (no process cache involved)."""
    store = store_path_of(embed_dir)
    return (is_packed_store(store)
            and check_store(store, tree_sources(embed_dir), tree_hash_of(embed_dir)).fresh)


def open_times(data: Vox2, args: argparse.Namespace, cache: str) -> dict[str, tuple[float, float, int]]:
    """ready_seconds of the packed store, the tree's path and the files' part, each in a fresh
    process, with the page cache `warm` (every file read once before) or `cold` (evicted)."""
    store = store_path_of(data.embed_dir)
    part_files = [data.part_dir / line.split()[1] for line in data.part_list.read_text().splitlines()]
    sides = {"store": (data.list_path, store, [*store.iterdir(), data.list_path]),
             "tree": (data.list_path, data.embed_dir, [*store.iterdir(), data.list_path]),
             "files": (data.part_list, data.part_dir, [*part_files, data.part_list])}
    times = {}
    for side, (list_path, root, files) in sides.items():
        (read_through if cache == "warm" else evict)(files)
        times[side] = in_child(partial(ready_seconds, list_path, root, args.vox2_dim, args.workers))
    return times


def stage_store_open(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    """Every training embedding of the VoxCeleb2-shaped list ready: the packed store vs the files
    (a --file_part part of the tree, scaled), each side in its own fresh process; the record with
    the page cache cold (these files evicted), the warm figures in the notes."""
    data = vox2_of(args)
    if not store_is_fresh(data.embed_dir):
        say("store_open: packing the tree first (m_comb_embs, untimed)")
        combine(data.embed_dir, THREADS, pack=True)
    notes = []
    for cache in ("warm", "cold"):
        times = open_times(data, args, cache)
        (packed, peak, rows), (via_tree, _, _), (files, _, part_rows) = times.values()
        scaled = files * rows / part_rows
        notes.append(f"store_open ({cache} page cache): {rows} utterances ({args.vox2_speakers} speakers, "
                     f"{args.vox2_dim}-dim): packed store (train_path = {TREE_STORE}) "
                     f"{packed:.2f} s, peak {peak:.0f} MB; the tree's path (its freshness check stats every "
                     f"file) {via_tree:.2f} s; files: a {part_rows}-file part {files:.2f} s ({args.workers} "
                     f"reader threads), scaled linearly to {rows}: {scaled:.1f} s; ratios "
                     f"{scaled / packed:.1f}x (store), {scaled / via_tree:.1f}x (tree's path)")
    notes.append("store_open: each side in a fresh process (no store or freshness cache); ready = the "
                 "trainer's EmbeddingData plus every row read once; record: the cold run")
    return StageResult(make_record("store_open", rows / packed, part_rows / files,
                                   {"peak_rss_mb": round(peak, 1)}), notes)


def stage_pack_vox2(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    """m_comb_embs (combine, packing on) over the VoxCeleb2-shaped tree: files/s."""
    data = vox2_of(args)
    meter.start()
    seconds = timed(lambda: combine(data.embed_dir, THREADS, pack=True))
    peak = meter.peaks()
    store = store_path_of(data.embed_dir)
    header = json.loads((store / "header.json").read_text())
    speaker_files = [name for name in os.listdir(data.embed_dir) if name.endswith(".npy")]
    if header["utterances"] != args.vox2_utterances or len(speaker_files) != 2 * args.vox2_speakers:
        raise RuntimeError(f"pack_vox2: {header['utterances']} rows, {len(speaker_files)} B/C files")
    size = sum(path.stat().st_size for path in store.iterdir()) / MB
    return StageResult(make_record("pack_vox2", args.vox2_utterances / seconds, None, peak),
                       [f"pack_vox2: m_comb_embs.combine(pack=True, {THREADS} reader threads) over "
                        f"{args.vox2_utterances} files of ({args.vox2_crops}, {args.vox2_dim}) float32, "
                        f"{args.vox2_speakers} speakers, {args.vox2_videos} videos: {seconds:.1f} s; wrote "
                        f"{len(speaker_files)} B/C files and the {header['dtype']} store ({size:.0f} MB); "
                        f"no baseline"])


def endless_batches(data: EmbeddingData, batch_size: int) -> Iterator[Batch]:
    """Batches of epoch after epoch (a small store's 500 steps span several)."""
    epoch = 1
    while True:
        yield from data.batches(epoch, Sampling(batch_size=batch_size, seed=SEED))
        epoch += 1


class Stepper:
    """Training steps of a fresh STEP_MODEL (MSE) from `data`; one untimed step when made."""

    def __init__(self, args: argparse.Namespace, data: EmbeddingData):
        self.trainer = new_trainer("MSE", args.vox2_dim, args.device, STEP_MODEL)
        self.batches = endless_batches(data, args.step_batch)
        self.seconds: list[float] = []
        self.run(1)
        self.seconds.clear()

    def run(self, steps: int) -> None:
        """Time `steps` more steps (one entry of `seconds`)."""
        start = time.perf_counter()
        for batch in islice(self.batches, steps):
            train_step(self.trainer.net, self.trainer.optimizer, batch)
        self.seconds.append(time.perf_counter() - start)


class AnonPeak:
    """The peak of RssAnon (the process's own memory, not mapped file pages), sampled every 20 ms
    on a thread while in the `with` block."""

    def __enter__(self) -> AnonPeak:
        self.peak, self.done = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while True:
            self.peak = max(self.peak, status_mb("RssAnon") or 0.0)
            if self.done.wait(0.02):
                return

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


STEP_ROUNDS = 10  # the big and the small store's steps alternate in rounds: the machine's drift cancels


def stage_train_vox2_steps(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    """--steps steps from the VoxBlink2-sized float16 store against the same from the small one, in
    alternating rounds: the cost of a step must not grow with the store."""
    blink = blink_of(args)
    read_through([blink.store(size) / "embeddings.npy" for size in ("small", "big")])

    def stepper(size: str) -> Stepper:
        return Stepper(args, EmbeddingData(blink.list_path(size), blink.store(size), "normal", "B",
                                           args.vox2_dim, args.device, threads=args.workers))

    small = stepper("small")
    base_anon = status_mb("RssAnon") or 0.0
    meter.start()
    with AnonPeak() as anon:
        started = time.perf_counter()
        big = stepper("big")
        ready = time.perf_counter() - started
        for k in range(STEP_ROUNDS):
            steps = args.steps // STEP_ROUNDS + (k < args.steps % STEP_ROUNDS)
            small.run(steps)
            big.run(steps)
    peak = meter.peaks()
    file_mb = status_mb("RssFile") or 0.0
    rows = {size: rows for size, (rows, _) in blink_sizes(args).items()}

    def per_step(stepper: Stepper) -> str:
        return ", ".join(f"{1000 * t * STEP_ROUNDS / args.steps:.1f}" for t in stepper.seconds)

    notes = [f"train_vox2_steps: {args.steps} steps of {STEP_MODEL} (MSE, batch {args.step_batch}) "
             f"from a {rows['big']} x {args.vox2_dim} float16 store and from a {rows['small']}-row one, "
             f"alternating in {STEP_ROUNDS} rounds; ms a step by round: big {per_step(big)}; small "
             f"{per_step(small)}; page cache warm (the stores read once before)",
             f"train_vox2_steps: the big store's EmbeddingData (a list of {rows['big']} lines parsed, "
             f"the store mapped) took {ready:.0f} s; peak RSS {peak['peak_rss_mb']:.0f} MB above the "
             f"start, of which the process's own (anonymous) memory peaked at {anon.peak - base_anon:.0f} "
             f"MB; at the end {file_mb:.0f} MB of RSS were the store's pages mapped from the page cache "
             f"(shared, reclaimable; the kernel maps 64 KB around each faulting row, so a few hundred "
             f"random batches map nearly the whole file)"]
    rates = (args.steps / sum(big.seconds), args.steps / sum(small.seconds))
    record = make_record("train_vox2_steps", *rates, peak)
    return StageResult(record, notes)


# ----------------------------------------------------------------------------------------------
# Goals and stages: one row per stage


def goal_line(text: str, met: bool) -> str:
    return f"  {'met    ' if met else 'NOT met'}  {text}"


@dataclass(frozen=True)
class MemoryBudget:
    """The sizes in MB that memory goals are factors of: the reduced (N, D) float32 matrix, MODEL's
    parameters and its training state (parameters, gradients and Adam's two moments), the
    VoxCeleb1-E-sized (utterances, D) matrix and AS-Norm's (cohort speakers, D) cohort, the
    VoxCeleb2-shaped (utterances, D) float32 matrix, and train_vox2_steps' fixed limit (8 GB)."""

    matrix_mb: float
    parameters_mb: float
    vox1e_mb: float
    cohort_mb: float
    vox2_matrix_mb: float
    step_limit_mb: float = STEP_RSS_BYTES / MB

    @property
    def training_state_mb(self) -> float:
        return 4 * self.parameters_mb


def memory_budget(args: argparse.Namespace) -> MemoryBudget:
    parameters = sum(p.numel() for p in get_model(MODEL, nOut=args.dim).parameters())
    return MemoryBudget(args.utterances * args.dim * 4 / MB, parameters * 4 / MB,
                        args.vox1e_utterances * args.dim * 4 / MB, args.cohort_speakers * args.dim * 4 / MB,
                        args.vox2_utterances * args.vox2_dim * 4 / MB)


@dataclass(frozen=True)
class RatioGoal:
    """project / baseline at least `gpu` where the stage ran on a GPU, `cpu` on a CPU (None: no goal)."""

    gpu: float | None
    cpu: float | None

    def verdict(self, record: dict, budget: MemoryBudget) -> str | None:
        goal = self.gpu if GPU_KEY in record else self.cpu
        if goal is None or record["ratio"] is None:
            return None
        return goal_line(f"{record['name']} ratio {record['ratio']:.2f} >= {goal:g}", record["ratio"] >= goal)


@dataclass(frozen=True)
class StepTimeGoal:
    """An epoch at most `cpu` (`gpu` on a GPU) times its arithmetic limit: the record's COMPUTE_KEY,
    the rate of the same batches, built beforehand, pushed through the model and optimiser."""

    cpu: float
    gpu: float

    def verdict(self, record: dict, budget: MemoryBudget) -> str | None:
        if COMPUTE_KEY not in record:
            return None
        slowdown = record[COMPUTE_KEY] / record["project_per_s"]
        slack = self.gpu if GPU_KEY in record else self.cpu
        return goal_line(f"{record['name']} epoch at {slowdown:.3f}x its arithmetic limit <= {slack}",
                         slowdown <= slack)


@dataclass(frozen=True)
class MemoryGoal:
    """Peak memory at most `factor` (MEMORY_FACTOR unless given) x the sum of `sizes` (MemoryBudget's
    sizes, by name). Judged where the data lives: on the GPU when the stage ran there, else in the
    process's RSS."""

    sizes: tuple[str, ...]
    factor: float = MEMORY_FACTOR

    def limit(self, budget: MemoryBudget) -> float:
        return self.factor * sum(getattr(budget, size) for size in self.sizes)

    def verdict(self, record: dict, budget: MemoryBudget) -> str | None:
        where, peak = ("GPU", record[GPU_KEY]) if GPU_KEY in record else ("RSS", record["peak_rss_mb"])
        limit = self.limit(budget)
        return goal_line(f"{record['name']} peak {where} {peak:.0f} MB <= {limit:.0f} MB", peak <= limit)


@dataclass(frozen=True)
class GrowthGoal:
    """A step at most `limit` times as long as the baseline's (the same steps from a smaller store):
    baseline_per_s / project_per_s."""

    limit: float

    def verdict(self, record: dict, budget: MemoryBudget) -> str | None:
        growth = record["baseline_per_s"] / record["project_per_s"]
        return goal_line(f"{record['name']} step time {growth:.3f}x the small store's <= {self.limit}",
                         growth <= self.limit)


Goal = RatioGoal | StepTimeGoal | MemoryGoal | GrowthGoal
Runner = Callable[[argparse.Namespace, "Tree | None", PeakMeter], StageResult]


@dataclass(frozen=True)
class Stage:
    """One stage: its record's name and unit, the runner that measures it (in its own forked process),
    the data written before any stage runs (`needs`: a key of DATA_MAKERS, or "none"), its goals,
    judged in this order, and `bf16`: it runs bfloat16, so a CPU without bfloat16 instructions
    skips it."""

    name: str
    unit: str
    runner: Runner
    needs: str = "none"
    goals: tuple[Goal, ...] = ()
    bf16: bool = False

    def memory_limit(self, budget: MemoryBudget) -> float | None:
        return next((goal.limit(budget) for goal in self.goals if isinstance(goal, MemoryGoal)), None)


# The data stages share, written once before the first stage (in this order) and reused by size:
# the synthetic embedding tree (handed to the runners), the VoxCeleb1-E-sized list and matrix.
DATA_MAKERS: dict[str, Callable[[argparse.Namespace], object]] = {
    "tree": ensure_tree, "vox1e": ensure_vox1e, "vox2": ensure_vox2, "blink": ensure_blink}
MODEL_MEMORY = MemoryGoal(("matrix_mb", "parameters_mb"))
TRAINING_MEMORY = MemoryGoal(("matrix_mb", "training_state_mb"))
EPOCH_TIME = StepTimeGoal(cpu=TRAIN_SLACK, gpu=GPU_TRAIN_SLACK)
# On a CPU both extractors are bound by arithmetic with one utterance a pass (ResNetSE34V2 at about
# 80 % of a large matrix product's FLOP rate on 2 cores), so batching cannot give 1.5x there: the
# goal on a CPU is not to be slower than the baseline (BENCHMARK.md, "Tests and benchmark").
EXTRACT_SPEED = RatioGoal(gpu=1.5, cpu=1.0)
# bfloat16 is meant for GPUs (a CPU without bfloat16 instructions emulates it): no goal on a CPU.
STAGES: tuple[Stage, ...] = (
    Stage("load", "utt/s", stage_load, "tree", (MODEL_MEMORY,)),
    Stage("data_path", "batch/s", stage_data_path, "tree", (RatioGoal(50.0, 50.0), MODEL_MEMORY)),
    Stage("train_mse", "utt/s", stage_train("train_mse", "normal", "MSE"), "tree",
          (EPOCH_TIME, TRAINING_MEMORY)),
    Stage("train_da_mse", "utt/s", stage_train("train_da_mse", "distribution", "DA_MSE"), "tree",
          (EPOCH_TIME, TRAINING_MEMORY)),
    Stage("score", "trial/s", stage_score, "tree", (RatioGoal(100.0, 100.0), MODEL_MEMORY)),
    Stage("score_vox1e", "trial/s", stage_score_vox1e, "vox1e", (MemoryGoal(("vox1e_mb",)),)),
    Stage("backend_asnorm", "trial/s", stage_backend_asnorm, "vox1e",
          (MemoryGoal(("vox1e_mb", "cohort_mb")),)),
    Stage("extract_ge2e", "utt/s", stage_extract("extract_ge2e", "GE2E"), goals=(EXTRACT_SPEED,)),
    Stage("extract_resnetse34v2", "utt/s", stage_extract("extract_resnetse34v2", "ResNetSE34V2"),
          goals=(EXTRACT_SPEED,)),
    Stage("extract_ge2e_bf16", "utt/s", stage_extract("extract_ge2e_bf16", "GE2E", mixedprec=True),
          goals=(RatioGoal(gpu=20.0, cpu=None),), bf16=True),
    Stage("extract_resnetse34v2_bf16", "utt/s",
          stage_extract("extract_resnetse34v2_bf16", "ResNetSE34V2", mixedprec=True),
          goals=(RatioGoal(gpu=4.0, cpu=None),), bf16=True),
    Stage("decode_wav", "file/s", stage_decode(".wav")),
    Stage("decode_m4a", "file/s", stage_decode(".m4a")),
    Stage("extract_resnetse34v2_m4a", "utt/s", stage_extract_m4a, goals=(RatioGoal(0.8, 0.8),)),
    Stage("pack_vox2", "file/s", stage_pack_vox2, "vox2"),
    Stage("store_open", "utt/s", stage_store_open, "vox2",
          (RatioGoal(100.0, 100.0), MemoryGoal(("vox2_matrix_mb",), STORE_OPEN_FACTOR))),
    Stage("train_vox2_steps", "step/s", stage_train_vox2_steps, "blink",
          (GrowthGoal(STEP_GROWTH), MemoryGoal(("step_limit_mb",), 1.0))),
)
STAGE = {stage.name: stage for stage in STAGES}


def warm_up(device: torch.device) -> None:
    """One tiny training step on `device`: torch's lazy imports, one-time buffers (about 70 MB on
    the first Adam step) and a GPU's context then belong to the baseline, not to the stage."""
    layer = torch.nn.Linear(4, 4).to(device)
    optimizer = torch.optim.Adam(layer.parameters(), fused=True)
    layer(torch.ones(2, 4, device=device)).sum().backward()
    optimizer.step()


def stage_child(name: str, args: argparse.Namespace, tree: Tree | None, send) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    warm_up(args.device)
    meter = PeakMeter()
    result = STAGE[name].runner(args, tree, meter)
    send.send((result, meter.base))


def run_isolated(name: str, args: argparse.Namespace, tree: Tree | None) -> tuple[StageResult, float]:
    """Run one stage in a forked child (its own peak memory); returns its result and base RSS."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=stage_child, args=(name, args, tree, send))
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = None
    process.join()
    if process.exitcode != 0 or result is None:
        raise SystemExit(f"bench: stage {name} failed (exit code {process.exitcode})")
    return result


# ----------------------------------------------------------------------------------------------
# Report


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(records: list[dict]) -> str:
    gpu = any(GPU_KEY in r for r in records)
    peak = any(PEAK_KEY in r for r in records)
    head = (f"{'name':<27}{'unit':>9}{'project/s':>14}{'baseline/s':>14}{'ratio':>9}"
            f"{'compute-only/s':>16}{'peak MB':>10}" + (f"{'GPU MB':>10}" if gpu else "")
            + (f"{'bf16 peak %':>13}" if peak else ""))
    lines = [head, "-" * len(head)]
    for r in records:
        fraction = r.get(PEAK_KEY)
        lines.append(f"{r['name']:<27}{STAGE[r['name']].unit:>9}{fmt(r['project_per_s']):>14}"
                     f"{fmt(r['baseline_per_s']):>14}{fmt(r['ratio'], 2):>9}"
                     f"{fmt(r.get(COMPUTE_KEY)):>16}{fmt(r['peak_rss_mb']):>10}"
                     + (f"{fmt(r.get(GPU_KEY)):>10}" if gpu else "")
                     + (f"{fmt(None if fraction is None else 100 * fraction, 2):>13}" if peak else ""))
    return "\n".join(lines)


def verdicts(records: list[dict], budget: MemoryBudget) -> list[str]:
    """One line per goal of the issue, met or not, in the order of each stage's goals."""
    lines = (goal.verdict(r, budget) for r in records for goal in STAGE[r["name"]].goals)
    return [line for line in lines if line is not None]


def machine_line(args: argparse.Namespace, seconds: float, load: tuple[float, float]) -> str:
    device = resolve_device(args.device)
    where = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device.type == "cuda"
             else "CPU only")
    threads = args.threads or torch.get_num_threads()
    return (f"machine: {where}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {threads} "
            f"intra-op threads, load average {load[0]:.1f} at start and {load[1]:.1f} at the end (other "
            f"processes may be running); bench wall time {seconds:.0f} s")


def memory_goal_lines(args: argparse.Namespace, records: list[dict], budget: MemoryBudget) -> list[str]:
    """What the memory goals are, in numbers."""
    limit = {name: STAGE[name].memory_limit(budget) for name in
             ("load", "train_mse", "score_vox1e", "backend_asnorm")}
    lines = [f"memory goal: {MEMORY_FACTOR} x (reduced matrix {args.utterances} x {args.dim} float32 = "
             f"{budget.matrix_mb:.1f} MB + {MODEL} parameters {budget.parameters_mb:.1f} MB) = "
             f"{limit['load']:.1f} MB; while training the model counts with its gradients and Adam's two "
             f"moments (4 x the parameters): {limit['train_mse']:.1f} MB"]
    if any(r["name"] == "store_open" for r in records):
        lines.append(f"memory goal of store_open: {STORE_OPEN_FACTOR} x the VoxCeleb2-shaped matrix "
                     f"{args.vox2_utterances} x {args.vox2_dim} float32 = {budget.vox2_matrix_mb:.1f} MB: "
                     f"{STAGE['store_open'].memory_limit(budget):.1f} MB; of train_vox2_steps: "
                     f"{budget.step_limit_mb:.1f} MB (8 GB)")
    if any(STAGE[r["name"]].needs == "vox1e" for r in records):
        lines.append(f"memory goal of the VoxCeleb1-E stages: {MEMORY_FACTOR} x (matrix "
                     f"{args.vox1e_utterances} x {args.dim} float32 = {budget.vox1e_mb:.1f} MB, for AS-Norm "
                     f"+ cohort {args.cohort_speakers} x {args.dim} = {budget.cohort_mb:.1f} MB) = "
                     f"{limit['score_vox1e']:.1f} MB, {limit['backend_asnorm']:.1f} MB")
    return lines


def report(args: argparse.Namespace, records: list[dict], notes: Iterable[str], base_rss: float,
           seconds: float, load: tuple[float, float]) -> None:
    budget = memory_budget(args)
    print()
    print(table(records))
    print()
    print(machine_line(args, seconds, load))
    print(f"peak MB: peak RSS of the stage's project path above its process before the stage (torch and "
          f"the project imported, one tiny Adam step taken: {base_rss:.0f} MB); the stage's data counts"
          + ("; GPU MB: torch's peak GPU allocation in the project path" if any(GPU_KEY in r for r in records)
             else ""))
    for line in memory_goal_lines(args, records, budget):
        print(line)
    for note in notes:
        print(f"note: {note}")
    print("goals:")
    print("\n".join(verdicts(records, budget)))


OPTIONS: Options = {
    "out": Option("bench_out", str, "folder of the synthetic data and the JSON"),
    "utterances": Option(50_000, int, "utterance files in the tree"),
    "speakers": Option(1_000, int, "speakers in the tree"),
    "sessions": Option(5, int, "sessions (categories) per speaker"),
    "crops": Option(10, int, "crops per utterance file"),
    "dim": Option(512, int, "embedding dimension"),
    "batch_size": Option(200, int, "training batch size"),
    "workers": Option(5, int, "nDataLoaderThread: loader threads and baseline workers"),
    "trials": Option(200_000, int, "trials to score"),
    "baseline_batches": Option(30, int, "batches or DA steps timed of the baseline"),
    "compute_batches": Option(100, int, "batches timed of the compute-only loop"),
    "baseline_trials": Option(20_000, int, "trials timed of the per-trial loop"),
    "vox1e_trials": Option(580_000, int, "trials of the VoxCeleb1-E-sized list"),
    "vox1e_utterances": Option(145_000, int, "utterances the VoxCeleb1-E-sized list pairs"),
    "cohort_speakers": Option(6_000, int, "AS-Norm cohort speakers (backend_asnorm)"),
    "audio_utterances": Option(16, int, "utterances of synthetic audio"),
    "audio_seconds": Option(12.0, float, "seconds per synthetic utterance"),
    "eval_frames": Option(400, int, "extraction crop length in frames"),
    "num_eval": Option(10, int, "extraction crops per utterance"),
    "extract_batch": Option(0, int, "utterances per extractor pass; 0: m_gen_embs' choice for the device"),
    "baseline_utterances": Option(4, int, "utterances timed one at a time"),
    "audio_files": Option(
        4000, int, f"files of each format (links to the synthetic utterances) in the decode and "
        f"m4a stages; the m4a stage takes at most {CPU_EXTRACT_FILES} of them on a CPU"),
    "vox2_utterances": Option(1_092_009, int, "files of the VoxCeleb2-shaped tree"),
    "vox2_speakers": Option(5_994, int, "speakers of the VoxCeleb2-shaped tree"),
    "vox2_videos": Option(145_000, int, "videos (folders) of the VoxCeleb2-shaped tree"),
    "vox2_crops": Option(10, int, "crops per file of the VoxCeleb2-shaped tree"),
    "vox2_dim": Option(256, int, "dimension of the VoxCeleb2- and VoxBlink2-sized data"),
    "vox2_processes": Option(2, int, "processes writing the VoxCeleb2-shaped tree"),
    "file_part": Option(100_000, int, "files store_open reads and scales (per-file side)"),
    "blink_rows": Option(9_904_382, int, "rows of the VoxBlink2-sized float16 store"),
    "blink_speakers": Option(111_284, int, "speakers of the VoxBlink2-sized store"),
    "blink_small_rows": Option(100_000, int, "rows of train_vox2_steps' small store"),
    "steps": Option(500, int, "training steps timed by train_vox2_steps"),
    "step_batch": Option(1_000, int, "batch size of train_vox2_steps"),
    "threads": Option(0, int, "torch intra-op threads (default: torch's, one a core)"),
    "min_seconds": Option(1.0, float, "repeat fast project timings this long"),
    "device": Option("auto", str, "auto, cpu or cuda: where every stage runs"),
    "stages": Option(tuple(stage.name for stage in STAGES), list, "stages to run (default: all, in order)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, OPTIONS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.stages if name not in STAGE]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGE)}")
    if args.utterances < 2 * args.speakers or args.sessions < 2:
        parser.error("need at least 2 utterances per speaker and 2 sessions")
    if (args.vox2_utterances < 2 * args.vox2_speakers or not 0 < args.file_part <= args.vox2_utterances
            or args.blink_rows < 2 * args.blink_speakers or args.blink_small_rows > args.blink_rows
            or args.blink_small_rows < args.step_batch):
        parser.error("need --vox2_utterances >= 2 x --vox2_speakers, 0 < --file_part <= "
                     "--vox2_utterances, --blink_rows >= 2 x --blink_speakers, --step_batch <= "
                     "--blink_small_rows <= --blink_rows")
    for name in ("baseline_batches", "compute_batches", "baseline_trials", "baseline_utterances", "trials",
                 "workers", "audio_files", "audio_utterances", "vox2_videos", "vox2_crops", "vox2_processes",
                 "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.vox1e_utterances < 4 or args.vox1e_trials < args.vox1e_utterances or args.cohort_speakers < 2:
        parser.error("need --vox1e_utterances >= 4, --vox1e_trials >= --vox1e_utterances (each utterance "
                     "enrols) and --cohort_speakers >= 2")
    return args


def skipped_bf16_stages(args: argparse.Namespace) -> list[str]:
    """The bfloat16 stages asked for that this machine skips: on a CPU without bfloat16 instructions."""
    device = resolve_device(args.device)
    if device.type != "cpu" or bf16_is_native(device):
        return []
    return [name for name in args.stages if STAGE[name].bf16]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    needs = {STAGE[name].needs for name in args.stages}
    made = {need: make(args) for need, make in DATA_MAKERS.items() if need in needs}
    tree = made.get("tree")
    records, notes, base_rss = [], [], 0.0
    for name in skipped_bf16_stages(args):
        notes.append(f"{name}: skipped: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), where "
                     "bfloat16 is emulated and many times slower than float32 (m_gen_embs --mixedprec "
                     "runs float32 there)")
        args.stages = [stage for stage in args.stages if stage != name]
    for name in (stage.name for stage in STAGES if stage.name in args.stages):
        say(f"stage {name} ...")
        began = time.perf_counter()
        result, base_rss = run_isolated(name, args, tree)
        say(f"stage {name} done in {time.perf_counter() - began:.1f} s")
        records.append(result.record)
        notes += result.notes
    report(args, records, notes, base_rss, time.perf_counter() - started, (load_start, os.getloadavg()[0]))
    path = Path(args.out) / "bench.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
