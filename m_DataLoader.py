"""The data path, in one place: list files -> embedding files -> in-memory arrays -> batches.

Every embedding file named by a list is read once per run, reduced once to its single-utterance
embedding (mean over crops, then L2 norm) and kept in one matrix (on the training device);
batches are index lookups into that matrix.
"""

from __future__ import annotations

import logging
import os
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from m_utils import SINGLE, DistContext, UserError, user_text_lines
from scoring.metrics import l2_normalize

log = logging.getLogger("m_DataLoader")

LIST_FIELDS = {
    "normal": ("spk", "path"),
    "test": ("label", "path1", "path2"),
    "triplet": ("spk", "path", "other_spk"),
    "distribution": ("spk", "path1", "path2", "flag"),
}
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
# List files


def iter_list(path: str | os.PathLike, kind: str) -> Iterator[tuple]:
    """The records of a list file of `kind` (see LIST_FIELDS), one line at a time; blank lines and
    `#` comments are skipped. Labels and flags come back as ints (0/1). Errors name the file and line.
    """
    if kind not in LIST_FIELDS:
        raise UserError(f"unknown list kind '{kind}'; known: {', '.join(LIST_FIELDS)}")
    fields = LIST_FIELDS[kind]
    path = Path(path)
    for lineno, line in enumerate(user_text_lines(path, "list file", "m_gen_list.py"), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != len(fields):
            raise UserError(f"{path}:{lineno}: a {kind} list line has {len(fields)} fields "
                            f"({' '.join(fields)}), this one has {len(parts)}: {line.strip()!r}")
        if kind == "test":
            parts[0] = _binary(parts[0], path, lineno, "label")
        elif kind == "distribution":
            parts[3] = _binary(parts[3], path, lineno, "flag")
        yield tuple(parts)


def read_list(path: str | os.PathLike, kind: str) -> list[tuple]:
    """All records of a list file of `kind` (iter_list); an empty list is a UserError."""
    records = list(iter_list(path, kind))
    if not records:
        raise UserError(f"{path}: the {kind} list is empty")
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


def _binary(value: str, path: Path, lineno: int, what: str) -> int:
    if value not in ("0", "1"):
        raise UserError(f"{path}:{lineno}: {what} must be 0 or 1, found {value!r}")
    return int(value)


def embedding_file(root: str | os.PathLike, rel: str) -> Path:
    """The `.npy` of a list entry; a `.wav`/`.flac` suffix in a list means the matching `.npy`."""
    path = Path(root) / rel
    if path.suffix.lower() in AUDIO_SUFFIXES:
        path = path.with_suffix(".npy")
    return path


# ----------------------------------------------------------------------------------------------
# Embedding files -> arrays


def check_embedding(array: np.ndarray, path: Path, dim: int | None = None) -> np.ndarray:
    """Validate an embedding file's array: (crops, D) or (D,), finite, of dimension `dim`."""
    if array.ndim not in (1, 2) or array.size == 0:
        raise UserError(f"{path}: expected an embedding of shape (crops, D) or (D,), "
                        f"found shape {array.shape}")
    if dim is not None and array.shape[-1] != dim:
        raise UserError(f"{path}: embedding dimension {array.shape[-1]} does not match nOut {dim}")
    if not np.isfinite(array).all():
        raise UserError(f"{path}: embedding holds NaN or infinite values")
    return array


_NPY_HEADER_LOCK = threading.Lock()


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """np.load of one .npy file, safe from many threads at once.

    numpy parses a .npy header with ast.literal_eval, and CPython 3.11's parser can fail
    spuriously ("AST constructor recursion depth mismatch", python/cpython#106905) when threads
    parse at the same time; so headers are parsed one at a time and only the data is read freely.
    """
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        with _NPY_HEADER_LOCK:
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
            else:
                file.seek(0)
                return np.lib.format.read_array(file, allow_pickle=False)
        if dtype.hasobject:
            raise ValueError("holds Python objects, which are not loaded")
        count = int(np.prod(shape, dtype=np.int64))
        data = np.fromfile(file, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(f"truncated: {data.size} of {count} values")
    return data.reshape(shape, order="F" if fortran_order else "C")


def read_embedding(path: Path, dim: int | None = None) -> np.ndarray:
    try:
        array = read_npy(path)
    except FileNotFoundError:
        raise UserError(f"{path}: embedding file not found (m_gen_embs.py writes them)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npy embedding ({err})") from None
    return check_embedding(np.asarray(array), path, dim)


def crop_mean(array: np.ndarray) -> np.ndarray:
    """(D,) float64 mean over the crops of a (crops, D) or (D,) embedding."""
    return array.reshape(-1, array.shape[-1]).astype(np.float64).mean(axis=0)


def single_utterance_embedding(array: np.ndarray, path: Path | None = None) -> np.ndarray:
    """Mean over crops, then L2 norm: the (D,) single-utterance embedding of one file."""
    mean = crop_mean(array)
    if np.linalg.norm(mean) == 0:
        raise UserError(f"{path}: embedding is all zeros")
    return l2_normalize(mean).astype(np.float32)


def load_embeddings(root: str | os.PathLike, rel_paths: Sequence[str], dim: int | None = None,
                    threads: int = 8, desc: str = "loading embeddings",
                    show_progress: bool = True, source: str | os.PathLike = "the list") -> np.ndarray:
    """Read and reduce the embedding file of every entry: an (N, D) float32 matrix, in order;
    `threads` reader threads, none (the calling thread) for 0."""
    files = [embedding_file(root, rel) for rel in rel_paths]
    missing = [f for f in files if not f.is_file()]
    if missing:
        shown = "\n  ".join(str(f) for f in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"{len(missing)} embedding file(s) named by {source} are missing under "
                        f"{root}:\n  {shown}{more}\n(m_gen_embs.py writes them)")

    first = single_utterance_embedding(read_embedding(files[0], dim), files[0]) if files else None
    width = dim if dim is not None else (len(first) if first is not None else 0)
    matrix = np.empty((len(files), width), np.float32)
    if first is not None:
        matrix[0] = first
    blocks = [range(start, min(start + LOAD_BLOCK, len(files)))
              for start in range(1, len(files), LOAD_BLOCK)]

    def load_block(rows: range) -> int:
        """Read a block of files straight into their rows of the matrix (no per-row copies)."""
        for row in rows:
            array = read_embedding(files[row], width)
            matrix[row] = single_utterance_embedding(array, files[row])
        return len(rows)

    # threads 0 (nDataLoaderThread 0): read in the calling thread, as the original's num_workers 0
    pool = ThreadPoolExecutor(threads) if threads > 0 else None
    with pool or nullcontext(), \
            tqdm(total=len(files), desc=desc, unit="file", leave=False,
                 disable=not show_progress or len(files) < 2000) as bar:
        for done in (pool.map if pool is not None else map)(load_block, blocks):
            bar.update(done)
    return matrix


def load_speaker_embeddings(root: str | os.PathLike, speakers: Sequence[str], embedding_type: str,
                            dim: int | None = None) -> np.ndarray:
    """The (S, D) multi-utterance embeddings of `speakers`, of `embedding_type` (B or C)."""
    pattern = embedding_type_of(embedding_type).speaker_file
    rows = []
    for spk in speakers:
        path = Path(root) / pattern.format(spk)
        if not path.is_file():
            raise UserError(f"{path}: speaker embedding not found (m_comb_embs.py writes it)")
        rows.append(crop_mean(read_embedding(path, dim)).astype(np.float32))
    return np.stack(rows)


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
# Batch fields gathered from a table of EmbeddingData (by row); the other fields are values.
GATHERED_FROM = {"inputs": "embeddings", "targets": "speaker_embeddings", "others": "speaker_embeddings"}


def shard(items: np.ndarray, ctx: DistContext) -> tuple[np.ndarray, float] | None:
    """This rank's part of one global batch and its weight, or None when some rank gets nothing."""
    if len(items) < ctx.world_size:
        return None
    part = np.array_split(items, ctx.world_size)[ctx.rank]
    return part, len(part) * ctx.world_size / len(items)


class EmbeddingData:
    """A list file's records with their embeddings held in memory.

    `kind` is normal, triplet or distribution. Speaker labels index `speakers` (the training
    speakers when given, so validation shares the training classes).
    """

    def __init__(self, list_path: str | os.PathLike, root: str | os.PathLike, kind: str,
                 embedding_type: str, dim: int | None, device: torch.device | str = "cpu",
                 speakers: Sequence[str] | None = None, threads: int = 8):
        self.kind = kind
        self.list_path = Path(list_path)
        records = read_list(list_path, kind)
        if kind == "distribution":
            files = [r[1] for r in records] + [r[2] for r in records]
        else:
            files = [r[1] for r in records]
        unique = sorted(set(files))
        row_of = {rel: i for i, rel in enumerate(unique)}
        own_speakers = sorted({r[0] for r in records} | ({r[2] for r in records}
                                                         if kind == "triplet" else set()))
        self.speakers = list(speakers) if speakers is not None else own_speakers
        label_of = {spk: i for i, spk in enumerate(self.speakers)}
        target_speakers = own_speakers  # speaker embeddings live beside this list's files
        target_of = {spk: i for i, spk in enumerate(target_speakers)}

        self.embeddings = torch.from_numpy(
            load_embeddings(root, unique, dim, threads, source=list_path)).to(device)
        self.dim = int(self.embeddings.shape[1])
        self.speaker_embeddings = torch.from_numpy(
            load_speaker_embeddings(root, target_speakers, embedding_type, self.dim)).to(device)
        if kind == "distribution":
            self.pair_a = np.array([row_of[r[1]] for r in records], np.int64)
            self.pair_b = np.array([row_of[r[2]] for r in records], np.int64)
            self.pair_same = np.array([r[3] == 1 for r in records], bool)
            spk = [r[0] for r in records]
        else:
            self.rows = np.array([row_of[r[1]] for r in records], np.int64)
            spk = [r[0] for r in records]
            if kind == "triplet":
                self.other_target = np.array([target_of[r[2]] for r in records], np.int64)
        self.target = np.array([target_of[s] for s in spk], np.int64)
        self.label = np.array([label_of.get(s, -1) for s in spk], np.int64)
        self.device = device
        self._speaker_pairs: list[np.ndarray] | None = None
        # Rows gathered at once in an epoch (0: one gather per batch). On a GPU each operation
        # costs the host a launch, the same for 200 rows as for 4,096, and steps are short.
        self.chunk_rows = GPU_CHUNK_ROWS if self.embeddings.device.type != "cpu" else 0

    def __len__(self) -> int:
        return len(self.target)

    @property
    def num_speakers(self) -> int:
        return len(set(self.target.tolist()))

    def row_speakers(self) -> np.ndarray:
        """(rows of `embeddings`,) the speaker (index into the list's speakers) of each file."""
        speaker = np.empty(len(self.embeddings), np.int64)
        if self.kind == "distribution":
            speaker[self.pair_a] = self.target
            speaker[self.pair_b] = self.target
        else:
            speaker[self.rows] = self.target
        return speaker

    # -- batch assembly ------------------------------------------------------------------------
    # A batch is first a set of index arrays (numpy), then gathered from the tables. On a GPU the
    # index arrays of a whole epoch travel in one copy (a copy per batch would make the host wait
    # for the GPU to finish the previous step every time) and rows are gathered for many batches
    # at once (see chunk_rows).

    def batch_indices(self, records: np.ndarray, batch: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Index arrays of the batch of record indices `records` (pairs for a distribution list):
        rows of the tables for the Batch fields in GATHERED_FROM, values for the others. `batch`
        numbers the batch of each record where `records` holds several batches back to back: a
        distribution batch orders its pairs by speaker, same-category pairs first."""
        if self.kind == "distribution":
            keys = (~self.pair_same[records], self.target[records]) + (() if batch is None else (batch,))
            pairs = records[np.lexsort(keys)]
            per_row = np.repeat(pairs, 2)
            return {"inputs": np.stack([self.pair_a[pairs], self.pair_b[pairs]], axis=1).reshape(-1),
                    "targets": self.target[per_row], "labels": self.label[per_row],
                    "pair_same": self.pair_same[pairs], "pair_speaker": self.target[pairs]}
        indices = {"inputs": self.rows[records], "targets": self.target[records],
                   "labels": self.label[records]}
        if self.kind == "triplet":
            indices["others"] = self.other_target[records]
        return indices

    def assemble(self, indices: dict[str, np.ndarray | torch.Tensor], weight: float = 1.0) -> Batch:
        """The Batch of `indices` (numpy, or tensors already on the tables' device)."""
        fields = {}
        for name, values in indices.items():
            table = GATHERED_FROM.get(name)
            fields[name] = (self.rows_of(getattr(self, table), values) if table is not None
                            else torch.as_tensor(values, device=self.embeddings.device))
        return Batch(**fields, weight=weight)

    @staticmethod
    def rows_of(table: torch.Tensor, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """table[rows]. On the CPU the gather runs in numpy on the tensor's own memory: torch's
        threaded indexing costs more in thread wake-ups than the copy itself for small batches."""
        if isinstance(rows, np.ndarray) and table.device.type == "cpu":
            return torch.from_numpy(table.numpy()[rows])
        return table[torch.as_tensor(rows, device=table.device)]

    def batch_of(self, records: np.ndarray, weight: float = 1.0) -> Batch:
        """The Batch of record indices `records` (pairs for a distribution list)."""
        return self.assemble(self.batch_indices(records), weight)

    def _batches_in_chunks(self, parts: Iterable[tuple[np.ndarray, float]]) -> Iterator[Batch]:
        """Batches of `parts` built with a few device operations per many steps: the epoch's index
        arrays go to the device in one copy, the table rows of about `chunk_rows` inputs are
        gathered in one operation per field, and each batch is a slice of those (a view)."""
        parts = list(parts)
        sizes = np.array([len(records) for records, _ in parts], np.int64)
        if not sizes.sum():
            return
        records = np.concatenate([records for records, _ in parts])
        indices = self.batch_indices(records, np.repeat(np.arange(len(parts)), sizes))
        record_bounds = np.concatenate([[0], np.cumsum(sizes)])
        # A field has one or two entries a record (a distribution pair gives two rows).
        bounds = {name: (record_bounds * (len(values) // len(records))).tolist()
                  for name, values in indices.items()}
        flat = {name: torch.as_tensor(values, device=self.embeddings.device)
                for name, values in indices.items()}
        names = list(indices)
        gathered_names = [name for name in names if name in GATHERED_FROM]
        starts = chunk_starts(np.diff(bounds["inputs"]), self.chunk_rows)
        for first, stop in zip(starts[:-1], starts[1:], strict=True):
            chunk = {name: getattr(self, GATHERED_FROM[name]).index_select(
                         0, flat[name][bounds[name][first]:bounds[name][stop]])
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
        if self.kind == "distribution":
            groups = self.speaker_pairs()
            order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
            step = speakers_per_step * world_size
            return [np.concatenate([groups[g] for g in order[i:i + step]])
                    for i in range(0, len(order), step)]
        if n_per_speaker > 1:
            return speaker_grouped_batches(self.target, batch_size * world_size, n_per_speaker,
                                           max_seg_per_spk, rng)
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        step = batch_size * world_size
        return [order[i:i + step] for i in range(0, len(order), step)]

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
        if self.kind == "distribution":
            return self._speaker_shard(items, ctx)
        if n_per_speaker > 1:
            return self._group_shard(items, ctx, n_per_speaker)
        return shard(items, ctx)

    def _speaker_shard(self, pairs: np.ndarray, ctx: DistContext) -> tuple[np.ndarray, float] | None:
        speakers = np.unique(self.target[pairs])
        mine = shard(speakers, ctx)
        if mine is None:
            return None
        return pairs[np.isin(self.target[pairs], mine[0])], 1.0

    @staticmethod
    def _group_shard(items: np.ndarray, ctx: DistContext,
                     n_per_speaker: int) -> tuple[np.ndarray, float] | None:
        groups = items.reshape(-1, n_per_speaker)
        mine = shard(groups, ctx)
        if mine is None:
            return None
        return mine[0].reshape(-1), mine[1]


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
    """A trial list (`label path1 path2`) with the embeddings of every file it names.

    `load` gives the (files, D) embeddings of the sorted list of files the trials name; by default
    they are read from their files under `root`. A caller that holds them already supplies them."""

    def __init__(self, list_path: str | os.PathLike, root: str | os.PathLike, dim: int | None,
                 threads: int = 8, load: Callable[[list[str]], np.ndarray] | None = None):
        self.list_path = Path(list_path)
        self.labels, self.left, self.right, self.files = read_trials(list_path)
        if load is None:
            self.embeddings = load_embeddings(root, self.files, dim, threads, desc="loading trials",
                                              source=list_path)
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
        """(trials,) index of the speaker of each trial's enrolment (left) file: its first folder."""
        speakers = np.array([Path(rel).parts[0] for rel in self.files])
        return np.unique(speakers, return_inverse=True)[1][self.left]
