"""The bench's data makers (tests/bench.py): synthetic embedding trees, trial lists, audio and
packed stores, each written once under OUT/data and reused by size (a `.complete` marker, written
last, names the shape)."""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import soundfile
from audio_files import write_encoded
from bench_measure import SEED, say
from tqdm import tqdm

from m_gen_list import make_lists
from models.m_Features import SAMPLE_RATE
from stores.arrays import EMBEDDING_TYPES
from stores.pack import speaker_embeddings
from stores.write import StoreBuilder

LIST_NAME = "bench"
EMBEDDING_TYPE = {"normal": "B", "distribution": "C"}  # multiple_embedding_flag of each list's runs
VOX1_SPEAKERS = 1251  # VoxCeleb1's speakers, whose utterances the VoxCeleb1-E list pairs
VIDEO_ID = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"))


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
        say(
            f"writing a synthetic tree of {args.utterances} utterances ({args.crops}, {args.dim}) "
            f"under {tree.root} (once)"
        )
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
        block = (
            rng.standard_normal(args.dim)
            + offsets[session][:, None]
            + rng.standard_normal((count, args.crops, args.dim))
        ).astype(np.float32)
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
    return [
        0.1 * np.sin(2 * np.pi * rng.uniform(100, 3000, (3, 1)) * t).sum(axis=0)
        + 0.02 * rng.standard_normal(len(t))
        for _ in range(count)
    ]


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


def make_trials(
    speaker: np.ndarray, count: int, rng: np.random.Generator, every_utterance: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trials alternately of the same speaker (another utterance) and of a random utterance; the
    enrolment (left) utterances at random, or with `every_utterance` each in turn, in random order."""
    order = np.argsort(speaker, kind="stable")
    sizes = np.bincount(speaker)
    starts = np.cumsum(sizes) - sizes
    position = np.empty(len(speaker), np.int64)
    position[order] = np.arange(len(speaker)) - starts[speaker[order]]
    left = (
        rng.permutation(np.arange(count) % len(speaker))
        if every_utterance
        else rng.integers(len(speaker), size=count)
    )
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
    say(
        f"writing a trial list of {args.vox1e_trials} lines over {args.vox1e_utterances} utterances "
        f"under {data.root} (once)"
    )
    rng = np.random.default_rng(SEED)
    speakers = vox1e_speakers(args.vox1e_utterances)
    counts = np.diff(np.linspace(0, args.vox1e_utterances, speakers + 1).astype(np.int64))
    videos = (counts + 7) // 8
    video_ids = ["".join(chars) for chars in VIDEO_ID[rng.integers(len(VIDEO_ID), size=(videos.sum(), 11))]]
    first_video = np.cumsum(videos) - videos
    # Sorted as TrialSet orders its rows; the speaker's id leads, so each speaker's rows stay together.
    names = sorted(
        f"id{10270 + index:05d}/{video_ids[first_video[index] + u // 8]}/{u % 8 + 1:05d}.wav"
        for index, count in enumerate(counts)
        for u in range(count)
    )
    speaker = np.repeat(np.arange(speakers), counts)
    left, right, labels = make_trials(speaker, args.vox1e_trials, rng, every_utterance=True)
    data.root.mkdir(parents=True, exist_ok=True)
    with open(data.list_path, "w") as file:
        file.writelines(
            f"{label} {names[i]} {names[j]}\n" for label, i, j in zip(labels, left, right, strict=True)
        )
    matrix = rng.standard_normal((len(names), args.dim), dtype=np.float32)
    centres = rng.standard_normal((speakers, args.dim), dtype=np.float32)
    for start in range(0, len(matrix), 4096):
        block = matrix[start : start + 4096]
        block += centres[speaker[start : start + 4096]]
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
    block += (
        rng.standard_normal(dim, dtype=np.float32)
        + rng.standard_normal((videos, dim), dtype=np.float32)[video]
    )[:, None]
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
        raise SystemExit(
            f"bench: {folder} has {free / 2**30:.1f} GiB free, the data needs about "
            f"{needed / 2**30:.1f} GiB; make the size smaller"
        )


def ensure_vox2(args: argparse.Namespace) -> Vox2:
    """The VoxCeleb2-shaped tree of this size, written unless complete (--vox2_processes writers)."""
    data = vox2_of(args)
    written_once(data.root, vox2_shape(args), "the VoxCeleb2-shaped tree", lambda: write_vox2(data, args))
    return data


def write_vox2(data: Vox2, args: argparse.Namespace) -> None:
    """Write the VoxCeleb2-shaped tree, its normal list and the per-file part (--vox2_processes writers)."""
    size = args.vox2_utterances * 4096 * (-(-(128 + 4 * args.vox2_crops * args.vox2_dim) // 4096))
    check_disk(data.root, size)
    say(
        f"writing a VoxCeleb2-shaped tree of {args.vox2_utterances} files ({args.vox2_crops}, "
        f"{args.vox2_dim}) under {data.root} (once, {size / 2**30:.1f} GiB)"
    )
    counts = spread(args.vox2_utterances, args.vox2_speakers)
    videos = spread(args.vox2_videos, args.vox2_speakers)
    tasks = [
        (data.embed_dir, args.vox2_crops, args.vox2_dim, k, int(n), int(max(1, min(v, n))))
        for k, (n, v) in enumerate(zip(counts, videos, strict=True))
    ]
    with (
        multiprocessing.get_context("fork").Pool(args.vox2_processes) as pool,
        open(data.list_path, "w") as listed,
    ):
        for lines in tqdm(
            pool.imap(write_vox2_speaker, tasks, chunksize=4),
            total=len(tasks),
            desc="speakers",
            unit="spk",
            leave=False,
        ):
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
    return Blink(
        Path(args.out) / "data" / f"blink_r{args.blink_rows}_s{args.blink_speakers}_"
        f"small{args.blink_small_rows}_dim{args.vox2_dim}"
    )


def ensure_blink(args: argparse.Namespace) -> Blink:
    """Both stores, each written unless complete, in a child process (the keys of 9.9M rows take
    about a GB there, not in the bench's main process)."""
    data = blink_of(args)
    for size, (rows, speakers) in blink_sizes(args).items():
        if (data.root / f".{size}_complete").is_file():
            say(f"reusing the {rows}-row float16 store {data.store(size)}")
            continue
        check_disk(data.root, rows * (args.vox2_dim * 2 + 60))
        say(
            f"writing a {rows} x {args.vox2_dim} float16 store of {speakers} speakers, "
            f"{data.store(size)} (once)"
        )
        write_in_child(data.store(size), data.list_path(size), rows, speakers, args.vox2_dim, "float16")
        (data.root / f".{size}_complete").touch()
    return data


def write_in_child(store: Path, list_path: Path, rows: int, speakers: int, dim: int, dtype: str) -> None:
    """write_store in a forked child process: what it holds is freed with the process."""
    process = multiprocessing.get_context("fork").Process(
        target=write_store, args=(store, list_path, rows, speakers, dim, dtype)
    )
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"bench: writing {store} failed (exit code {process.exitcode})")


STORE_BLOCK = 65536  # rows generated and written at a time: the float32 matrix is never whole


def store_rows(rows: int, speakers: int) -> tuple[list[str], np.ndarray, list[str]]:
    """The speakers' names, the speaker of each row and each row's key (`<spk>/<video>/<nnnnn>`, 8
    utterances a video) of a bench store: `rows` spread over `speakers`, in order."""
    counts = spread(rows, speakers)
    speaker_of = np.repeat(np.arange(speakers, dtype=np.int32), counts)
    within = np.arange(rows) - np.repeat(np.cumsum(counts) - counts, counts)
    names = [f"id{k:06d}" for k in range(speakers)]
    keys = [
        f"{names[s]}/v{w // 8:04d}/{w % 8 + 1:05d}"
        for s, w in zip(speaker_of.tolist(), within.tolist(), strict=True)
    ]
    return names, speaker_of, keys


def write_store(store: Path, list_path: Path, rows: int, speakers: int, dim: int, dtype: str) -> None:
    """A `dtype` store of random unit vectors (a speaker's centre plus noise) straight through
    StoreBuilder, block by block; its B and C tables are the centres; and its normal list."""
    rng = np.random.default_rng([SEED, rows])
    names, speaker_of, keys = store_rows(rows, speakers)
    centres = rng.standard_normal((speakers, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    with StoreBuilder(store, rows, dim, dtype) as builder:
        for start in tqdm(range(0, rows, STORE_BLOCK), desc="rows", unit="block", leave=False):
            block = centres[speaker_of[start : start + STORE_BLOCK]]
            block += 0.1 * rng.standard_normal(block.shape, dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            builder.put(start, block, np.ones(len(block), np.float32))
        builder.finish(
            keys,
            names,
            speaker_of,
            {name: centres for name in EMBEDDING_TYPES},
            {"source": "bench (random unit vectors)", "source_kind": "arrays", "stamp": None},
        )
    with open(list_path, "w") as listed:
        for start in range(0, rows, STORE_BLOCK):
            listed.writelines(f"{key.split('/', 1)[0]} {key}\n" for key in keys[start : start + STORE_BLOCK])


# ----------------------------------------------------------------------------------------------
# VoxCeleb-sized stores (issue 25): a VoxCeleb2-sized training store and a VoxCeleb1-shaped test
# store with a trial list of the H list's size


@dataclass(frozen=True)
class StoreData:
    """A bench store (`<name>.store`) and the normal list of all its rows, under `root`."""

    root: Path
    name: str

    @property
    def store(self) -> Path:
        return self.root / f"{self.name}.store"

    @property
    def list_path(self) -> Path:
        return self.root / f"{self.name}_normal_list.txt"


@dataclass(frozen=True)
class Vox1h:
    """The VoxCeleb1-shaped float32 store (`test`) and a trial list of the H list's size over the
    utterances of its first --vox1h_trial_speakers speakers, with the training store (`train`)."""

    test: StoreData
    train: StoreData

    @property
    def trial_list(self) -> Path:
        return self.test.root / "vox1h_test_list.txt"


def vox2_store_shape(args: argparse.Namespace) -> dict[str, int]:
    return {"rows": args.vox2_utterances, "speakers": args.vox2_speakers, "dim": args.vox2_dim}


def vox1h_shape(args: argparse.Namespace) -> dict[str, int]:
    return {
        "rows": args.vox1h_utterances,
        "speakers": args.vox1h_speakers,
        "trial_speakers": args.vox1h_trial_speakers,
        "trials": args.vox1h_trials,
        "dim": args.vox2_dim,
    }


def folder_of(args: argparse.Namespace, prefix: str, shape: dict[str, int]) -> Path:
    return Path(args.out) / "data" / (prefix + "_".join(f"{key}{value}" for key, value in shape.items()))


def vox2_store_of(args: argparse.Namespace) -> StoreData:
    return StoreData(folder_of(args, "vox2store_", vox2_store_shape(args)), "vox2")


def vox1h_of(args: argparse.Namespace) -> Vox1h:
    return Vox1h(StoreData(folder_of(args, "vox1h_", vox1h_shape(args)), "vox1"), vox2_store_of(args))


def ensure_vox2_store(args: argparse.Namespace) -> StoreData:
    """The VoxCeleb2-sized float32 store (--vox2_utterances x --vox2_dim, --vox2_speakers) and its
    normal list, written unless complete."""
    data = vox2_store_of(args)
    shape = vox2_store_shape(args)

    def write() -> None:
        check_disk(data.root, shape["rows"] * (shape["dim"] * 4 + 60))
        say(
            f"writing a {shape['rows']} x {shape['dim']} float32 store of {shape['speakers']} speakers, "
            f"{data.store} (once)"
        )
        write_in_child(data.store, data.list_path, shape["rows"], shape["speakers"], shape["dim"], "float32")

    written_once(data.root, shape, "the VoxCeleb2-sized store", write)
    return data


def ensure_vox1h(args: argparse.Namespace) -> Vox1h:
    """The training store (ensure_vox2_store) and the VoxCeleb1-shaped store with its H-sized trial
    list, each written unless complete."""
    ensure_vox2_store(args)
    data = vox1h_of(args)
    shape = vox1h_shape(args)

    def write() -> None:
        say(
            f"writing a {shape['rows']} x {shape['dim']} float32 store of {shape['speakers']} speakers "
            f"and a list of {shape['trials']} trials over {shape['trial_speakers']} of them, "
            f"under {data.test.root} (once)"
        )
        write_in_child(
            data.test.store, data.test.list_path, shape["rows"], shape["speakers"], shape["dim"], "float32"
        )
        write_trial_list(
            data.trial_list, shape["rows"], shape["speakers"], shape["trial_speakers"], shape["trials"]
        )

    written_once(data.test.root, shape, "the VoxCeleb1-shaped store and its H-sized list", write)
    return data


def write_trial_list(path: Path, rows: int, speakers: int, trial_speakers: int, trials: int) -> None:
    """`trials` lines `label a.wav b.wav` over the rows of the first `trial_speakers` speakers of a
    store_rows store: each of their utterances enrols in turn, alternately against another
    utterance of its speaker and a random one of theirs (make_trials)."""
    _, speaker_of, keys = store_rows(rows, speakers)
    used = int(np.searchsorted(speaker_of, trial_speakers))
    left, right, labels = make_trials(
        speaker_of[:used], trials, np.random.default_rng(SEED), every_utterance=True
    )
    with open(path, "w") as file:
        file.writelines(
            f"{label} {keys[a]}.wav {keys[b]}.wav\n"
            for label, a, b in zip(labels.tolist(), left.tolist(), right.tolist(), strict=True)
        )


# The data stages share, written once before the first stage (in this order) and reused by size:
# the synthetic embedding tree (handed to the runners), the VoxCeleb1-E-sized list and matrix, the
# VoxCeleb2-shaped tree, the VoxBlink2-sized stores, the VoxCeleb2-sized store and the
# VoxCeleb1-shaped one.
DATA_MAKERS: dict[str, Callable[[argparse.Namespace], object]] = {
    "tree": ensure_tree,
    "vox1e": ensure_vox1e,
    "vox2": ensure_vox2,
    "blink": ensure_blink,
    "vox2_store": ensure_vox2_store,
    "vox1h": ensure_vox1h,
}
