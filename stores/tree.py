"""The project's tree of per-utterance `.npy` files as an embedding store."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from m_utils import UserError
from stores.arrays import combine_speaker, crop_means, embedding_type_of, read_embedding, read_files
from stores.keys import embedding_file, line_naming
from stores.packed import PackedStore
from stores.source import EmbeddingSource, Utterances
from stores.stamps import folder_files

SPEAKER_THREADS = 4  # speakers whose files are read at once to combine them


class TreeSource(EmbeddingSource):
    """The project's tree of per-utterance `.npy` files. Its speakers' B/C embeddings are combined
    from their folders' files as m_comb_embs.py combines them, never read from the `<spk>.npy`
    files beside (nothing shows those as new as the utterances). A tree whose packed store is
    stale passes it with the files not shown unchanged (`unproven`): a speaker none of whose files
    is among them takes the store's B/C rows, equal to a new combination, without reading."""

    def __init__(self, root: Path, stale_store: PackedStore | None = None,
                 unproven: Iterable[str] = ()):
        self.path = self.side_dir = root
        self.stale_store = stale_store
        self.changed_speakers = {name.split("/", 1)[0] for name in unproven}

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
        embedding_type_of(embedding_type)
        store = self.stale_store
        unchanged = set() if store is None else set(store.speakers) - self.changed_speakers
        from_store = [spk for spk in speakers if spk in unchanged]
        combined = [spk for spk in speakers if spk not in unchanged]
        with ThreadPoolExecutor(SPEAKER_THREADS) as pool:
            rows = dict(zip(combined, pool.map(
                lambda spk: combine_speaker(self.speaker_means(spk, dim), embedding_type), combined),
                strict=True))
        if from_store:
            rows.update(zip(from_store, store.speaker_embeddings(from_store, embedding_type, dim),
                            strict=True))
        return np.stack([rows[spk] for spk in speakers])

    def speaker_means(self, spk: str, dim: int | None) -> np.ndarray:
        """(U, D) float64 crop means of every file of a speaker's folder, in m_comb_embs' order."""
        folder = self.path / spk
        rels = folder_files(folder) if folder.is_dir() else []
        if not rels:
            raise UserError(f"{folder}: no utterance embeddings of speaker {spk} to combine into its "
                            "speaker embeddings")
        return crop_means([read_embedding(self.path / rel, dim) for rel in rels])
