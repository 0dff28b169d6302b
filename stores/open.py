"""Opening a store by its path: a packed store (once per process), a Kaldi `.scp` or a tree, read
from its packed store while every file it was built from is unchanged (stores.fresh)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from m_utils import UserError
from stores.arrays import crop_mean, read_embedding
from stores.fresh import Freshness, check_store
from stores.kaldi import KaldiSource
from stores.packed import PackedStore, is_packed_store
from stores.source import EmbeddingSource
from stores.stamps import (
    STORE_SUFFIX,
    Sources,
    ark_of,
    content_hash,
    file_hash,
    scp_entries,
    scp_sources,
    store_path_of,
    tree_sources,
)
from stores.tree import TreeSource

log = logging.getLogger("stores")

_STORES: dict[tuple[str, int], PackedStore] = {}
_SAID_STALE: set[str] = set()
# A store found fresh is not checked again for this long in one process: a run opens its tree for
# training, validation and trials within seconds, and the check stats every file.
FRESH_FOR_S = 60.0
_FOUND_FRESH: dict[tuple[str, int], float] = {}


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


def fresh_store(
    store: Path, sources: Callable[[], Sources], hash_of: Callable[[str], int]
) -> tuple[PackedStore | None, Freshness | None]:
    """The packed store built from a source and the check's outcome: the store when every file
    it was built from still holds what it held then (stores.fresh), else None (said once per
    process); (None, None) where there is no store."""
    if not is_packed_store(store):
        return None, None
    opened = open_store(store)
    key = (str(store.resolve()), (store / "header.json").stat().st_mtime_ns)
    if time.monotonic() - _FOUND_FRESH.get(key, -FRESH_FOR_S) < FRESH_FOR_S:
        return opened, Freshness(True)
    found = check_store(store, sources(), hash_of)
    if found.fresh:
        _FOUND_FRESH[key] = time.monotonic()
        if found.verified:
            log.info(
                "%s: %d file(s) verified by content (their times changed, not what they "
                "hold); the store is used",
                store,
                found.verified,
            )
        return opened, found
    if str(store) not in _SAID_STALE:
        _SAID_STALE.add(str(store))
        log.warning(
            "%s is not used: %s. Reading the files instead; run m_comb_embs.py again to rebuild it",
            store,
            found.reason,
        )
    return None, found


def forget_freshness() -> None:
    """Check every store's freshness again on its next use (after files changed in this process)."""
    _FOUND_FRESH.clear()
    _SAID_STALE.clear()


def tree_hash_of(root: Path) -> Callable[[str], int]:
    """How packing hashed a tree's source file: an utterance file by its float64 crop mean, a side
    file (no `/` in its name) by its bytes."""

    def hash_of(name: str) -> int:
        if "/" not in name:
            return file_hash(root / name)
        return content_hash(crop_mean(read_embedding(root / name)))

    return hash_of


def scp_hash_of(scp: Path, entries: Sequence[tuple[str, str]]) -> Callable[[str], int]:
    """How packing hashed a .scp's source file: an ark by the float64 crop means of its
    utterances in the .scp's order, the .scp and its side files by their bytes."""
    utts_of: dict[str, list[str]] = {}
    for utt, location in entries:
        utts_of.setdefault(ark_of(location), []).append(utt)
    reader: list[KaldiSource] = []

    def hash_of(name: str) -> int:
        if name not in utts_of:
            return file_hash(scp if name == scp.name else scp.parent / name)
        if not reader:
            reader.append(KaldiSource(scp, list(entries)))
        return content_hash(reader[0].means(utts_of[name]))

    return hash_of


def open_embeddings(path: str | os.PathLike) -> EmbeddingSource:
    """The embedding store at `path`: a packed store (`*.store`), a Kaldi `.scp` or a tree of
    `.npy` files. A tree or `.scp` whose packed store (m_comb_embs.py) is fresh is read from it."""
    path = Path(path)
    if path.suffix == STORE_SUFFIX:
        return open_store(path)
    if path.suffix == ".scp":
        entries = scp_entries(path)
        packed, _ = fresh_store(
            store_path_of(path), lambda: scp_sources(path, entries), scp_hash_of(path, entries)
        )
        return packed if packed is not None else KaldiSource(path, entries)
    if not path.is_dir():
        raise UserError(
            f"{path}: embedding store not found (a folder of .npy files, a Kaldi .scp "
            "or a packed .store; m_gen_embs.py and m_comb_embs.py write them)"
        )
    store = store_path_of(path)
    packed, found = fresh_store(store, lambda: tree_sources(path), tree_hash_of(path))
    if packed is not None:
        return packed
    if found is None:
        return TreeSource(path)
    return TreeSource(path, open_store(store), found.unproven)
