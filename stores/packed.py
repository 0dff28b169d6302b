"""Packed stores: one memory-mapped matrix of single-utterance embeddings with its index, norms
and speaker embeddings (the layout below), opened once per process (`open_store`);
m_comb_embs.py and stores.write write them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m_utils import UserError
from stores.keys import store_keys
from stores.source import EmbeddingSource, Utterances

# Packed stores: <name>.store/ holds
#   header.json      {"format", "version", "source", "source_kind", "dtype", "utterances",
#                     "speakers", "dim", "created"}
#   embeddings.npy   (N, D) float32 or float16 single-utterance embeddings (crop mean, L2 norm)
#   keys.txt         the N store keys, in row order
#   norms.npy        (N,) float32 crop-mean norms before normalisation
#   speakers.txt     the S speaker names; speaker_of.npy (N,) int32 each row's speaker
#   speakers_B.npy, speakers_C.npy   (S, D) float32 speaker embeddings of type B and C
#   utt2dur, manifest.json           copied from the source when it had them
#   sources.txt, sources.npz         the files it was built from, their size, mtime_ns, ctime_ns
#                                    and content hash (a tree's or .scp's store; stores.fresh)

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
            raise UserError(
                f"{path}: store format version {self.header.get('version')}, this "
                f"code reads version {STORE_VERSION}; run m_comb_embs.py again"
            )
        # copy-on-write: a writable array for torch.from_numpy, never written back to the file
        self.matrix = np.load(path / "embeddings.npy", mmap_mode="c")
        self.keys = (path / "keys.txt").read_text().split("\n")[: len(self.matrix)]
        self.speakers = (path / "speakers.txt").read_text().split("\n")[: self.header["speakers"]]
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

    def utterances(
        self,
        rels: Sequence[str],
        dim: int | None = None,
        threads: int = 8,
        desc: str = "loading embeddings",
        show_progress: bool = True,
        source: str | os.PathLike = "the list",
    ) -> Utterances:
        return self.utterances_at(self.rows_of(rels, source), dim)

    def utterances_at(self, rows: np.ndarray, dim: int | None = None) -> Utterances:
        """The Utterances of the store's `rows` (as rows_of gives them)."""
        if dim is not None and dim != self.dim:
            raise UserError(f"{self.path}: embedding dimension {self.dim} does not match nOut {dim}")
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

    def speaker_embeddings(
        self, speakers: Sequence[str], embedding_type: str, dim: int | None = None
    ) -> np.ndarray:
        table = np.load(self.path / f"speakers_{embedding_type}.npy", mmap_mode="r")
        position = {name: k for k, name in enumerate(self.speakers)}
        missing = [spk for spk in speakers if spk not in position]
        if missing:
            raise UserError(
                f"{self.path}: no speaker {missing[0]} in the store ({len(missing)} speaker(s) missing)"
            )
        return np.asarray(table[[position[spk] for spk in speakers]], dtype=np.float32)


_STORES: dict[tuple[str, int], PackedStore] = {}


def open_store(path: str | os.PathLike) -> PackedStore:
    """The packed store at `path` (a `*.store` folder), opened once per process. Named directly,
    a store is used as it is (it may have no source: --generate writes them)."""
    path = Path(path)
    try:
        key = (str(path.resolve()), (path / "header.json").stat().st_mtime_ns)
    except OSError:
        raise UserError(f"{path}: packed store not found (m_comb_embs.py writes it)") from None
    if key not in _STORES:
        _STORES[key] = PackedStore(path)
    return _STORES[key]


def store_names(path: Path) -> tuple[list[str], list[str]]:
    """The keys of a packed store and their speakers, in row order (what m_gen_list lists)."""
    store = open_store(path)
    return list(store.keys), [store.speakers[s] for s in store.speaker_of_rows()]
