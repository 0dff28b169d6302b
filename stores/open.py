"""Opening a store by its path: a packed store (once per process), a Kaldi `.scp` or a tree, read
from its packed store while that is fresh (its source's Stamp unchanged)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from m_utils import UserError
from stores.kaldi import KaldiSource
from stores.packed import PackedStore, is_packed_store
from stores.source import EmbeddingSource
from stores.stamps import STORE_SUFFIX, Stamp, scp_entries, scp_stamp, store_path_of, tree_stamp
from stores.tree import TreeSource

log = logging.getLogger("stores")

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
