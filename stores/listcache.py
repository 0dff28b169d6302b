"""What a training list resolves to in a packed store (each record's row and speaker), kept in the
store, so that a run does not parse and look up a VoxCeleb2-size list (1.09M lines) again.

The store holds one `list-<hash of the list's path>.npz` per list resolved against it: the rows,
speaker indices and speaker names, with the list file's size, mtime_ns and ctime_ns and a hash of
its bytes when kept. It is used while all three stamps are unchanged (every write sets ctime, as
stores.fresh relies on), the list's bytes hashed again where its ctime was within RACY_NS of the
keeping (a write in the same clock tick keeps the stamps). A rebuilt store is a new folder, so
its lists are resolved again. A store that cannot be written is used without a cache.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m_utils import UserError, atomic_write
from stores.fresh import RACY_NS
from stores.packed import PackedStore
from stores.source import Utterances
from stores.stamps import content_hash

log = logging.getLogger("stores")

CACHE_VERSION = 1


@dataclass
class ResolvedList:
    """A training list in a packed store: one entry per record, in the list's order."""

    rows: np.ndarray  # (records,) int64: the store row of each record's file
    speaker: np.ndarray  # (records,) int64: each record's speaker, an index into `speakers`
    speakers: list[str]  # the list's distinct speakers, sorted
    store: PackedStore

    def utterances(self, dim: int | None = None) -> Utterances:
        return self.store.utterances_at(self.rows, dim)


def cache_path(store: PackedStore, list_path: Path, kind: str) -> Path:
    name = content_hash(f"{kind}\n{list_path.resolve()}".encode()) & (2**64 - 1)
    return store.path / f"list-{name:016x}.npz"


def list_stamps(list_path: Path) -> np.ndarray | None:
    """The list file's size, mtime_ns and ctime_ns; None where it cannot be found (reading it says
    what is wrong)."""
    try:
        stat = os.stat(list_path)
    except OSError:
        return None
    return np.array([stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns], np.int64)


def resolved_list(
    list_path: str | os.PathLike, store: PackedStore, kind: str, resolve: Callable[[], ResolvedList]
) -> ResolvedList:
    """The list at `list_path` (of `kind`) resolved in `store`: from the store's cache while the
    list is unchanged, else `resolve()`, kept for the next run where the store can be written."""
    list_path = Path(list_path)
    path = cache_path(store, list_path, kind)
    stamps = list_stamps(list_path)
    if stamps is None:
        return resolve()
    found = read_cache(path, store, list_path, kind, stamps)
    if found is not None:
        return found
    taken_ns = time.time_ns()
    resolved = resolve()
    keep(path, store, list_path, kind, stamps, taken_ns, resolved)
    return resolved


def read_cache(
    path: Path, store: PackedStore, list_path: Path, kind: str, stamps: np.ndarray
) -> ResolvedList | None:
    """The kept resolution when it is of this list as it is now and of this store, else None."""
    try:
        with np.load(path) as saved:
            if (
                int(saved["version"]) != CACHE_VERSION
                or str(saved["list"]) != str(list_path.resolve())
                or str(saved["kind"]) != kind
                or str(saved["created"]) != store.header.get("created")
                or not np.array_equal(saved["stamps"], stamps)
            ):
                return None
            if stamps[2] >= int(saved["taken_ns"]) - RACY_NS and content_hash(list_path.read_bytes()) != int(
                saved["list_hash"]
            ):
                return None
            speakers = saved["speakers"].tobytes().decode().split("\n")[: int(saved["speaker_count"])]
            return ResolvedList(saved["rows"], saved["speaker"], speakers, store)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def keep(
    path: Path,
    store: PackedStore,
    list_path: Path,
    kind: str,
    stamps: np.ndarray,
    taken_ns: int,
    resolved: ResolvedList,
) -> None:
    """Write the cache of a resolution (the list's stamps from before it was read); a store that
    cannot be written is left without one."""
    try:
        now = list_stamps(list_path)
        if now is None or not np.array_equal(now, stamps):  # changed while read
            return
        list_hash = content_hash(list_path.read_bytes())
        arrays: dict[str, Any] = {
            "version": np.int64(CACHE_VERSION),
            "list": str(list_path.resolve()),
            "kind": kind,
            "created": str(store.header.get("created")),
            "stamps": stamps,
            "taken_ns": np.int64(taken_ns),
            "list_hash": np.int64(list_hash),
            "rows": np.asarray(resolved.rows, np.int64),
            "speaker": np.asarray(resolved.speaker, np.int64),
            "speakers": np.frombuffer("\n".join(resolved.speakers).encode(), np.uint8),
            "speaker_count": np.int64(len(resolved.speakers)),
        }
        atomic_write(path, lambda handle: np.savez(handle, **arrays))
    except (UserError, OSError) as err:
        log.debug("%s: the resolved list is not kept (%s)", path, err)
