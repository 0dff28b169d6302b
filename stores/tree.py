"""The project's tree of per-utterance `.npy` files as an embedding store."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m_utils import UserError
from stores.arrays import crop_mean, embedding_type_of, read_embedding, read_files
from stores.keys import embedding_file, line_naming
from stores.source import EmbeddingSource, Utterances


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
