"""Opening a store by its path, as its kind (stores.kinds) opens it: a packed store once per
process, a Kaldi `.scp` or a tree from its packed store while every file it was built from is
unchanged (stores.fresh), else from its files."""

from __future__ import annotations

import os
from pathlib import Path

from stores.fresh import forget_freshness
from stores.kinds import kind_of
from stores.packed import open_store
from stores.source import EmbeddingSource
from stores.tree import tree_hash_of

__all__ = ["forget_freshness", "open_embeddings", "open_store", "tree_hash_of"]  # as callers import them


def open_embeddings(path: str | os.PathLike) -> EmbeddingSource:
    """The embedding store at `path`: a packed store (`*.store`), a Kaldi `.scp`, a tree of `.npy`
    files or another kind of stores.kinds. A tree or `.scp` whose packed store (m_comb_embs.py)
    is fresh is read from it."""
    return kind_of(path).open(Path(path))
