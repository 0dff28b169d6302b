"""The data path, in one place: list files -> embedding stores -> in-memory arrays -> batches.

Embeddings come from a store (`open_embeddings`): the project's tree of `.npy` files (one per
utterance, `(crops, D)` or `(D,)`), a Kaldi `.scp` with its `.ark` files (WeSpeaker, 3D-Speaker),
or a packed store (`*.store`: one memory-mapped matrix with its index, norms, durations and the
speaker embeddings; m_comb_embs.py writes one beside each tree or `.scp`, and a tree or `.scp`
with a fresh packed store is read from it). Every embedding named by a list is reduced once to its
single-utterance embedding (mean over crops, then L2 norm) and kept in one matrix; batches are
index lookups into that matrix. List kinds (normal, triplet, distribution, test trials) are small
classes that know their fields, how m_gen_list.py writes them and what a batch gathers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from m_utils import (
    LOCK_NAME,
    SINGLE,
    DistContext,
    UserError,
    save_npy_atomic,
    user_text_lines,
    write_error,
    write_text_atomic,
)
from scoring.metrics import l2_normalize

log = logging.getLogger("m_DataLoader")

# Audio files a list may name; the matching `.npy` is meant (m_gen_embs reads them all).
AUDIO_SUFFIXES = (".wav", ".flac", ".m4a", ".mp3", ".ogg", ".opus")
LOAD_BLOCK = 512  # files one reader thread loads at a time


@dataclass(frozen=True)
class EmbeddingType:
    """One value of the `multiple_embedding_flag` option: how a speaker's utterances combine into
    its multi-utterance embedding, the file that holds it, and how trials are scored."""

    speaker_file: str   # name pattern beside the speaker folders
    combine: str        # avg-norm-avg or avg-avg-norm
    cosine: bool        # trials scored by cosine distance (else by L2 distance)


EMBEDDING_TYPES = {
    "B": EmbeddingType("{}.npy", "avg-norm-avg", cosine=False),
    "C": EmbeddingType("{}_type2.npy", "avg-avg-norm", cosine=True),
}


def embedding_type_of(name: str) -> EmbeddingType:
    """The EmbeddingType of `multiple_embedding_flag` B or C; anything else is a UserError."""
    if name not in EMBEDDING_TYPES:
        raise UserError(f"multiple_embedding_flag must be B or C, found {name!r}")
    return EMBEDDING_TYPES[name]


def combine_speaker(means: np.ndarray, embedding_type: str) -> np.ndarray:
    """A speaker's (D,) float32 embedding of `embedding_type` (B or C) from its utterances' crop
    means (U, D)."""
    if embedding_type_of(embedding_type).combine == "avg-norm-avg":
        return l2_normalize(means).mean(axis=0).astype(np.float32)
    return l2_normalize(means.mean(axis=0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Corpora: the utterances m_gen_list.py writes lists of


@dataclass
class Corpus:
    """Utterances of an embedding store: list path, speaker and category (a session, a video)."""

    paths: list[str]
    speaker: np.ndarray   # (N,) speaker index into `speakers`; files are sorted by speaker
    category: list[str]
    speakers: list[str]

    def span(self, index: int) -> tuple[int, int]:
        """Files are sorted by speaker, so each speaker's utterances are one range [lo, hi)."""
        return (int(np.searchsorted(self.speaker, index, "left")),
                int(np.searchsorted(self.speaker, index, "right")))

    def of_speaker(self, index: int) -> np.ndarray:
        lo, hi = self.span(index)
        return np.arange(lo, hi)


TRIALS_PER_UTTERANCE = 4  # same-speaker and different-speaker trials per utterance, each


def speaker_pairs(paths_by_category: dict[str, list[str]]) -> tuple[list, list]:
    """Same-category pairs (consecutive files of each category) and as many different-category
    pairs, each taking one remaining file of the category with the fewest remaining files and
    one of the category with the most, while two categories have files left."""
    same = [(files[k], files[k + 1]) for files in paths_by_category.values()
            for k in range(0, len(files) - 1, 2)]
    remaining = {cat: list(files) for cat, files in paths_by_category.items()}
    different = []
    while len(different) < len(same):
        left = [cat for cat in remaining if remaining[cat]]
        if len(left) < 2:
            break
        fewest = min(left, key=lambda cat: len(remaining[cat]))
        most = max((cat for cat in left if cat != fewest), key=lambda cat: len(remaining[cat]))
        different.append((remaining[fewest].pop(0), remaining[most].pop(0)))
    return same, different


# ----------------------------------------------------------------------------------------------
# List kinds: each knows its fields, how its lines are read and written, and (for the kinds a
# network trains on) which files a list names, what a batch gathers and how an epoch samples it.


class ListKind:
    """A kind of list file: `fields` per line, read by `parse`, written by `lines`."""

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    binary: ClassVar[dict[int, str]] = {}  # field index -> name of a 0/1 field

    def line_parser(self, path: Path) -> Callable[[list[str], int], tuple]:
        """The parser of one file's lines (a kind whose format is detected per file keeps state)."""
        return partial(self.parse, path=path)

    def parse(self, parts: list[str], path: Path, lineno: int) -> tuple:
        if len(parts) != len(self.fields):
            raise UserError(f"{path}:{lineno}: a {self.name} list line has {len(self.fields)} fields "
                            f"({' '.join(self.fields)}), this one has {len(parts)}: {' '.join(parts)!r}")
        if not self.binary:
            return tuple(parts)
        for index, what in self.binary.items():
            parts[index] = _binary(parts[index], path, lineno, what)
        return tuple(parts)

    def lines(self, corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
        raise NotImplementedError


def _binary(value: str, path: Path, lineno: int, what: str) -> int:
    if value not in ("0", "1"):
        raise UserError(f"{path}:{lineno}: {what} must be 0 or 1, found {value!r}")
    return int(value)


class TrialKind(ListKind):
    """Trials, `label path1 path2` (the project's and VoxCeleb1's) or Kaldi/WeSpeaker's
    `enroll test target|nontarget`, detected per file from its first line."""

    name = "test"
    fields = ("label", "path1", "path2")
    KALDI_LABELS: ClassVar[dict[str, int]] = {"target": 1, "nontarget": 0}

    def line_parser(self, path: Path) -> Callable[[list[str], int], tuple]:
        style: list[str] = []

        def parse(parts: list[str], lineno: int) -> tuple:
            """A line of either style; the file's first line decides which."""
            here = "kaldi" if len(parts) == 3 and parts[2] in self.KALDI_LABELS else "label"
            if not style:
                style.append(here)
            elif here != style[0]:
                raise UserError(f"{path}:{lineno}: a {style[0]}-style trial list ("
                                f"{self.style_text(style[0])}) has a line of the other style: "
                                f"{' '.join(parts)!r}")
            if here == "kaldi":
                return self.KALDI_LABELS[parts[2]], parts[0], parts[1]
            return self.parse(parts, path, lineno)
        return parse

    @staticmethod
    def style_text(style: str) -> str:
        return "enroll test target|nontarget" if style == "kaldi" else "label path1 path2"

    def parse(self, parts: list[str], path: Path, lineno: int) -> tuple:
        if len(parts) != 3:
            raise UserError(f"{path}:{lineno}: a test list line has 3 fields (label path1 path2, "
                            f"or enroll test target|nontarget), this one has {len(parts)}: "
                            f"{' '.join(parts)!r}")
        return (_binary(parts[0], path, lineno, "label"), parts[1], parts[2])

    def lines(self, corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
        """Per utterance, up to 4 same-speaker and 4 other-speaker trials, written 1, 0, 1, 0, ..."""
        lines = []
        n = len(corpus.paths)
        for i, path in enumerate(corpus.paths):
            lo, hi = corpus.span(corpus.speaker[i])
            same = lo + rng.choice(hi - lo - 1, size=min(TRIALS_PER_UTTERANCE, hi - lo - 1),
                                   replace=False)
            same = np.where(same < i, same, same + 1)
            others = n - (hi - lo)
            picks = rng.choice(others, size=min(TRIALS_PER_UTTERANCE, others), replace=False)
            different = np.where(picks < lo, picks, picks + (hi - lo))
            missing["same-speaker trials"] += TRIALS_PER_UTTERANCE - len(same)
            missing["different-speaker trials"] += TRIALS_PER_UTTERANCE - len(different)
            for k in range(TRIALS_PER_UTTERANCE):
                if k < len(same):
                    lines.append(f"1 {path} {corpus.paths[same[k]]}")
                if k < len(different):
                    lines.append(f"0 {path} {corpus.paths[different[k]]}")
        return lines


class TrainingKind(ListKind):
    """A list a network trains on (`spk path ...`): one row of inputs per record, its speaker's
    embedding as target. `gathered` names the Batch fields gathered from a table of
    EmbeddingData (by row); the other fields are values."""

    fields = ("spk", "path")
    gathered: ClassVar[dict[str, str]] = {"inputs": "table", "targets": "speaker_embeddings"}

    def files(self, records: list[tuple]) -> list[str]:
        return [r[1] for r in records]

    def speakers(self, records: list[tuple]) -> set[str]:
        """The speakers whose embeddings the list's batches use."""
        return {r[0] for r in records}

    def index(self, data: EmbeddingData, records: list[tuple], row_of: dict[str, int],
              target_of: dict[str, int]) -> list[str]:
        """Set the record arrays of `data`; returns each record's speaker."""
        data.rows = np.array([row_of[r[1]] for r in records], np.int64)
        return [r[0] for r in records]

    def file_rows(self, data: EmbeddingData) -> tuple[np.ndarray, np.ndarray]:
        """(rows of `embeddings`, their speaker index) of every record's files."""
        return data.rows, data.target

    def batch_indices(self, data: EmbeddingData, records: np.ndarray,
                      batch: np.ndarray | None) -> dict[str, np.ndarray]:
        return {"inputs": data.rows[records], "targets": data.target[records],
                "labels": data.label[records]}

    def global_batches(self, data: EmbeddingData, rng: np.random.Generator, batch_size: int,
                       world_size: int, n_per_speaker: int, max_seg_per_spk: int,
                       speakers_per_step: int, shuffle: bool) -> list[np.ndarray]:
        if n_per_speaker > 1:
            return speaker_grouped_batches(data.target, batch_size * world_size, n_per_speaker,
                                           max_seg_per_spk, rng)
        order = rng.permutation(len(data)) if shuffle else np.arange(len(data))
        step = batch_size * world_size
        return [order[i:i + step] for i in range(0, len(order), step)]

    def rank_part(self, data: EmbeddingData, items: np.ndarray, ctx: DistContext,
                  n_per_speaker: int) -> tuple[np.ndarray, float] | None:
        if n_per_speaker > 1:
            groups = items.reshape(-1, n_per_speaker)
            mine = shard(groups, ctx)
            return None if mine is None else (mine[0].reshape(-1), mine[1])
        return shard(items, ctx)


class NormalKind(TrainingKind):
    name = "normal"

    def lines(self, corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
        return [f"{corpus.speakers[s]} {path}" for s, path in zip(corpus.speaker, corpus.paths,
                                                                 strict=True)]


class TripletKind(TrainingKind):
    """`spk path other_spk`: a batch also gathers the other speaker's embedding."""

    name = "triplet"
    fields = ("spk", "path", "other_spk")
    gathered = {**TrainingKind.gathered, "others": "speaker_embeddings"}

    def speakers(self, records: list[tuple]) -> set[str]:
        return {r[0] for r in records} | {r[2] for r in records}

    def index(self, data: EmbeddingData, records: list[tuple], row_of: dict[str, int],
              target_of: dict[str, int]) -> list[str]:
        data.other_target = np.array([target_of[r[2]] for r in records], np.int64)
        return super().index(data, records, row_of, target_of)

    def batch_indices(self, data: EmbeddingData, records: np.ndarray,
                      batch: np.ndarray | None) -> dict[str, np.ndarray]:
        return {**super().batch_indices(data, records, batch), "others": data.other_target[records]}

    def lines(self, corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
        """`spk path other_spk`, other_spk a random different speaker."""
        count = len(corpus.speakers)
        if count < 2:
            missing["triplets (a single speaker)"] += len(corpus.paths)
            return []
        shift = rng.integers(1, count, size=len(corpus.paths))
        other = (corpus.speaker + shift) % count
        return [f"{corpus.speakers[s]} {path} {corpus.speakers[o]}"
                for s, path, o in zip(corpus.speaker, corpus.paths, other, strict=True)]


class DistributionKind(TrainingKind):
    """`spk path1 path2 flag` pairs (flag 1: same category): a batch is whole speakers' pairs,
    same-category pairs first, laid out as rows (2p, 2p + 1)."""

    name = "distribution"
    fields = ("spk", "path1", "path2", "flag")
    binary = {3: "flag"}

    def files(self, records: list[tuple]) -> list[str]:
        return [r[1] for r in records] + [r[2] for r in records]

    def index(self, data: EmbeddingData, records: list[tuple], row_of: dict[str, int],
              target_of: dict[str, int]) -> list[str]:
        data.pair_a = np.array([row_of[r[1]] for r in records], np.int64)
        data.pair_b = np.array([row_of[r[2]] for r in records], np.int64)
        data.pair_same = np.array([r[3] == 1 for r in records], bool)
        return [r[0] for r in records]

    def file_rows(self, data: EmbeddingData) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([data.pair_a, data.pair_b]), np.concatenate([data.target, data.target])

    def batch_indices(self, data: EmbeddingData, records: np.ndarray,
                      batch: np.ndarray | None) -> dict[str, np.ndarray]:
        keys = (~data.pair_same[records], data.target[records]) + (() if batch is None else (batch,))
        pairs = records[np.lexsort(keys)]
        per_row = np.repeat(pairs, 2)
        return {"inputs": np.stack([data.pair_a[pairs], data.pair_b[pairs]], axis=1).reshape(-1),
                "targets": data.target[per_row], "labels": data.label[per_row],
                "pair_same": data.pair_same[pairs], "pair_speaker": data.target[pairs]}

    def global_batches(self, data: EmbeddingData, rng: np.random.Generator, batch_size: int,
                       world_size: int, n_per_speaker: int, max_seg_per_spk: int,
                       speakers_per_step: int, shuffle: bool) -> list[np.ndarray]:
        groups = data.speaker_pairs()
        order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
        step = speakers_per_step * world_size
        return [np.concatenate([groups[g] for g in order[i:i + step]])
                for i in range(0, len(order), step)]

    def rank_part(self, data: EmbeddingData, items: np.ndarray, ctx: DistContext,
                  n_per_speaker: int) -> tuple[np.ndarray, float] | None:
        return data._speaker_shard(items, ctx)

    def lines(self, corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
        lines = []
        for s, spk in enumerate(corpus.speakers):
            by_category: dict[str, list[str]] = {}
            for i in corpus.of_speaker(s):
                by_category.setdefault(corpus.category[i], []).append(corpus.paths[i])
            same, different = speaker_pairs(by_category)
            missing["different-category pairs"] += len(same) - len(different)
            lines += [f"{spk} {a} {b} 1" for a, b in same]
            lines += [f"{spk} {a} {b} 0" for a, b in different]
        return lines


# In m_gen_list.py's order: a list's random stream is seeded by its position here.
LIST_KINDS: dict[str, ListKind] = {kind.name: kind for kind in (
    NormalKind(), TrialKind(), TripletKind(), DistributionKind())}


def list_kind(kind: str | ListKind) -> ListKind:
    """The ListKind named `kind` (normal, test, triplet, distribution); unknown is a UserError."""
    if isinstance(kind, ListKind):
        return kind
    if kind not in LIST_KINDS:
        raise UserError(f"unknown list kind '{kind}'; known: {', '.join(LIST_KINDS)}")
    return LIST_KINDS[kind]


def training_kind(kind: str | ListKind) -> TrainingKind:
    found = list_kind(kind)
    if not isinstance(found, TrainingKind):
        raise UserError(f"a {found.name} list is not a training list (normal, triplet, distribution)")
    return found


# ----------------------------------------------------------------------------------------------
# List files


def iter_list(path: str | os.PathLike, kind: str | ListKind) -> Iterator[tuple]:
    """The records of a list file of `kind`, one line at a time; blank lines and `#` comments are
    skipped. Labels and flags come back as ints (0/1). Errors name the file and line."""
    kind = list_kind(kind)
    parse = kind.line_parser(Path(path))
    plain = len(kind.fields) if not kind.binary and type(kind).line_parser is ListKind.line_parser else 0
    for lineno, line in enumerate(user_text_lines(path, "list file", "m_gen_list.py"), start=1):
        parts = line.split()
        if not parts or parts[0][0] == "#":
            continue
        yield tuple(parts) if len(parts) == plain else parse(parts, lineno=lineno)


def read_list(path: str | os.PathLike, kind: str | ListKind) -> list[tuple]:
    """All records of a list file of `kind` (iter_list); an empty list is a UserError."""
    records = list(iter_list(path, kind))
    if not records:
        raise UserError(f"{path}: the {list_kind(kind).name} list is empty")
    return records


def read_trials(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A trial list as arrays: labels (int8), the rows of each trial's two files (int64) in the
    sorted list of the files it names, and that list. Parsed line by line, keeping only the
    distinct paths: a VoxCeleb1-E list (580,000 lines) never has its lines in memory all at once."""
    row_of: dict[str, int] = {}
    labels, rows = array("b"), array("q")
    for label, first, second in iter_list(path, "test"):
        labels.append(label)
        rows.append(row_of.setdefault(first, len(row_of)))
        rows.append(row_of.setdefault(second, len(row_of)))
    if not labels:
        raise UserError(f"{path}: the test list is empty")
    files = sorted(row_of)
    sorted_row = np.empty(len(files), np.int64)
    sorted_row[[row_of[name] for name in files]] = np.arange(len(files))
    pairs = sorted_row[np.frombuffer(rows, np.int64)].reshape(-1, 2)
    return np.array(labels, np.int8), pairs[:, 0].copy(), pairs[:, 1].copy(), files


def line_naming(list_path: str | os.PathLike, rel: str) -> int | None:
    """The first line of a list file that names `rel` (for error messages), None if none does."""
    try:
        with open(list_path, errors="replace") as file:
            for lineno, line in enumerate(file, start=1):
                if rel in line.split():
                    return lineno
    except OSError:
        return None
    return None


def embedding_file(root: str | os.PathLike, rel: str) -> Path:
    """The `.npy` of a list entry; a `.wav`/`.flac` suffix in a list means the matching `.npy`."""
    path = Path(root) / rel
    if path.suffix.lower() in AUDIO_SUFFIXES:
        path = path.with_suffix(".npy")
    return path


# ----------------------------------------------------------------------------------------------
# Embedding files -> arrays


def check_embedding(array: np.ndarray, path: Path | str, dim: int | None = None,
                    finite: bool = True) -> np.ndarray:
    """Validate an embedding file's array: (crops, D) or (D,), of dimension `dim`, finite (unless
    the caller checks that of many arrays at once)."""
    if array.ndim not in (1, 2) or array.size == 0:
        raise UserError(f"{path}: expected an embedding of shape (crops, D) or (D,), "
                        f"found shape {array.shape}")
    if dim is not None and array.shape[-1] != dim:
        raise UserError(f"{path}: embedding dimension {array.shape[-1]} does not match nOut {dim}")
    if finite and not np.isfinite(array).all():
        raise UserError(f"{path}: embedding holds NaN or infinite values")
    return array


_NPY_HEADER_LOCK = threading.Lock()
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple, bool]] = {}  # header bytes -> dtype, shape, order


def _npy_header(head: bytes) -> tuple[np.dtype, tuple, bool]:
    """The parsed header of a .npy (its bytes up to the data). The trees hold a few distinct
    headers, so each is parsed once: numpy parses with ast.literal_eval, slow next to the read,
    and CPython 3.11's parser can fail spuriously when threads parse at once (python/cpython#106905)."""
    found = _NPY_HEADERS.get(head)
    if found is None:
        with _NPY_HEADER_LOCK:
            file = io.BytesIO(head)
            version = np.lib.format.read_magic(file)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = reader(file)
            found = (dtype, shape, fortran_order)
            if len(_NPY_HEADERS) < 4096:
                _NPY_HEADERS[head] = found
    return found


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """np.load of one .npy file in one read, safe from many threads at once (see _npy_header)."""
    with open(path, "rb") as file:
        data = bytearray(os.fstat(file.fileno()).st_size)
        got = file.readinto(data)
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    if data[6] == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] == 2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        return np.lib.format.read_array(io.BytesIO(data[:got]), allow_pickle=False)
    dtype, shape, fortran_order = _npy_header(bytes(data[:end]))
    if dtype.hasobject:
        raise ValueError("holds Python objects, which are not loaded")
    count = int(np.prod(shape, dtype=np.int64))
    available = max(0, got - end) // dtype.itemsize
    if available < count:
        raise ValueError(f"truncated: {available} of {count} values")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return values.reshape(shape, order="F" if fortran_order else "C")


def read_embedding(path: Path | str, dim: int | None = None, finite: bool = True) -> np.ndarray:
    try:
        array = read_npy(path)
    except FileNotFoundError:
        raise UserError(f"{path}: embedding file not found (m_gen_embs.py writes them)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npy embedding ({err})") from None
    return check_embedding(np.asarray(array), path, dim, finite)


def crop_mean(array: np.ndarray) -> np.ndarray:
    """(D,) float64 mean over the crops of a (crops, D) or (D,) embedding."""
    return array.reshape(-1, array.shape[-1]).astype(np.float64).mean(axis=0)


def crop_means(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """(N, D) float64 crop means of many embeddings: one operation when they share a shape, the
    same values as crop_mean of each."""
    if len({a.shape for a in arrays}) == 1:
        stacked = np.stack(arrays)
        return stacked.reshape(len(arrays), -1, stacked.shape[-1]).astype(np.float64).mean(axis=1)
    return np.stack([crop_mean(a) for a in arrays])


def reduce_means(means: np.ndarray, names: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Single-utterance embeddings of (N, D) float64 crop means: each row L2-normalised (float32),
    and the rows' norms before (float32, for QMF). A zero row is a UserError naming its file."""
    norms = np.linalg.norm(means, axis=-1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if len(zero):
        name = names[zero[0]] if names is not None else f"row {zero[0]}"
        raise UserError(f"{name}: embedding is all zeros")
    return (means / np.maximum(norms, 1e-12)).astype(np.float32), norms[:, 0].astype(np.float32)


def single_utterance_embedding(array: np.ndarray, path: Path | None = None) -> np.ndarray:
    """Mean over crops, then L2 norm: the (D,) single-utterance embedding of one file."""
    return reduce_means(crop_mean(array)[None, :], [path])[0][0]


# ----------------------------------------------------------------------------------------------
# Store keys and the files a store is built from


def store_key(path: str) -> str:
    """The key of a list's path or a Kaldi/WeSpeaker utterance id in any store: forward slashes,
    a trailing audio suffix or `.npy` removed (`id10270/x6uYqmx31kE/00001.wav` ->
    `id10270/x6uYqmx31kE/00001`)."""
    if "\\" in path:
        path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    dot = path.rfind(".")
    if dot > path.rfind("/") and path[dot:].lower() in KEY_SUFFIXES:
        return path[:dot]
    return path


KEY_SUFFIXES = frozenset((*AUDIO_SUFFIXES, ".npy"))  # removed from a path to make its store key
_PLAIN_SUFFIXES = frozenset((".wav", ".npy"))


def store_keys(paths: Iterable[str]) -> list[str]:
    """store_key of many paths; the common `x/y/z.wav` or `.npy` without a call each."""
    return [path[:-4] if path[-4:] in _PLAIN_SUFFIXES and path[0] != "." and "\\" not in path
            else store_key(path) for path in paths]
STORE_SUFFIX = ".store"
TREE_STORE = "embeddings.store"       # the packed store of a tree, inside it
SIDE_FILES = ("utt2dur", "manifest.json")  # carried into a packed store when the source has them
IGNORED_NAMES = (LOCK_NAME, *SIDE_FILES)


@dataclass(frozen=True)
class Stamp:
    """What a packed store was built from, cheap to take again: the number of source files, the
    newest modification time (ns) and the total size. A store is fresh when they are unchanged."""

    files: int
    newest_ns: int
    size: int

    def add(self, stat: os.stat_result) -> Stamp:
        return Stamp(self.files + 1, max(self.newest_ns, stat.st_mtime_ns), self.size + stat.st_size)


EMPTY_STAMP = Stamp(0, 0, 0)


def speaker_folders(root: Path) -> list[Path]:
    """The speaker folders of a tree, sorted (hidden names and packed stores ignored)."""
    with os.scandir(root) as entries:
        return sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")
                      and not e.name.endswith(STORE_SUFFIX))


def folder_files(folder: Path) -> list[str]:
    """The `.npy` files below `folder` (any depth), as `/`-joined paths relative to its parent,
    sorted as pathlib sorts them; hidden names and packed stores are skipped."""
    found: list[str] = []
    pending = [(str(folder), folder.name + "/")]
    while pending:
        path, prefix = pending.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_dir():
                    if not name.endswith(STORE_SUFFIX):
                        pending.append((entry.path, prefix + name + "/"))
                elif name.endswith(".npy"):
                    found.append(prefix + name)
    found.sort(key=lambda rel: rel.split("/"))
    return found


def folder_stamp(folder: Path) -> Stamp:
    """The Stamp of the files folder_files lists, in one scandir pass with a stat per file: the
    freshness check of a tree (about 0.7 s per 100,000 files on 2 busy cores, so 7 s at 1.09M)."""
    files = newest = size = 0
    pending = [str(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_dir():
                    if not name.endswith(STORE_SUFFIX):
                        pending.append(entry.path)
                elif name.endswith(".npy"):
                    stat = entry.stat()
                    files += 1
                    size += stat.st_size
                    newest = max(newest, stat.st_mtime_ns)
    return Stamp(files, newest, size)


def tree_stamp(root: Path) -> Stamp:
    """The Stamp of every utterance file of a tree and of its side files (utt2dur, manifest)."""
    stamp = files_stamp(root / name for name in SIDE_FILES)
    for folder in speaker_folders(root):
        stamp = merge_stamps(stamp, folder_stamp(folder))
    return stamp


def merge_stamps(a: Stamp, b: Stamp) -> Stamp:
    return Stamp(a.files + b.files, max(a.newest_ns, b.newest_ns), a.size + b.size)


def files_stamp(paths: Iterable[Path]) -> Stamp:
    """The Stamp of the named files that exist."""
    stamp = EMPTY_STAMP
    for path in paths:
        try:
            stamp = stamp.add(path.stat())
        except FileNotFoundError:
            continue
    return stamp


def scp_entries(scp: Path) -> list[tuple[str, str]]:
    """(utterance id, `ark:offset` location) of every line of a Kaldi .scp; errors name the line."""
    entries = []
    for lineno, line in enumerate(user_text_lines(scp, "Kaldi scp file"), start=1):
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        if len(parts) != 2:
            raise UserError(f"{scp}:{lineno}: a .scp line is `utterance-id ark-file:offset`, "
                            f"found {line.strip()!r}")
        entries.append((parts[0], parts[1]))
    if not entries:
        raise UserError(f"{scp}: the .scp file is empty")
    return entries


def ark_of(location: str) -> str:
    """The ark file of a .scp location `file.ark:123` (or `file.ark:123[0:9]`)."""
    return location.rsplit(":", 1)[0] if ":" in location else location


def scp_stamp(scp: Path, entries: Sequence[tuple[str, str]]) -> Stamp:
    """The Stamp of a .scp, its ark files and the Kaldi side files beside it."""
    arks = sorted({ark_of(location) for _, location in entries})
    return files_stamp([scp, *(Path(ark) for ark in arks),
                        *(scp.parent / name for name in ("utt2spk", *SIDE_FILES))])


def store_path_of(source: Path) -> Path:
    """Where m_comb_embs.py writes the packed store of a tree (inside it) or of a .scp (beside it)."""
    if source.suffix == ".scp":
        return source.with_name(source.stem + STORE_SUFFIX)
    return source / TREE_STORE


def read_utt2spk(path: Path) -> dict[str, str] | None:
    """utt2spk beside a .scp as {store key: speaker}; None when there is none."""
    if not path.is_file():
        return None
    mapping = {}
    for lineno, line in enumerate(user_text_lines(path, "utt2spk file"), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise UserError(f"{path}:{lineno}: an utt2spk line is `utterance speaker`, "
                            f"found {line.strip()!r}")
        mapping[store_key(parts[0])] = parts[1]
    return mapping


def read_utt2dur(path: Path) -> dict[str, float] | None:
    """utt2dur (`utterance seconds` per line) as {store key: seconds}; None when there is none."""
    if not path.is_file():
        return None
    durations = {}
    for lineno, line in enumerate(user_text_lines(path, "utt2dur file"), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 2:
                raise ValueError
            durations[store_key(parts[0])] = float(parts[1])
        except ValueError:
            raise UserError(f"{path}:{lineno}: an utt2dur line is `utterance seconds`, "
                            f"found {line.strip()!r}") from None
    return durations


def read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable manifest ({err})") from None


def key_speaker(key: str, utt2spk: dict[str, str] | None = None) -> str:
    """The speaker of a store key: from utt2spk when given, else the key's first path component
    (a Kaldi id without folders, `spk-video-utt`, gives its part before the first `-`)."""
    if utt2spk is not None and key in utt2spk:
        return utt2spk[key]
    return key.split("/", 1)[0] if "/" in key else key.split("-", 1)[0]


def key_category(key: str) -> str:
    """The category (session, video) of a store key: its second path component; for a Kaldi id
    without folders, `spk-video-utt`, the part between the first and the last `-`."""
    parts = key.split("/")
    if len(parts) > 2:
        return parts[1]
    pieces = parts[-1].split("-")
    return "-".join(pieces[1:-1]) if len(pieces) > 2 else parts[-1]


# ----------------------------------------------------------------------------------------------
# Embedding sources: a tree, a Kaldi .scp, a packed store


@dataclass
class Utterances:
    """Single-utterance embeddings of some list entries: entry i is table[rows[i]]. The table is a
    packed store's whole matrix when the entries cover it (no copy), else just their rows."""

    native: np.ndarray         # (R, D) the table as stored: float32, or a float16 store's matrix
    rows: np.ndarray           # (entries,) int64
    norms: np.ndarray | None   # (entries,) crop-mean norms before normalisation
    convert: Callable[[], np.ndarray] | None = None  # the float32 table, made once by its store

    @property
    def table(self) -> np.ndarray:
        """(R, D) float32."""
        if self.native.dtype == np.float32:
            return self.native
        return self.convert() if self.convert is not None else self.native.astype(np.float32)

    def matrix(self) -> np.ndarray:
        """(entries, D) float32: the table itself when the rows are 0..R-1 in order, else a gather."""
        if len(self.rows) == len(self.native) and np.array_equal(self.rows, np.arange(len(self.rows))):
            return self.table
        return np.asarray(self.native[self.rows], np.float32)


class EmbeddingSource:
    """What every store answers: the embeddings of list entries, speakers' embeddings, durations
    and the manifest of its extractor."""

    path: Path
    side_dir: Path  # where utt2dur and manifest.json lie
    own_rows = False  # whether utterances() gives rows of its own table whatever the entries' order

    def utterances(self, rels: Sequence[str], dim: int | None = None, threads: int = 8,
                   desc: str = "loading embeddings", show_progress: bool = True,
                   source: str | os.PathLike = "the list") -> Utterances:
        raise NotImplementedError

    def speaker_embeddings(self, speakers: Sequence[str], embedding_type: str,
                           dim: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def speaker_of(self, rels: Sequence[str]) -> list[str]:
        return [key_speaker(store_key(rel)) for rel in rels]

    @property
    def manifest(self) -> dict | None:
        return read_manifest(self.side_dir / "manifest.json")

    def durations(self, rels: Sequence[str]) -> np.ndarray | None:
        """Seconds of each entry (utt2dur), None when unknown for any of them."""
        known = read_utt2dur(self.side_dir / "utt2dur")
        if known is None:
            return None
        keys = [store_key(rel) for rel in rels]
        missing = [key for key in keys if key not in known]
        if missing:
            log.warning("%s: utt2dur has no duration for %d of %d files (first: %s); durations "
                        "unknown", self.side_dir / "utt2dur", len(missing), len(keys), missing[0])
            return None
        return np.array([known[key] for key in keys], np.float64)

    def missing_key(self, rel: str, source: str | os.PathLike) -> UserError:
        line = line_naming(source, rel) if Path(str(source)).is_file() else None
        where = f"{source}:{line}" if line is not None else str(source)
        return UserError(f"{where}: {rel} (key {store_key(rel)}) is not in the embedding store {self.path}")


class TreeSource(EmbeddingSource):
    """The project's tree of per-utterance `.npy` files, `<spk>.npy` speaker files beside."""

    def __init__(self, root: Path):
        self.path = self.side_dir = root

    def utterances(self, rels: Sequence[str], dim: int | None = None, threads: int = 8,
                   desc: str = "loading embeddings", show_progress: bool = True,
                   source: str | os.PathLike = "the list") -> Utterances:
        files = [embedding_file(self.path, rel) for rel in rels]
        missing = [k for k, f in enumerate(files) if not f.is_file()]
        if missing:
            shown = "\n  ".join(str(files[k]) for k in missing[:5])
            more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            line = line_naming(source, rels[missing[0]]) if Path(str(source)).is_file() else None
            where = f"{source}:{line}" if line is not None else str(source)
            raise UserError(f"{len(missing)} embedding file(s) named by {where} are missing under "
                            f"{self.path}:\n  {shown}{more}\n(m_gen_embs.py writes them)")
        matrix, norms = read_files(files, dim, threads, desc, show_progress)
        return Utterances(matrix, np.arange(len(files)), norms)

    def speaker_embeddings(self, speakers: Sequence[str], embedding_type: str,
                           dim: int | None = None) -> np.ndarray:
        pattern = embedding_type_of(embedding_type).speaker_file
        rows = []
        for spk in speakers:
            path = self.path / pattern.format(spk)
            if not path.is_file():
                raise UserError(f"{path}: speaker embedding not found (m_comb_embs.py writes it)")
            rows.append(crop_mean(read_embedding(path, dim)).astype(np.float32))
        return np.stack(rows)


def read_files(files: Sequence[Path], dim: int | None, threads: int, desc: str,
               show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read and reduce embedding files: (N, D) float32 single-utterance embeddings and their
    norms, in order; `threads` reader threads, none (the calling thread) for 0."""
    first = read_embedding(files[0], dim) if files else None
    width = dim if dim is not None else (first.shape[-1] if first is not None else 0)
    matrix = np.empty((len(files), width), np.float32)
    norms = np.empty(len(files), np.float32)
    blocks = [range(start, min(start + LOAD_BLOCK, len(files)))
              for start in range(0, len(files), LOAD_BLOCK)]

    def load_block(rows: range) -> int:
        """Read a block of files straight into their rows of the matrix."""
        arrays = [first if row == 0 else read_embedding(files[row], width) for row in rows]
        matrix[rows.start:rows.stop], norms[rows.start:rows.stop] = reduce_means(
            np.stack([crop_mean(a) for a in arrays]), [files[row] for row in rows])
        return len(rows)

    # threads 0 (nDataLoaderThread 0): read in the calling thread, as the original's num_workers 0
    pool = ThreadPoolExecutor(threads) if threads > 0 else None
    with pool or nullcontext(), \
            tqdm(total=len(files), desc=desc, unit="file", leave=False,
                 disable=not show_progress or len(files) < 2000) as bar:
        for done in (pool.map if pool is not None else map)(load_block, blocks):
            bar.update(done)
    return matrix, norms


class KaldiSource(EmbeddingSource):
    """A Kaldi `.scp` with its `.ark` files (read with kaldiio); speakers from `utt2spk` beside it
    or each key's first path component. Speaker embeddings are combined from the utterances."""

    def __init__(self, scp: Path, entries: list[tuple[str, str]] | None = None):
        self.path = scp
        self.side_dir = scp.parent
        self.entries = entries if entries is not None else scp_entries(scp)
        self.utt2spk = read_utt2spk(scp.parent / "utt2spk")
        self.key_of = {store_key(utt): utt for utt, _ in self.entries}
        self.location = dict(self.entries)

    def read(self, utt: str, dim: int | None = None) -> np.ndarray:
        import kaldiio

        try:
            array = np.asarray(kaldiio.load_mat(self.location[utt]))
        except Exception as err:  # kaldiio raises many kinds of errors on a bad ark
            raise UserError(f"{self.path}: cannot read {utt} from {self.location[utt]} ({err})") from None
        return check_embedding(array, f"{self.path} ({utt})", dim)

    def means(self, utts: Sequence[str], dim: int | None = None) -> np.ndarray:
        return crop_means([self.read(utt, dim) for utt in utts])

    def utterances(self, rels: Sequence[str], dim: int | None = None, threads: int = 8,
                   desc: str = "loading embeddings", show_progress: bool = True,
                   source: str | os.PathLike = "the list") -> Utterances:
        utts = []
        for rel in rels:
            utt = self.key_of.get(store_key(rel))
            if utt is None:
                raise self.missing_key(rel, source)
            utts.append(utt)
        matrix, norms = reduce_means(self.means(utts, dim), [f"{self.path} ({u})" for u in utts])
        return Utterances(matrix, np.arange(len(utts)), norms)

    def speaker_of(self, rels: Sequence[str]) -> list[str]:
        return [key_speaker(store_key(rel), self.utt2spk) for rel in rels]

    def speaker_embeddings(self, speakers: Sequence[str], embedding_type: str,
                           dim: int | None = None) -> np.ndarray:
        by_speaker: dict[str, list[str]] = {}
        for key, utt in self.key_of.items():
            by_speaker.setdefault(key_speaker(key, self.utt2spk), []).append(utt)
        rows = []
        for spk in speakers:
            if spk not in by_speaker:
                raise UserError(f"{self.path}: no utterance of speaker {spk}")
            rows.append(combine_speaker(self.means(by_speaker[spk], dim), embedding_type))
        return np.stack(rows)


# ----------------------------------------------------------------------------------------------
# Packed stores: <name>.store/ holds
#   header.json      {"format", "version", "source", "source_kind", "dtype", "utterances",
#                     "speakers", "dim", "stamp" (of the source files), "created"}
#   embeddings.npy   (N, D) float32 or float16 single-utterance embeddings (crop mean, L2 norm)
#   keys.txt         the N store keys, in row order
#   norms.npy        (N,) float32 crop-mean norms before normalisation
#   speakers.txt     the S speaker names; speaker_of.npy (N,) int32 each row's speaker
#   speakers_B.npy, speakers_C.npy   (S, D) float32 speaker embeddings of type B and C
#   utt2dur, manifest.json           copied from the source when it had them

STORE_FORMAT = "m-embedding-store"
STORE_VERSION = 1
STORE_DTYPES = ("float32", "float16")


def is_packed_store(path: Path) -> bool:
    """Whether `path` is a folder this project wrote as a packed store."""
    try:
        return json.loads((path / "header.json").read_text()).get("format") == STORE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class PackedStore(EmbeddingSource):
    """A packed store, memory-mapped: opening it reads its index, not its matrix."""

    own_rows = True

    def __init__(self, path: Path):
        self.path = self.side_dir = path
        if not is_packed_store(path):
            raise UserError(f"{path}: not a packed embedding store (m_comb_embs.py writes them)")
        self.header = json.loads((path / "header.json").read_text())
        if self.header.get("version") != STORE_VERSION:
            raise UserError(f"{path}: store format version {self.header.get('version')}, this "
                            f"code reads version {STORE_VERSION}; run m_comb_embs.py again")
        # copy-on-write: a writable array for torch.from_numpy, never written back to the file
        self.matrix = np.load(path / "embeddings.npy", mmap_mode="c")
        self.keys = (path / "keys.txt").read_text().split("\n")[:len(self.matrix)]
        self.speakers = (path / "speakers.txt").read_text().split("\n")[:self.header["speakers"]]
        self._index: dict[str, int] | None = None
        self._float32: np.ndarray | None = None

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = dict(zip(self.keys, range(len(self.keys)), strict=True))
        return self._index

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def norms(self) -> np.ndarray:
        return np.load(self.path / "norms.npy", mmap_mode="r")

    def speaker_of_rows(self) -> np.ndarray:
        return np.load(self.path / "speaker_of.npy", mmap_mode="r")

    def float32(self) -> np.ndarray:
        """The whole matrix as float32: the memory map itself, or a float16 store converted once."""
        if self.matrix.dtype == np.float32:
            return self.matrix
        if self._float32 is None:
            self._float32 = self.matrix.astype(np.float32)
        return self._float32

    def rows_of(self, rels: Sequence[str], source: str | os.PathLike = "the list") -> np.ndarray:
        keys = store_keys(rels)
        if keys == self.keys:  # a list of the whole store in its order: no index needed
            return np.arange(len(keys), dtype=np.int64)
        index = self.index
        rows = np.fromiter((index.get(key, -1) for key in keys), np.int64, len(keys))
        if len(rows) and rows.min() < 0:
            raise self.missing_key(rels[int(np.argmin(rows))], source)
        return rows

    def utterances(self, rels: Sequence[str], dim: int | None = None, threads: int = 8,
                   desc: str = "loading embeddings", show_progress: bool = True,
                   source: str | os.PathLike = "the list") -> Utterances:
        if dim is not None and dim != self.dim:
            raise UserError(f"{self.path}: embedding dimension {self.dim} does not match nOut {dim}")
        rows = self.rows_of(rels, source)
        norms = np.asarray(self.norms()[rows], np.float32)
        used = np.zeros(len(self.matrix), bool)
        used[rows] = True
        if used.all():  # the whole store: the memory map is the table
            return Utterances(self.matrix, rows, norms, self.float32)
        position = np.cumsum(used) - 1
        table = np.asarray(self.matrix[np.flatnonzero(used)], dtype=np.float32)
        return Utterances(table, position[rows], norms)

    def speaker_of(self, rels: Sequence[str]) -> list[str]:
        rows = self.rows_of(rels)
        of_rows = self.speaker_of_rows()
        return [self.speakers[of_rows[row]] for row in rows]

    def speaker_embeddings(self, speakers: Sequence[str], embedding_type: str,
                           dim: int | None = None) -> np.ndarray:
        table = np.load(self.path / f"speakers_{embedding_type}.npy", mmap_mode="r")
        position = {name: k for k, name in enumerate(self.speakers)}
        missing = [spk for spk in speakers if spk not in position]
        if missing:
            raise UserError(f"{self.path}: no speaker {missing[0]} in the store "
                            f"({len(missing)} speaker(s) missing)")
        return np.asarray(table[[position[spk] for spk in speakers]], dtype=np.float32)


_STORES: dict[tuple[str, int], PackedStore] = {}
_SAID_STALE: set[str] = set()
# A store found fresh is not checked again for this long in one process: a run opens its tree for
# training, validation and trials within seconds, and the check walks every file.
FRESH_FOR_S = 60.0
_FOUND_FRESH: dict[tuple[str, int], float] = {}


def open_store(path: str | os.PathLike) -> PackedStore:
    """The packed store at `path` (a `*.store` folder), opened once per process."""
    path = Path(path)
    try:
        key = (str(path.resolve()), (path / "header.json").stat().st_mtime_ns)
    except OSError:
        raise UserError(f"{path}: packed store not found (m_comb_embs.py writes it)") from None
    if key not in _STORES:
        _STORES[key] = PackedStore(path)
    return _STORES[key]


def fresh_store(store: Path, stamp: Callable[[], Stamp]) -> PackedStore | None:
    """The packed store built from a source, when it exists and the source's Stamp is unchanged
    since it was built (no file modified, added or removed); a stale one is said (once) and not used."""
    if not is_packed_store(store):
        return None
    opened = open_store(store)
    key = (str(store.resolve()), (store / "header.json").stat().st_mtime_ns)
    if time.monotonic() - _FOUND_FRESH.get(key, -FRESH_FOR_S) < FRESH_FOR_S:
        return opened
    recorded, now = opened.header.get("stamp"), asdict(stamp())
    if recorded == now:
        _FOUND_FRESH[key] = time.monotonic()
        return opened
    if str(store) not in _SAID_STALE:
        _SAID_STALE.add(str(store))
        log.warning("%s is older than the files it was built from (%s then, %s now): reading the "
                    "files instead; run m_comb_embs.py again to rebuild it", store, recorded, now)
    return None


def forget_freshness() -> None:
    """Check every store's freshness again on its next use (after files changed in this process)."""
    _FOUND_FRESH.clear()
    _SAID_STALE.clear()


def open_embeddings(path: str | os.PathLike) -> EmbeddingSource:
    """The embedding store at `path`: a packed store (`*.store`), a Kaldi `.scp` or a tree of
    `.npy` files. A tree or `.scp` with a fresh packed store (m_comb_embs.py) is read from it."""
    path = Path(path)
    if path.suffix == STORE_SUFFIX:
        return open_store(path)
    if path.suffix == ".scp":
        entries = scp_entries(path)
        packed = fresh_store(store_path_of(path), lambda: scp_stamp(path, entries))
        return packed if packed is not None else KaldiSource(path, entries)
    if not path.is_dir():
        raise UserError(f"{path}: embedding store not found (a folder of .npy files, a Kaldi .scp "
                        "or a packed .store; m_gen_embs.py and m_comb_embs.py write them)")
    packed = fresh_store(store_path_of(path), lambda: tree_stamp(path))
    return packed if packed is not None else TreeSource(path)


def load_embeddings(root: str | os.PathLike, rel_paths: Sequence[str], dim: int | None = None,
                    threads: int = 8, desc: str = "loading embeddings",
                    show_progress: bool = True, source: str | os.PathLike = "the list") -> np.ndarray:
    """The (N, D) float32 single-utterance embeddings of the list entries `rel_paths`, in order,
    from the store `root` (tree, .scp or packed store); `threads` reader threads for files."""
    return open_embeddings(root).utterances(rel_paths, dim, threads, desc, show_progress,
                                            source).matrix()


def load_speaker_embeddings(root: str | os.PathLike, speakers: Sequence[str], embedding_type: str,
                            dim: int | None = None) -> np.ndarray:
    """The (S, D) multi-utterance embeddings of `speakers`, of `embedding_type` (B or C)."""
    return open_embeddings(root).speaker_embeddings(speakers, embedding_type, dim)


# ----------------------------------------------------------------------------------------------
# Writing stores


class StoreBuilder:
    """Builds a packed store in a hidden folder beside its target, row block by row block, then
    renames it into place: a reader sees the old store or the new one, never half of one. An old
    store this project wrote is replaced; anything else at the target is left alone (UserError)."""

    def __init__(self, target: Path, rows: int, dim: int, dtype: str = "float32"):
        if dtype not in STORE_DTYPES:
            raise UserError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, found {dtype!r}")
        if target.exists() and not is_packed_store(target):
            raise UserError(f"{target}: exists and is not a packed store this project wrote; "
                            "not replaced (move it away)")
        self.target = target
        self.dtype = np.dtype(dtype)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
            self.matrix = np.lib.format.open_memmap(self.temp / "embeddings.npy", "w+", dtype, (rows, dim))
        except OSError as err:
            raise write_error(target, err) from None
        self.norms = np.zeros(rows, np.float32)

    def __enter__(self) -> StoreBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.temp.exists():  # not finished: the half-built folder was ours
            self.matrix = None
            shutil.rmtree(self.temp, ignore_errors=True)

    def put(self, start: int, embeddings: np.ndarray, norms: np.ndarray) -> None:
        self.matrix[start:start + len(embeddings)] = embeddings
        self.norms[start:start + len(embeddings)] = norms

    def finish(self, keys: Sequence[str], speakers: Sequence[str], speaker_of: np.ndarray,
               tables: dict[str, np.ndarray], header: dict, side_dir: Path | None = None) -> Path:
        """Write the index and header, then rename the folder into place; returns the target."""
        try:
            self.matrix.flush()
            rows, dim = self.matrix.shape
            self.matrix = None
            (self.temp / "keys.txt").write_text("\n".join(keys) + "\n")
            (self.temp / "speakers.txt").write_text("\n".join(speakers) + "\n")
            np.save(self.temp / "norms.npy", self.norms)
            np.save(self.temp / "speaker_of.npy", np.asarray(speaker_of, np.int32))
            for name, table in tables.items():
                np.save(self.temp / f"speakers_{name}.npy", np.asarray(table, np.float32))
            for name in SIDE_FILES if side_dir is not None else ():
                if (side_dir / name).is_file():
                    shutil.copyfile(side_dir / name, self.temp / name)
            header = {"format": STORE_FORMAT, "version": STORE_VERSION, **header,
                      "dtype": self.dtype.name, "utterances": rows,
                      "speakers": len(speakers), "dim": dim,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (self.temp / "header.json").write_text(json.dumps(header, indent=1) + "\n")
            sync_folder(self.temp)
            self.replace()
        except OSError as err:
            raise write_error(self.target, err) from None
        return self.target

    def replace(self) -> None:
        """Rename the built folder over the target (an old store goes aside, then away)."""
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".old",
                                        dir=self.target.parent))
            os.replace(self.target, old / "store")
        os.replace(self.temp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def sync_folder(folder: Path) -> None:
    """fsync every file of a folder, then the folder: on disk before it is renamed into place."""
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def speaker_tables(means: np.ndarray, speaker_of: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """The (S, D) B and C speaker embeddings of rows' crop means grouped by speaker index (one
    speaker's rows in float64 at a time)."""
    order = np.argsort(speaker_of, kind="stable")
    bounds = np.searchsorted(speaker_of[order], np.arange(count + 1))
    tables = {name: np.empty((count, means.shape[1]), np.float32) for name in EMBEDDING_TYPES}
    for s in range(count):
        group = np.asarray(means[order[bounds[s]:bounds[s + 1]]], np.float64)
        for name, table in tables.items():
            table[s] = combine_speaker(group, name)
    return tables


def pack_arrays(target: str | os.PathLike, keys: Sequence[str], means: np.ndarray,
                speakers_of_keys: Sequence[str] | None = None, dtype: str = "float32",
                source: str = "arrays") -> Path:
    """A packed store from per-utterance vectors (crop means, or embeddings): rows L2-normalised,
    norms kept, B/C speaker embeddings combined. Speakers default to the keys' first component.
    Rows keep their order; quick at scale (blocks of rows, no float64 copy of the whole matrix)."""
    keys = [store_key(key) for key in keys]
    names = list(speakers_of_keys) if speakers_of_keys is not None else [key_speaker(k) for k in keys]
    speakers = sorted(set(names))
    position = {spk: k for k, spk in enumerate(speakers)}
    speaker_of = np.array([position[name] for name in names], np.int32)
    return pack_means(target, keys, means, speakers, speaker_of, dtype,
                      {"source": source, "source_kind": "arrays", "stamp": None})


def pack_means(target: str | os.PathLike, keys: Sequence[str], means: np.ndarray,
               speakers: Sequence[str], speaker_of: np.ndarray, dtype: str, header: dict,
               side_dir: Path | None = None, block: int = 65536) -> Path:
    """Write the packed store of crop means (N, D) under store `keys`, each row's speaker index
    into `speakers` in `speaker_of`; `header` says the source and its Stamp."""
    if len(set(keys)) < len(keys):
        seen: set[str] = set()
        twice = next(key for key in keys if key in seen or seen.add(key))
        raise UserError(f"{header.get('source')}: two utterances have the store key {twice}")
    with StoreBuilder(Path(target), len(keys), means.shape[1], dtype) as builder:
        for start in range(0, len(keys), block):
            rows = np.asarray(means[start:start + block], np.float64)
            builder.put(start, *reduce_means(rows, keys[start:start + block]))
        tables = speaker_tables(means, speaker_of, len(speakers))
        return builder.finish(keys, speakers, speaker_of, tables, header, side_dir)


GEN_FORMATS = ("tree", "kaldi", "packed")


def gen_format_of(target: str | os.PathLike, gen_format: str | None = None) -> str:
    """tree, kaldi or packed: `gen_format` when given, else from the target (`.scp` -> kaldi,
    `.store` -> packed, anything else a tree)."""
    if gen_format:
        if gen_format not in GEN_FORMATS:
            raise UserError(f"gen_format must be one of {', '.join(GEN_FORMATS)}, found {gen_format!r}")
        return gen_format
    suffix = Path(target).suffix
    return {".scp": "kaldi", STORE_SUFFIX: "packed"}.get(suffix, "tree")


def gen_target(folder: str | os.PathLike, gen_format: str) -> Path:
    """Where --generate writes embeddings of `gen_format` for the folder gen_target_dir names:
    the folder itself (tree), `<folder>/xvector.scp` (kaldi, WeSpeaker's name) or
    `<folder>.store` (packed)."""
    folder = Path(folder)
    kind = gen_format_of(folder, gen_format)
    if kind == "kaldi":
        return folder / "xvector.scp"
    return folder.with_name(folder.name + STORE_SUFFIX) if kind == "packed" else folder


def write_embeddings(target: str | os.PathLike, keys: Sequence[str], matrix: np.ndarray,
                     gen_format: str | None = None) -> Path:
    """Write (N, D) embeddings under their keys (list paths) as a tree of (1, D) `.npy` files
    (`<target>/<key>.npy`), a Kaldi `.scp` + `.ark` (keys as given, as WeSpeaker reads them) or a
    packed store; the kind from `gen_format` or the target (gen_format_of). Returns the target."""
    target = Path(target)
    kind = gen_format_of(target, gen_format)
    if kind == "packed":
        return pack_arrays(target, keys, matrix, source="generated")
    if kind == "kaldi":
        return write_kaldi(target, keys, matrix)
    for rel, row in zip(keys, matrix, strict=True):
        save_npy_atomic((target / rel).with_suffix(".npy"), np.asarray(row[None, :], np.float32))
    return target


def write_kaldi(scp: Path, keys: Sequence[str], matrix: np.ndarray) -> Path:
    """A Kaldi `.scp` and its `.ark` (float32 vectors, kaldiio's binary format) beside it, each
    written to a temporary name and renamed; the .scp names the .ark by its absolute path."""
    import kaldiio

    if scp.suffix != ".scp":
        raise UserError(f"{scp}: a Kaldi target is a .scp file")
    ark = scp.with_suffix(".ark").resolve()
    try:
        scp.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{ark.name}.", suffix=".tmp", dir=ark.parent)
        os.close(fd)
    except OSError as err:
        raise write_error(ark, err) from None
    lines = io.StringIO()
    arrays = {key: np.asarray(row, np.float32) for key, row in zip(keys, matrix, strict=True)}
    try:
        kaldiio.save_ark(temp, arrays, scp=lines)
        os.replace(temp, ark)
    except BaseException as err:
        Path(temp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(ark, err) from None
        raise
    text = "".join(f"{line.split(' ', 1)[0]} {ark}:{line.rsplit(':', 1)[1]}\n"
                   for line in lines.getvalue().splitlines())
    write_text_atomic(scp, text)
    return scp


# ----------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One step's data. DA batches lay pairs out as rows (2p, 2p + 1) of `inputs`."""

    inputs: torch.Tensor               # (N, D) single-utterance embeddings to enhance
    targets: torch.Tensor              # (N, D) their speakers' multi-utterance embeddings
    labels: torch.Tensor               # (N,) speaker index, -1 for a speaker unknown to training
    others: torch.Tensor | None = None        # (N, D) another speaker's embedding (triplet)
    pair_same: torch.Tensor | None = None     # (P,) True for a same-category pair (DA)
    pair_speaker: torch.Tensor | None = None  # (P,) speaker group of each pair (DA)
    weight: float = 1.0                # this rank's share of the global batch x world size

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


# Input rows an epoch on a GPU gathers in one operation per field: 8 MB of inputs at 512
# dimensions, and as much again of targets (about 20 steps at batch size 200).
GPU_CHUNK_ROWS = 4096


def shard(items: np.ndarray, ctx: DistContext) -> tuple[np.ndarray, float] | None:
    """This rank's part of one global batch and its weight, or None when some rank gets nothing."""
    if len(items) < ctx.world_size:
        return None
    part = np.array_split(items, ctx.world_size)[ctx.rank]
    return part, len(part) * ctx.world_size / len(items)


class EmbeddingData:
    """A list file's records with their embeddings held in memory (a packed store's memory map
    when the list names all of it, with no copy on the CPU).

    `kind` is normal, triplet or distribution (a TrainingKind, which the batches ask). Speaker
    labels index `speakers` (the training speakers when given, so validation shares the training
    classes). `root` is the embedding store (tree, .scp or packed store).
    """

    def __init__(self, list_path: str | os.PathLike, root: str | os.PathLike, kind: str,
                 embedding_type: str, dim: int | None, device: torch.device | str = "cpu",
                 speakers: Sequence[str] | None = None, threads: int = 8):
        self.list_kind = training_kind(kind)
        self.kind = self.list_kind.name
        records = read_list(list_path, self.list_kind)
        source = open_embeddings(root)
        files = self.list_kind.files(records)
        # a packed store's rows are its own: the files' order does not matter there
        unique = list(dict.fromkeys(files)) if source.own_rows else sorted(set(files))
        # Copies of the names: one string kept per speaker would pin the parsed records' memory in
        # the allocator's pools (2 GB at VoxBlink2's 9.9M lines) after they are freed.
        own_speakers = sorted(spk.encode().decode() for spk in self.list_kind.speakers(records))
        self.speakers = list(speakers) if speakers is not None else own_speakers
        label_of = {spk: i for i, spk in enumerate(self.speakers)}
        target_of = {spk: i for i, spk in enumerate(own_speakers)}  # beside this list's files

        utterances = source.utterances(unique, dim, threads, source=list_path)
        self.manifest, self.source = source.manifest, str(source.path)  # provenance (contract.md)
        row_of = dict(zip(unique, utterances.rows.tolist(), strict=True))
        # Batches gather from `table`: on the CPU the memory map itself, float16 or float32 (a
        # float16 store's batch rows are converted as they are gathered); a float16 store goes to a
        # GPU as it is and is converted there. So training never holds a float32 copy on the host.
        self._utterances = utterances
        self.table = torch.from_numpy(utterances.native).to(device)
        if self.table.device.type != "cpu":
            self.table = self.table.float()
        self._embeddings: torch.Tensor | None = None
        self.dim = int(self.table.shape[1])
        self.speaker_embeddings = torch.from_numpy(
            source.speaker_embeddings(own_speakers, embedding_type, self.dim)).to(device)
        spk = self.list_kind.index(self, records, row_of, target_of)
        self.target = np.array([target_of[s] for s in spk], np.int64)
        self.label = np.array([label_of.get(s, -1) for s in spk], np.int64)
        self._speaker_pairs: list[np.ndarray] | None = None
        # Rows gathered at once in an epoch (0: one gather per batch). On a GPU each operation
        # costs the host a launch, the same for 200 rows as for 4,096, and steps are short.
        self.chunk_rows = GPU_CHUNK_ROWS if self.table.device.type != "cpu" else 0

    def __len__(self) -> int:
        return len(self.target)

    @property
    def embeddings(self) -> torch.Tensor:
        """(rows, D) float32: `table`, or a float16 store's matrix converted on first use (once
        per store, in RAM), for the users of the whole matrix (back-ends, enhancement)."""
        if self.table.dtype == torch.float32:
            return self.table
        if self._embeddings is None:
            self._embeddings = torch.from_numpy(self._utterances.table)
        return self._embeddings

    @property
    def num_speakers(self) -> int:
        return len(set(self.target.tolist()))

    def row_speakers(self) -> np.ndarray:
        """(rows of `embeddings`,) the speaker (index into the list's speakers) of each file."""
        speaker = np.empty(len(self.table), np.int64)
        rows, targets = self.list_kind.file_rows(self)
        speaker[rows] = targets
        return speaker

    # -- batch assembly ------------------------------------------------------------------------
    # A batch is first a set of index arrays (numpy), then gathered from the tables. On a GPU the
    # index arrays of a whole epoch travel in one copy (a copy per batch would make the host wait
    # for the GPU to finish the previous step every time) and rows are gathered for many batches
    # at once (see chunk_rows).

    def batch_indices(self, records: np.ndarray, batch: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Index arrays of the batch of record indices `records` (pairs for a distribution list):
        rows of the tables for the Batch fields the kind gathers, values for the others. `batch`
        numbers the batch of each record where `records` holds several batches back to back."""
        return self.list_kind.batch_indices(self, records, batch)

    def assemble(self, indices: dict[str, np.ndarray | torch.Tensor], weight: float = 1.0) -> Batch:
        """The Batch of `indices` (numpy, or tensors already on the tables' device)."""
        fields = {}
        for name, values in indices.items():
            table = self.list_kind.gathered.get(name)
            fields[name] = (self.rows_of(getattr(self, table), values) if table is not None
                            else torch.as_tensor(values, device=self.table.device))
        return Batch(**fields, weight=weight)

    @staticmethod
    def rows_of(table: torch.Tensor, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """table[rows] as float32. On the CPU the gather runs in numpy on the tensor's own memory:
        torch's threaded indexing costs more in thread wake-ups than the copy itself for small
        batches; a float16 table's rows are converted after the gather (only the batch's rows)."""
        if isinstance(rows, np.ndarray) and table.device.type == "cpu":
            return torch.from_numpy(table.numpy()[rows]).float()
        return table[torch.as_tensor(rows, device=table.device)].float()

    def batch_of(self, records: np.ndarray, weight: float = 1.0) -> Batch:
        """The Batch of record indices `records` (pairs for a distribution list)."""
        return self.assemble(self.batch_indices(records), weight)

    def _batches_in_chunks(self, parts: Iterable[tuple[np.ndarray, float]]) -> Iterator[Batch]:
        return chunked_batches(self, parts)

    def speaker_pairs(self) -> list[np.ndarray]:
        """Pair indices grouped by speaker, in speaker order (distribution lists)."""
        if self._speaker_pairs is None:
            order = np.argsort(self.target, kind="stable")
            starts = np.flatnonzero(np.diff(self.target[order])) + 1
            self._speaker_pairs = np.split(order, starts) if len(order) else []
        return self._speaker_pairs

    # -- epochs ----------------------------------------------------------------------------------

    def global_batches(self, batch_size: int, seed: int, epoch: int, world_size: int = 1,
                       n_per_speaker: int = 1, max_seg_per_spk: int = 500,
                       speakers_per_step: int = 1, shuffle: bool = True) -> list[np.ndarray]:
        """The epoch's global batches (record indices), identical on every rank."""
        rng = np.random.default_rng([seed, epoch])
        return self.list_kind.global_batches(self, rng, batch_size, world_size, n_per_speaker,
                                             max_seg_per_spk, speakers_per_step, shuffle)

    def epoch(self, batch_size: int, seed: int, epoch: int, ctx: DistContext = SINGLE,
              **sampling) -> Iterator[Batch]:
        """This rank's batches of one epoch; the global order depends on seed and epoch only."""
        parts = (self._rank_part(items, ctx, sampling.get("n_per_speaker", 1))
                 for items in self.global_batches(batch_size, seed, epoch, ctx.world_size, **sampling))
        parts = (part for part in parts if part is not None)
        if self.chunk_rows:
            yield from self._batches_in_chunks(parts)
            return
        for part in parts:
            yield self.batch_of(*part)

    def _rank_part(self, items: np.ndarray, ctx: DistContext,
                   n_per_speaker: int) -> tuple[np.ndarray, float] | None:
        """This rank's records of a global batch and their loss weight (None: nothing here)."""
        if ctx.world_size == 1:
            return items, 1.0
        return self.list_kind.rank_part(self, items, ctx, n_per_speaker)

    def _speaker_shard(self, pairs: np.ndarray, ctx: DistContext) -> tuple[np.ndarray, float] | None:
        speakers = np.unique(self.target[pairs])
        mine = shard(speakers, ctx)
        if mine is None:
            return None
        return pairs[np.isin(self.target[pairs], mine[0])], 1.0


def chunked_batches(data: EmbeddingData, parts: Iterable[tuple[np.ndarray, float]]) -> Iterator[Batch]:
    """Batches of `parts` built with a few device operations per many steps: the epoch's index
    arrays go to the device in one copy, the table rows of about `chunk_rows` inputs are
    gathered in one operation per field, and each batch is a slice of those (a view)."""
    parts = list(parts)
    sizes = np.array([len(records) for records, _ in parts], np.int64)
    if not sizes.sum():
        return
    records = np.concatenate([records for records, _ in parts])
    indices = data.batch_indices(records, np.repeat(np.arange(len(parts)), sizes))
    record_bounds = np.concatenate([[0], np.cumsum(sizes)])
    # A field has one or two entries a record (a distribution pair gives two rows).
    bounds = {name: (record_bounds * (len(values) // len(records))).tolist()
              for name, values in indices.items()}
    flat = {name: torch.as_tensor(values, device=data.table.device)
            for name, values in indices.items()}
    names = list(indices)
    gathered = data.list_kind.gathered
    gathered_names = [name for name in names if name in gathered]
    starts = chunk_starts(np.diff(bounds["inputs"]), data.chunk_rows)
    for first, stop in zip(starts[:-1], starts[1:], strict=True):
        chunk = {name: getattr(data, gathered[name]).index_select(
                     0, flat[name][bounds[name][first]:bounds[name][stop]]).float()
                 for name in gathered_names}
        for k in range(first, stop):
            fields = {}
            for name in names:
                lo, hi = bounds[name][k], bounds[name][k + 1]
                if name in chunk:
                    offset = bounds[name][first]
                    fields[name] = chunk[name][lo - offset:hi - offset]
                else:
                    fields[name] = flat[name][lo:hi]
            yield Batch(**fields, weight=parts[k][1])


def chunk_starts(batch_rows: np.ndarray, chunk_rows: int) -> list[int]:
    """Where chunks of consecutive batches start (and, last, the number of batches), each chunk
    holding at most `chunk_rows` rows or a single batch that has more."""
    starts, rows = [0], 0
    for k, size in enumerate(batch_rows.tolist()):
        if rows and rows + size > chunk_rows:
            starts.append(k)
            rows = 0
        rows += size
    return starts + [len(batch_rows)]


def speaker_grouped_batches(speaker: np.ndarray, groups_per_batch: int, n_per_speaker: int,
                            max_seg_per_spk: int, rng: np.random.Generator) -> list[np.ndarray]:
    """nPerSpeaker sampling: batches of `groups_per_batch` groups of `n_per_speaker` utterances
    of one speaker, at most `max_seg_per_spk` utterances a speaker, no speaker twice in a batch."""
    groups, group_speaker, rounds = [], [], []
    for spk in np.unique(speaker):
        utts = rng.permutation(np.flatnonzero(speaker == spk))[:max_seg_per_spk]
        usable = len(utts) - len(utts) % n_per_speaker
        for k, start in enumerate(range(0, usable, n_per_speaker)):
            groups.append(utts[start:start + n_per_speaker])
            group_speaker.append(spk)
            rounds.append(k)
    if not groups:
        return []
    # Shuffle, then order by round: each speaker's k-th group lands after all (k-1)-th groups,
    # so a speaker recurs only once every other speaker of its round has been placed.
    order = rng.permutation(len(groups))
    order = order[np.argsort(np.asarray(rounds)[order], kind="stable")]
    batches, current, seen = [], [], set()
    for g in order:
        if group_speaker[g] in seen or len(current) == groups_per_batch:
            batches.append(np.concatenate(current))
            current, seen = [], set()
        current.append(groups[g])
        seen.add(group_speaker[g])
    batches.append(np.concatenate(current))
    return [batches[i] for i in rng.permutation(len(batches))]


class TrialSet:
    """A trial list (`label path1 path2` or `enroll test target|nontarget`) with the embeddings of
    every file it names, and what the store knows of them: `durations` (utt2dur; None when
    unknown), `norms` (crop-mean norms before normalisation), `manifest` (of the extractor) and
    `source` (the store read).

    `load` gives the (files, D) embeddings of the sorted list of files the trials name; by default
    they are read from the store `root`. A caller that holds them already supplies them."""

    def __init__(self, list_path: str | os.PathLike, root: str | os.PathLike, dim: int | None,
                 threads: int = 8, load: Callable[[list[str]], np.ndarray] | None = None):
        self.list_path = Path(list_path)
        self.labels, self.left, self.right, self.files = read_trials(list_path)
        self.store: EmbeddingSource | None = None
        self.durations = self.norms = self.manifest = None
        self.source = str(root)
        if load is None:
            self.store = open_embeddings(root)
            utterances = self.store.utterances(self.files, dim, threads, desc="loading trials",
                                               source=list_path)
            self.embeddings = np.asarray(utterances.matrix())
            self.norms, self.source = utterances.norms, str(self.store.path)
            self.durations, self.manifest = self.store.durations(self.files), self.store.manifest
        else:
            self.embeddings = load(self.files)
            if len(self.embeddings) != len(self.files):
                raise ValueError(f"{len(self.files)} files need as many embeddings, "
                                 f"got {len(self.embeddings)}")
        if len(np.unique(self.labels)) < 2:
            raise UserError(f"{self.list_path}: a trial list needs both target (1) and "
                            "non-target (0) trials to compute an EER")

    def __len__(self) -> int:
        return len(self.labels)

    def speaker_of_trials(self) -> np.ndarray:
        """(trials,) index of the speaker of each trial's enrolment (left) file: its first folder,
        or its utt2spk speaker."""
        names = (self.store.speaker_of(self.files) if self.store is not None
                 else [key_speaker(store_key(rel)) for rel in self.files])
        return np.unique(np.array(names), return_inverse=True)[1][self.left]
