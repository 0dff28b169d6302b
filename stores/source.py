"""What every embedding store answers (EmbeddingSource) and the embeddings it gives (Utterances)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m_utils import UserError
from stores.keys import key_speaker, line_naming, read_manifest, read_utt2dur, store_key

log = logging.getLogger("stores")


@dataclass
class Utterances:
    """Single-utterance embeddings of some list entries: entry i is table[rows[i]]. The table is a
    packed store's whole matrix when the entries cover it (no copy), else just their rows."""

    native: np.ndarray  # (R, D) the table as stored: float32, or a float16 store's matrix
    rows: np.ndarray  # (entries,) int64
    norms: np.ndarray | None  # (entries,) crop-mean norms before normalisation
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

    def utterances(
        self,
        rels: Sequence[str],
        dim: int | None = None,
        threads: int = 8,
        desc: str = "loading embeddings",
        show_progress: bool = True,
        source: str | os.PathLike = "the list",
    ) -> Utterances:
        raise NotImplementedError

    def speaker_embeddings(
        self, speakers: Sequence[str], embedding_type: str, dim: int | None = None
    ) -> np.ndarray:
        raise NotImplementedError

    def speaker_of(self, rels: Sequence[str]) -> list[str]:
        return [key_speaker(store_key(rel)) for rel in rels]

    @property
    def manifest(self) -> dict | None:
        return read_manifest(self.side_dir / "manifest.json")

    def durations(self, rels: Sequence[str]) -> np.ndarray | None:
        """Seconds of each entry (utt2dur), None when unknown for any of them."""
        written = read_utt2dur(self.side_dir / "utt2dur")
        if written is None:
            return None
        known = {store_key(utt): seconds for utt, seconds in written.items()}
        keys = [store_key(rel) for rel in rels]
        missing = [key for key in keys if key not in known]
        if missing:
            log.warning(
                "%s: utt2dur has no duration for %d of %d files (first: %s); durations unknown",
                self.side_dir / "utt2dur",
                len(missing),
                len(keys),
                missing[0],
            )
            return None
        return np.array([known[key] for key in keys], np.float64)

    def missing_key(self, rel: str, source: str | os.PathLike) -> UserError:
        line = line_naming(source, rel) if Path(str(source)).is_file() else None
        where = f"{source}:{line}" if line is not None else str(source)
        return UserError(f"{where}: {rel} (key {store_key(rel)}) is not in the embedding store {self.path}")
