"""The data path, in one place: list files -> embedding stores -> in-memory arrays -> batches.

Embeddings come from a store (`stores.open_embeddings`: a tree of `.npy` files, a Kaldi `.scp`
or a packed store; the `stores/` package holds them all). Every embedding named by a list is reduced
once to its single-utterance embedding (mean over crops, then L2 norm) and kept in one matrix;
batches are index lookups into that matrix. List kinds (normal, triplet, distribution, test trials)
are small classes that know their fields, how m_gen_list.py writes them and what a batch gathers.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from m_utils import SINGLE, DistContext, UserError, read_user_text, user_text_lines
from stores.keys import key_speaker, store_key
from stores.listcache import ResolvedList, resolved_list
from stores.open import open_embeddings
from stores.packed import PackedStore
from stores.source import EmbeddingSource

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

    def index(self, data: EmbeddingData, records: list[tuple], file_rows: np.ndarray,
              target_of: dict[str, int]) -> list[str]:
        """Set the record arrays of `data` from the rows of the files `files(records)` names, in
        order; returns each record's speaker."""
        data.rows = file_rows
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

    def index(self, data: EmbeddingData, records: list[tuple], file_rows: np.ndarray,
              target_of: dict[str, int]) -> list[str]:
        data.other_target = np.array([target_of[r[2]] for r in records], np.int64)
        return super().index(data, records, file_rows, target_of)

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

    def index(self, data: EmbeddingData, records: list[tuple], file_rows: np.ndarray,
              target_of: dict[str, int]) -> list[str]:
        data.pair_a, data.pair_b = file_rows[:len(records)], file_rows[len(records):]
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
    records = plain_records(path, list_kind(kind))
    if records is None:
        records = list(iter_list(path, kind))
    if not records:
        raise UserError(f"{path}: the {list_kind(kind).name} list is empty")
    return records


def plain_records(path: str | os.PathLike, kind: ListKind) -> list[tuple] | None:
    """The records of a list of a kind without 0/1 fields whose every line is plain (its fields, no
    blank line, no `#`): one split of the whole text, no work per line, as VoxCeleb2's 1.09M-line
    training list needs. None for any other file: iter_list then reads it and says what is wrong."""
    if kind.binary or type(kind).line_parser is not ListKind.line_parser:
        return None
    text = read_user_text(path, "list file", "m_gen_list.py")
    lines = text.count("\n") + (not text.endswith("\n"))
    parts = text.split()
    width = len(kind.fields)
    if not parts or "#" in text or len(parts) != width * lines:
        return None
    return list(zip(*(parts[field::width] for field in range(width)), strict=True))


def kept_resolution(list_path: str | os.PathLike, source: EmbeddingSource,
                    kind: ListKind) -> ResolvedList | None:
    """A normal list in a packed store: each record's row and speaker, kept in the store
    (stores.listcache) so that a run does not parse the list again; None for another kind or
    store (the list is then read as it is)."""
    if not isinstance(source, PackedStore) or type(kind) is not NormalKind:
        return None

    def resolve() -> ResolvedList:
        records = read_list(list_path, kind)
        rows = source.rows_of(kind.files(records), list_path)
        speakers = sorted(spk.encode().decode() for spk in kind.speakers(records))
        position = {spk: k for k, spk in enumerate(speakers)}
        speaker = np.fromiter((position[r[0]] for r in records), np.int64, len(records))
        return ResolvedList(rows, speaker, speakers, source)

    return resolved_list(list_path, source, kind.name, resolve)


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


def rows_of_files(files: list[str], unique: list[str], rows: np.ndarray) -> np.ndarray:
    """The row of each of `files` from the rows of the (distinct) files `unique` (the same list
    object when the store took the files as they are)."""
    if unique is files:
        return np.asarray(rows, np.int64)
    row_of = dict(zip(unique, rows.tolist(), strict=True))
    return np.fromiter((row_of[name] for name in files), np.int64, len(files))


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
        source = open_embeddings(root)
        resolved = kept_resolution(list_path, source, self.list_kind)
        records = read_list(list_path, self.list_kind) if resolved is None else []
        files = self.list_kind.files(records)
        # a packed store's rows are its own: it takes the files as they are (repeats and all);
        # other stores read each distinct file once, in sorted order
        unique = files if source.own_rows else sorted(set(files))
        # copies: a name kept per speaker pinned the freed records' pools (2 GB at 9.9M lines)
        own_speakers = (resolved.speakers if resolved is not None else
                        sorted(spk.encode().decode() for spk in self.list_kind.speakers(records)))
        self.speakers = list(speakers) if speakers is not None else own_speakers
        label_of = {spk: i for i, spk in enumerate(self.speakers)}
        target_of = {spk: i for i, spk in enumerate(own_speakers)}  # beside this list's files

        utterances = (source.utterances(unique, dim, threads, source=list_path) if resolved is None
                      else resolved.utterances(dim))
        self.manifest, self.source = source.manifest, str(source.path)  # provenance (contract.md)
        # Batches gather from `table`: on the CPU the memory map itself (a float16 store's rows are
        # converted as gathered), on a GPU converted there: the host never holds a float32 copy.
        table = torch.from_numpy(utterances.native).to(device)
        self.table = table if table.device.type == "cpu" else table.float()
        self._utterances, self._embeddings = utterances, None
        self.dim = int(self.table.shape[1])
        self.speaker_embeddings = torch.from_numpy(
            source.speaker_embeddings(own_speakers, embedding_type, self.dim)).to(device)
        if resolved is None:
            file_rows = rows_of_files(files, unique, utterances.rows)
            spk = self.list_kind.index(self, records, file_rows, target_of)
            self.target = np.array([target_of[s] for s in spk], np.int64)
            self.label = np.array([label_of.get(s, -1) for s in spk], np.int64)
        else:  # a normal list: its speakers are `own_speakers`, in order
            self.rows, self.target = utterances.rows, resolved.speaker
            self.label = np.array([label_of.get(s, -1) for s in own_speakers], np.int64)[self.target]
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
