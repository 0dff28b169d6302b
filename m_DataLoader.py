"""The data path, in one place: list files -> embedding stores -> in-memory arrays -> batches.

Embeddings come from a store (`stores.open_embeddings`: a tree of `.npy` files, a Kaldi `.scp`
or a packed store; the `stores/` package holds them all). Every embedding named by a list is reduced
once to its single-utterance embedding (mean over crops, then L2 norm) and kept in one matrix;
a training list becomes, once, one Records of index arrays into it, and a batch is those arrays
indexed (EmbeddingData.batches). List kinds (normal, triplet, distribution, test trials) are small
classes that know their fields, how m_gen_list.py writes them and the Records they make.
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
    speaker: np.ndarray  # (N,) speaker index into `speakers`; files are sorted by speaker
    category: list[str]
    speakers: list[str]

    def span(self, index: int) -> tuple[int, int]:
        """Files are sorted by speaker, so each speaker's utterances are one range [lo, hi)."""
        return (
            int(np.searchsorted(self.speaker, index, "left")),
            int(np.searchsorted(self.speaker, index, "right")),
        )

    def of_speaker(self, index: int) -> np.ndarray:
        lo, hi = self.span(index)
        return np.arange(lo, hi)


TRIALS_PER_UTTERANCE = 4  # same-speaker and different-speaker trials per utterance, each


def speaker_pairs(paths_by_category: dict[str, list[str]]) -> tuple[list, list]:
    """Same-category pairs (consecutive files of each category) and as many different-category
    pairs, each taking one remaining file of the category with the fewest remaining files and
    one of the category with the most, while two categories have files left."""
    same = [
        (files[k], files[k + 1]) for files in paths_by_category.values() for k in range(0, len(files) - 1, 2)
    ]
    remaining = {cat: list(files) for cat, files in paths_by_category.items()}
    different: list[tuple[str, str]] = []
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
# network trains on) which files a list names and the Records it makes of them.


class ListKind:
    """A kind of list file: `fields` per line, read by `parse`, written by `lines`."""

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    binary: ClassVar[dict[int, str]] = {}  # field index -> name of a field read as a 0/1 int

    def line_parser(self, path: Path) -> Callable[..., tuple]:
        """The parser of one file's lines (a kind whose format is detected per file keeps state)."""
        return partial(self.parse, path=path)

    def parse(self, parts: list[str], path: Path, lineno: int) -> tuple:
        if len(parts) != len(self.fields):
            raise UserError(
                f"{path}:{lineno}: a {self.name} list line has {len(self.fields)} fields "
                f"({' '.join(self.fields)}), this one has {len(parts)}: {' '.join(parts)!r}"
            )
        if not self.binary:
            return tuple(parts)
        values: list[str | int] = list(parts)
        for index, what in self.binary.items():
            values[index] = _binary(parts[index], path, lineno, what)
        return tuple(values)

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
    binary = {0: "label"}  # checked by this kind's own parse, in either style
    KALDI_LABELS: ClassVar[dict[str, int]] = {"target": 1, "nontarget": 0}

    def line_parser(self, path: Path) -> Callable[[list[str], int], tuple]:
        style: list[str] = []

        def parse(parts: list[str], lineno: int) -> tuple:
            """A line of either style; the file's first line decides which."""
            here = "kaldi" if len(parts) == 3 and parts[2] in self.KALDI_LABELS else "label"
            if not style:
                style.append(here)
            elif here != style[0]:
                raise UserError(
                    f"{path}:{lineno}: a {style[0]}-style trial list ("
                    f"{self.style_text(style[0])}) has a line of the other style: "
                    f"{' '.join(parts)!r}"
                )
            if here == "kaldi":
                return self.KALDI_LABELS[parts[2]], parts[0], parts[1]
            return self.parse(parts, path, lineno)

        return parse

    @staticmethod
    def style_text(style: str) -> str:
        return "enroll test target|nontarget" if style == "kaldi" else "label path1 path2"

    def parse(self, parts: list[str], path: Path, lineno: int) -> tuple:
        if len(parts) != 3:
            raise UserError(
                f"{path}:{lineno}: a test list line has 3 fields (label path1 path2, "
                f"or enroll test target|nontarget), this one has {len(parts)}: "
                f"{' '.join(parts)!r}"
            )
        return (_binary(parts[0], path, lineno, "label"), parts[1], parts[2])

    def lines(self, corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
        """Per utterance, up to 4 same-speaker and 4 other-speaker trials, written 1, 0, 1, 0, ..."""
        lines = []
        n = len(corpus.paths)
        for i, path in enumerate(corpus.paths):
            lo, hi = corpus.span(corpus.speaker[i])
            same = lo + rng.choice(hi - lo - 1, size=min(TRIALS_PER_UTTERANCE, hi - lo - 1), replace=False)
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
    embedding as target."""

    fields: ClassVar[tuple[str, ...]] = ("spk", "path")

    def files(self, parsed: list[tuple]) -> list[str]:
        return [r[1] for r in parsed]

    def speakers(self, parsed: list[tuple]) -> set[str]:
        """The speakers whose embeddings the list's batches use."""
        return {r[0] for r in parsed}

    def records(
        self, parsed: list[tuple], file_rows: np.ndarray, target_of: dict[str, int], label_of: dict[str, int]
    ) -> Records:
        """The list's Records; `file_rows` holds the table row of each of `files(parsed)`."""
        targets, labels = speaker_indices([r[0] for r in parsed], target_of, label_of)
        return Records(inputs=file_rows, targets=targets, labels=labels)


def speaker_indices(
    speakers: list[str], target_of: dict[str, int], label_of: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(target row, class label) of each of `speakers`; -1 for a speaker without a class."""
    return (
        np.array([target_of[s] for s in speakers], np.int64),
        np.array([label_of.get(s, -1) for s in speakers], np.int64),
    )


class NormalKind(TrainingKind):
    name = "normal"

    def lines(self, corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
        return [f"{corpus.speakers[s]} {path}" for s, path in zip(corpus.speaker, corpus.paths, strict=True)]


class TripletKind(TrainingKind):
    """`spk path other_spk`: a batch also gathers the other speaker's embedding."""

    name = "triplet"
    fields = ("spk", "path", "other_spk")

    def speakers(self, parsed: list[tuple]) -> set[str]:
        return {r[0] for r in parsed} | {r[2] for r in parsed}

    def records(
        self, parsed: list[tuple], file_rows: np.ndarray, target_of: dict[str, int], label_of: dict[str, int]
    ) -> Records:
        records = super().records(parsed, file_rows, target_of, label_of)
        records.others = np.array([target_of[r[2]] for r in parsed], np.int64)
        return records

    def lines(self, corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
        """`spk path other_spk`, other_spk a random different speaker."""
        count = len(corpus.speakers)
        if count < 2:
            missing["triplets (a single speaker)"] += len(corpus.paths)
            return []
        shift = rng.integers(1, count, size=len(corpus.paths))
        other = (corpus.speaker + shift) % count
        return [
            f"{corpus.speakers[s]} {path} {corpus.speakers[o]}"
            for s, path, o in zip(corpus.speaker, corpus.paths, other, strict=True)
        ]


class DistributionKind(TrainingKind):
    """`spk path1 path2 flag` pairs (flag 1: same category): a batch is whole speakers' pairs,
    same-category pairs first, laid out as rows (2p, 2p + 1)."""

    name = "distribution"
    fields = ("spk", "path1", "path2", "flag")
    binary = {3: "flag"}

    def files(self, parsed: list[tuple]) -> list[str]:
        return [r[1] for r in parsed] + [r[2] for r in parsed]

    def records(
        self, parsed: list[tuple], file_rows: np.ndarray, target_of: dict[str, int], label_of: dict[str, int]
    ) -> Records:
        """A record per pair, laid out as batches take them: speaker by speaker, each speaker's
        same-category pairs first (in list order), then its others."""
        targets, labels = speaker_indices([r[0] for r in parsed], target_of, label_of)
        same = np.array([r[3] == 1 for r in parsed], bool)
        order = np.lexsort((~same, targets))
        return Records(
            inputs=file_rows.reshape(2, -1).T[order],
            targets=targets[order],
            labels=labels[order],
            pair_same=same[order],
        )

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
LIST_KINDS: dict[str, ListKind] = {
    kind.name: kind for kind in (NormalKind(), TrialKind(), TripletKind(), DistributionKind())
}


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
    for lineno, line in enumerate(user_text_lines(path, "list file", "m_gen_list.py"), start=1):
        parts = line.split()
        if not parts or parts[0][0] == "#":
            continue
        yield parse(parts, lineno=lineno)


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
    if kind.binary:
        return None
    text = read_user_text(path, "list file", "m_gen_list.py")
    lines = text.count("\n") + (not text.endswith("\n"))
    parts = text.split()
    width = len(kind.fields)
    if not parts or "#" in text or len(parts) != width * lines:
        return None
    return list(zip(*(parts[field::width] for field in range(width)), strict=True))


def speaker_names(speakers: Iterable[str]) -> list[str]:
    """The sorted speaker names, as copies: a name kept from the parsed records would keep the
    memory of the freed records in use (tests/BENCHMARK.md, "Plain code")."""
    return sorted(spk.encode().decode() for spk in speakers)


def kept_resolution(
    list_path: str | os.PathLike, source: EmbeddingSource, kind: ListKind
) -> ResolvedList | None:
    """A normal list in a packed store: each record's row and speaker, kept in the store
    (stores.listcache) so that a run does not parse the list again; None for another kind or
    store (the list is then read as it is)."""
    if not isinstance(source, PackedStore) or type(kind) is not NormalKind:
        return None

    def resolve() -> ResolvedList:
        records = read_list(list_path, kind)
        rows = source.rows_of(kind.files(records), list_path)
        speakers = speaker_names(kind.speakers(records))
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


def load_embeddings(
    root: str | os.PathLike,
    rel_paths: Sequence[str],
    dim: int | None = None,
    threads: int = 8,
    desc: str = "loading embeddings",
    show_progress: bool = True,
    source: str | os.PathLike = "the list",
) -> np.ndarray:
    """The (N, D) float32 single-utterance embeddings of the list entries `rel_paths`, in order,
    from the store `root` (tree, .scp or packed store); `threads` reader threads for files."""
    return open_embeddings(root).utterances(rel_paths, dim, threads, desc, show_progress, source).matrix()


def load_speaker_embeddings(
    root: str | os.PathLike, speakers: Sequence[str], embedding_type: str, dim: int | None = None
) -> np.ndarray:
    """The (S, D) multi-utterance embeddings of `speakers`, of `embedding_type` (B or C)."""
    return open_embeddings(root).speaker_embeddings(speakers, embedding_type, dim)


# ----------------------------------------------------------------------------------------------
# Batches


@dataclass
class Records:
    """A training list as flat index arrays, one entry per record (a distribution list's record
    is a pair), built once by its TrainingKind; a batch is these arrays indexed by its records.
    Records are in list order, but for a distribution list's, laid out speaker by speaker."""

    inputs: np.ndarray  # (R,) row of `table` of each record's file; (R, 2) a pair's two rows
    targets: np.ndarray  # (R,) its speaker: row of `speaker_embeddings`
    labels: np.ndarray  # (R,) its class: index into `speakers`, -1 for a speaker without one
    others: np.ndarray | None = None  # (R,) triplet: another speaker's row
    pair_same: np.ndarray | None = None  # (R,) distribution: True for a same-category pair


@dataclass(frozen=True)
class Sampling:
    """How an epoch's batches are drawn: the trainer's options of the same meaning."""

    batch_size: int  # records a step and process (normal and triplet lists)
    seed: int = 10
    n_per_speaker: int = 1  # utterances of one speaker grouped in a batch (nPerSpeaker)
    max_seg_per_spk: int = 500  # utterances per speaker and epoch with n_per_speaker > 1
    speakers_per_step: int = 1  # distribution lists: speakers a step and process
    shuffle: bool = True


@dataclass
class Batch:
    """One step's data. DA batches lay pairs out as rows (2p, 2p + 1) of `inputs`."""

    inputs: torch.Tensor  # (N, D) single-utterance embeddings to enhance
    targets: torch.Tensor  # (N, D) their speakers' multi-utterance embeddings
    labels: torch.Tensor  # (N,) speaker index, -1 for a speaker unknown to training
    others: torch.Tensor | None = None  # (N, D) another speaker's embedding (triplet)
    pair_same: torch.Tensor | None = None  # (P,) True for a same-category pair (DA)
    pair_speaker: torch.Tensor | None = None  # (P,) speaker group of each pair (DA)
    weight: float = 1.0  # this rank's share of the global batch x world size
    records: np.ndarray | None = None  # its records: indices into EmbeddingData.records

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


def rows_of_files(files: list[str], unique: list[str], rows: np.ndarray) -> np.ndarray:
    """The row of each of `files` from the rows of the (distinct) files `unique` (the same list
    object when the store took the files as they are)."""
    if unique is files:
        return np.asarray(rows, np.int64)
    row_of = dict(zip(unique, rows.tolist(), strict=True))
    return np.fromiter((row_of[name] for name in files), np.int64, len(files))


class EmbeddingData:
    """A training list's Records with their embeddings held in memory (a packed store's memory map
    when the list names all of it, with no copy on the CPU); `batches` draws an epoch from them.

    `kind` is normal, triplet or distribution. Speaker labels index `speakers` (the training
    speakers when given, so validation shares the training classes). `root` is the embedding
    store (tree, .scp or packed store).
    """

    def __init__(
        self,
        list_path: str | os.PathLike,
        root: str | os.PathLike,
        kind: str,
        embedding_type: str,
        dim: int | None,
        device: torch.device | str = "cpu",
        speakers: Sequence[str] | None = None,
        threads: int = 8,
    ):
        self.list_kind = training_kind(kind)
        self.kind = self.list_kind.name
        source = open_embeddings(root)
        resolved = kept_resolution(list_path, source, self.list_kind)
        parsed = read_list(list_path, self.list_kind) if resolved is None else []
        files = self.list_kind.files(parsed)
        # a packed store's rows are its own: it takes the files as they are (repeats and all);
        # other stores read each distinct file once, in sorted order
        unique = files if source.own_rows else sorted(set(files))
        own_speakers = (
            resolved.speakers if resolved is not None else speaker_names(self.list_kind.speakers(parsed))
        )
        self.speakers = list(speakers) if speakers is not None else own_speakers
        label_of = {spk: i for i, spk in enumerate(self.speakers)}
        target_of = {spk: i for i, spk in enumerate(own_speakers)}  # beside this list's files

        utterances = (
            source.utterances(unique, dim, threads, source=list_path)
            if resolved is None
            else resolved.utterances(dim)
        )
        self.manifest, self.source = source.manifest, str(source.path)  # provenance (contract.md)
        # Batches gather from `table`: on the CPU the memory map itself (a float16 store's rows are
        # converted as gathered), on a GPU converted there: the host never holds a float32 copy.
        table = torch.from_numpy(utterances.native).to(device)
        self.table = table if table.device.type == "cpu" else table.float()
        self._utterances = utterances
        self._embeddings: torch.Tensor | None = None
        self.dim = int(self.table.shape[1])
        self.speaker_embeddings = torch.from_numpy(
            source.speaker_embeddings(own_speakers, embedding_type, self.dim)
        ).to(device)
        if resolved is None:
            self.records = self.list_kind.records(
                parsed, rows_of_files(files, unique, utterances.rows), target_of, label_of
            )
        else:  # a normal list: its speakers are `own_speakers`, in order
            labels = np.array([label_of.get(s, -1) for s in own_speakers], np.int64)[resolved.speaker]
            self.records = Records(inputs=utterances.rows, targets=resolved.speaker, labels=labels)

    def __len__(self) -> int:
        return len(self.records.targets)

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
        return len(np.unique(self.records.targets))

    def row_speakers(self) -> np.ndarray:
        """(rows of `embeddings`,) the speaker (index into the list's speakers) of each file."""
        speaker = np.empty(len(self.table), np.int64)
        inputs = self.records.inputs
        speaker[inputs.reshape(len(inputs), -1)] = self.records.targets[:, None]
        return speaker

    def batches(self, epoch: int, sampling: Sampling, ctx: DistContext = SINGLE) -> Iterator[Batch]:
        """This process's batches of one epoch. The global batches depend on the seed and the epoch
        alone; each process takes its share of every one, whole groups, and weighs its loss by its
        share, so that DDP's mean over the processes is the loss of the global batch."""
        rng = np.random.default_rng([sampling.seed, epoch])
        for items, starts in global_batches(self.records, sampling, rng, ctx.world_size):
            if len(starts) < ctx.world_size:
                continue  # some process would get nothing: every process leaves it out
            lo, hi = process_share(len(starts), ctx)
            bounds = np.append(starts, len(items))
            mine = items[bounds[lo] : bounds[hi]]
            # a DA loss is a mean over speakers, each process's over its own: unweighted
            weight = 1.0 if self.records.pair_same is not None else len(mine) * ctx.world_size / len(items)
            yield self.batch(mine, weight)

    def batch(self, records: np.ndarray, weight: float = 1.0) -> Batch:
        """The Batch of `records` (indices into `self.records`): the tables' rows gathered on their
        device. A pair gives two rows of inputs, targets and labels."""
        r, device = self.records, self.table.device
        per_row = records if r.inputs.ndim == 1 else np.repeat(records, 2)
        batch = Batch(
            inputs=rows_of(self.table, r.inputs[records].reshape(-1)),
            targets=rows_of(self.speaker_embeddings, r.targets[per_row]),
            labels=torch.as_tensor(r.labels[per_row], device=device),
            weight=weight,
            records=records,
        )
        if r.others is not None:
            batch.others = rows_of(self.speaker_embeddings, r.others[records])
        if r.pair_same is not None:
            batch.pair_same = torch.as_tensor(r.pair_same[records], device=device)
            batch.pair_speaker = torch.as_tensor(r.targets[records], device=device)
        return batch


def rows_of(table: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """table[rows] as float32. On the CPU the gather runs in numpy on the tensor's own memory:
    torch's threaded indexing costs more in thread wake-ups than the copy itself for small
    batches; a float16 table's rows are converted after the gather (only the batch's rows)."""
    if table.device.type == "cpu":
        return torch.from_numpy(table.numpy()[rows]).float()
    return table[torch.as_tensor(rows, device=table.device)].float()


def global_batches(
    records: Records, sampling: Sampling, rng: np.random.Generator, world_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The epoch's batches over all processes, each (its record indices, where each of its groups
    starts): a group, which one process takes whole, is a record, an nPerSpeaker group or (a
    distribution list) a speaker's pairs, whole speakers a step in speaker order."""
    count = len(records.targets)
    if records.pair_same is not None:
        first = np.flatnonzero(np.diff(records.targets, prepend=-1))  # records are by speaker
        ends = np.append(first[1:], count)
        order = rng.permutation(len(first)) if sampling.shuffle else np.arange(len(first))
        step = sampling.speakers_per_step * world_size
        batches = []
        for i in range(0, len(order), step):
            chosen = np.sort(order[i : i + step])
            sizes = ends[chosen] - first[chosen]
            items = np.concatenate([np.arange(first[g], ends[g]) for g in chosen])
            batches.append((items, np.cumsum(sizes) - sizes))
        return batches
    if sampling.n_per_speaker > 1:
        n = sampling.n_per_speaker
        return [
            (items, np.arange(0, len(items), n))
            for items in speaker_grouped_batches(
                records.targets, sampling.batch_size * world_size, n, sampling.max_seg_per_spk, rng
            )
        ]
    order = rng.permutation(count) if sampling.shuffle else np.arange(count)
    step = sampling.batch_size * world_size
    return [(order[i : i + step], np.arange(len(order[i : i + step]))) for i in range(0, count, step)]


def process_share(groups: int, ctx: DistContext) -> tuple[int, int]:
    """The range [lo, hi) of `groups` this process takes: as numpy's array_split, the first
    `groups % world_size` processes one more."""
    each, extra = divmod(groups, ctx.world_size)
    lo = ctx.rank * each + min(ctx.rank, extra)
    return lo, lo + each + (ctx.rank < extra)


def speaker_grouped_batches(
    speaker: np.ndarray,
    groups_per_batch: int,
    n_per_speaker: int,
    max_seg_per_spk: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """nPerSpeaker sampling: batches of `groups_per_batch` groups of `n_per_speaker` utterances
    of one speaker, at most `max_seg_per_spk` utterances a speaker, no speaker twice in a batch."""
    groups, group_speaker, rounds = [], [], []
    for spk in np.unique(speaker):
        utts = rng.permutation(np.flatnonzero(speaker == spk))[:max_seg_per_spk]
        usable = len(utts) - len(utts) % n_per_speaker
        for k, start in enumerate(range(0, usable, n_per_speaker)):
            groups.append(utts[start : start + n_per_speaker])
            group_speaker.append(spk)
            rounds.append(k)
    if not groups:
        return []
    # Shuffle, then order by round: each speaker's k-th group lands after all (k-1)-th groups,
    # so a speaker recurs only once every other speaker of its round has been placed.
    order = rng.permutation(len(groups))
    order = order[np.argsort(np.asarray(rounds)[order], kind="stable")]
    batches: list[np.ndarray] = []
    current: list[np.ndarray] = []
    seen: set[str] = set()
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

    def __init__(
        self,
        list_path: str | os.PathLike,
        root: str | os.PathLike,
        dim: int | None,
        threads: int = 8,
        load: Callable[[list[str]], np.ndarray] | None = None,
    ):
        self.list_path = Path(list_path)
        self.labels, self.left, self.right, self.files = read_trials(list_path)
        self.store: EmbeddingSource | None = None
        self.durations = self.norms = self.manifest = None
        self.source = str(root)
        if load is None:
            self.store = open_embeddings(root)
            utterances = self.store.utterances(
                self.files, dim, threads, desc="loading trials", source=list_path
            )
            self.embeddings = np.asarray(utterances.matrix())
            self.norms, self.source = utterances.norms, str(self.store.path)
            self.durations, self.manifest = self.store.durations(self.files), self.store.manifest
        else:
            self.embeddings = load(self.files)
            if len(self.embeddings) != len(self.files):
                raise ValueError(
                    f"{len(self.files)} files need as many embeddings, got {len(self.embeddings)}"
                )
        if len(np.unique(self.labels)) < 2:
            raise UserError(
                f"{self.list_path}: a trial list needs both target (1) and "
                "non-target (0) trials to compute an EER"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def speaker_of_trials(self) -> np.ndarray:
        """(trials,) index of the speaker of each trial's enrolment (left) file: its first folder,
        or its utt2spk speaker."""
        names = (
            self.store.speaker_of(self.files)
            if self.store is not None
            else [key_speaker(store_key(rel)) for rel in self.files]
        )
        return np.unique(np.array(names), return_inverse=True)[1][self.left]
