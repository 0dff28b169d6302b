"""Whether a packed store still equals the files it was built from.

A store records, for each file it was built from (stores.stamps.Sources), its size, mtime_ns and
ctime_ns at packing and a hash of its content (`sources.txt`: the names; `sources.npz`: `stats`
(F, 3) int64, `hashes` (F,) int64, `stamped_ns`). A file with all three values unchanged is
unchanged: every write sets ctime, and no user tool sets it back (`cp -p`, `rsync -a` and a
restore keep an old mtime, never an old ctime). A file of another size is changed. Where the
size is kept but a time differs (a tree copied with its store, a file touched or rewritten with
its mtime kept), the file's content is hashed again and compared: the store is kept when every
such file still holds what it was built from (its new stamps are then recorded, so the next check
is cheap), and is stale at the first one that does not. A file added or removed makes it stale.

Coarse file-system clocks: a file changed within a clock tick of its stat can keep all three
values, so a file whose recorded ctime is within RACY_NS of `stamped_ns` (when the stats were
taken) is checked by content (as git treats a "racily clean" file) until a later check, long
enough after, records it as settled.
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m_utils import UserError, atomic_write
from stores.packed import PackedStore, is_packed_store, open_store
from stores.stamps import Sources

log = logging.getLogger("stores")

RACY_NS = 2_000_000_000  # 2 s: more than the timestamp step of ext4, XFS, NFS and FAT's 2 s
VERIFY_THREADS = 8
VERIFY_BLOCK = 256  # files hashed by one thread at a time
GONE = -2  # the stamp row of a recorded file no longer there
# A store found fresh is not checked again for this long in one process: a run opens its tree for
# training, validation and trials within seconds, and the check stats every file.
FRESH_FOR_S = 60.0
_FOUND_FRESH: dict[tuple[str, int], float] = {}
_SAID_STALE: set[str] = set()


@dataclass
class Freshness:
    """The outcome of a check: `fresh`, or why not (`reason`); `unproven` names the files whose
    content was not shown unchanged (changed, added, removed, or not checked after the first
    change was found), so a caller can tell which speakers still agree with the store."""

    fresh: bool
    reason: str = ""
    unproven: set[str] = field(default_factory=set)
    verified: int = 0  # files whose content was hashed again


def record_sources(folder: Path, sources: Sources, hashes: Sequence[int] | np.ndarray) -> None:
    """Write a store's record of its sources (into the store being built)."""
    if len(hashes) != len(sources.names):
        raise ValueError(f"{len(sources.names)} sources need as many hashes, got {len(hashes)}")
    (folder / "sources.txt").write_text("".join(name + "\n" for name in sources.names))
    save_stamps(folder, sources.stats, np.asarray(hashes, np.int64), sources.taken_ns)


def save_stamps(folder: Path, stats: np.ndarray, hashes: np.ndarray, stamped_ns: int) -> None:
    atomic_write(
        folder / "sources.npz",
        lambda handle: np.savez(handle, stats=stats, hashes=hashes, stamped_ns=np.int64(stamped_ns)),
    )


def has_record(store: Path) -> bool:
    return (store / "sources.npz").is_file() and (store / "sources.txt").is_file()


def read_record(store: Path) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    with np.load(store / "sources.npz") as saved:
        stats, hashes, stamped = saved["stats"], saved["hashes"], int(saved["stamped_ns"])
    names = (store / "sources.txt").read_text().split("\n")[: len(stats)]
    return names, stats, hashes, stamped


def check_store(store: Path, now: Sources, hash_of: Callable[[str], int]) -> Freshness:
    """Check `store` against its sources as found `now`; `hash_of(name)` hashes a source's content
    as packing did. A store with no record (older than this check) is stale."""
    if not has_record(store):
        return Freshness(
            False, "it has no record of its files' stamps (packed by an older version)", set(now.names)
        )
    try:
        names, stats, hashes, stamped = read_record(store)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        return Freshness(False, f"its record of its files' stamps cannot be read ({err})", set(now.names))
    current, added = now.stats, []
    if now.names != names:  # another walk order, or files added or removed
        position = dict(zip(now.names, range(len(now.names)), strict=True))
        rows = np.array([position.get(name, -1) for name in names], np.int64)
        current = np.where((rows >= 0)[:, None], now.stats[rows], GONE)
        added = sorted(set(now.names).difference(names))
    differs = (current != stats).any(axis=1)
    racy = stats[:, 2] >= stamped - RACY_NS
    undecided = np.flatnonzero(differs | racy)
    unproven = {*added, *(names[k] for k in undecided)}
    if added:
        return Freshness(
            False, f"{len(added)} file(s) added since it was built (first: {added[0]})", unproven
        )
    resized = np.flatnonzero(current[:, 0] != stats[:, 0])
    if len(resized):
        return Freshness(
            False,
            f"{len(resized)} file(s) changed or removed since it was built (first: {names[resized[0]]})",
            unproven,
        )
    if not len(undecided):
        return Freshness(True)
    mismatch = first_mismatch([names[k] for k in undecided], hashes[undecided], hash_of)
    if mismatch is not None:
        return Freshness(
            False,
            f"{names[undecided[mismatch]]} holds other values than when it was built (its size kept)",
            unproven,
        )
    still_racy = current[:, 2] >= now.taken_ns - RACY_NS
    if differs.any() or still_racy.sum() < racy.sum():
        restamp(store, current, hashes, now.taken_ns)
    return Freshness(True, verified=len(undecided))


def first_mismatch(names: list[str], recorded: np.ndarray, hash_of: Callable[[str], int]) -> int | None:
    """The position of the first of `names` whose content hash differs from `recorded`, None when
    all agree; files hashed in blocks on threads, stopping after the first block that differs."""
    if len(names) > 1000:
        log.info("checking the content of %d files against the packed store", len(names))
    blocks = [
        range(start, min(start + VERIFY_BLOCK, len(names))) for start in range(0, len(names), VERIFY_BLOCK)
    ]

    def agrees(k: int) -> bool:
        try:
            return hash_of(names[k]) == recorded[k]
        except UserError:  # no longer readable: changed (reading the files says how)
            return False

    def block_mismatch(rows: range) -> int | None:
        return next((k for k in rows if not agrees(k)), None)

    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        for found in pool.map(block_mismatch, blocks):
            if found is not None:
                pool.shutdown(cancel_futures=True)
                return found
    return None


def restamp(store: Path, stats: np.ndarray, hashes: np.ndarray, stamped_ns: int) -> None:
    """Record the stamps of files verified by content, so the next check is cheap. A store the
    user cannot write (a colleague's) stays as it is: it is still verified each time."""
    try:
        save_stamps(store, stats, hashes, stamped_ns)
    except UserError as err:
        log.info(
            "%s: its files were verified by content, but the new stamps cannot be recorded "
            "(%s); the next run verifies them again",
            store,
            err,
        )


def fresh_store(
    store: Path, sources: Callable[[], Sources], hash_of: Callable[[str], int]
) -> tuple[PackedStore | None, Freshness | None]:
    """The packed store built from a source and the check's outcome: the store when every file
    it was built from still holds what it held then (check_store), else None (said once per
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
