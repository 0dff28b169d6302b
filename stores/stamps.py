"""The files a packed store is built from and their stamps (what shows a store fresh): the
speaker folders and `.npy` files of a tree, the lines and ark files of a Kaldi `.scp`, each
file's size, mtime and ctime, and a hash of what it holds."""

from __future__ import annotations

import hashlib
import os
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m_utils import LOCK_NAME, UserError, user_text_lines
from stores.keys import store_key

STORE_SUFFIX = ".store"
TREE_STORE = "embeddings.store"  # the packed store of a tree, inside it
SIDE_FILES = ("utt2dur", "manifest.json")  # carried into a packed store when the source has them
KALDI_SIDE_FILES = ("utt2spk", *SIDE_FILES)  # beside a .scp: its speakers too
IGNORED_NAMES = (LOCK_NAME, *SIDE_FILES)
MISSING = (-1, -1, -1)  # the stamp of a side file that does not exist


@dataclass
class Sources:
    """The files a store is built from, as found at `taken_ns` (time.time_ns() before the first
    stat): their names (a tree's relative paths in walk order, then its side files) and (F, 3)
    int64 `stats`: size, mtime_ns and ctime_ns, MISSING for a side file that does not exist.
    ctime is set by the kernel on every change and no user tool sets it back, so a file whose
    three values are unchanged is unchanged (see stores.fresh for coarse clocks)."""

    names: list[str]
    stats: np.ndarray
    taken_ns: int


def stat_row(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def stats_array(rows: list[tuple[int, int, int]]) -> np.ndarray:
    return np.array(rows, np.int64).reshape(len(rows), 3)


def side_stats(folder: Path, names: Sequence[str]) -> list[tuple[int, int, int]]:
    """The stat rows of the named files of `folder`, MISSING where one does not exist."""
    rows = []
    for name in names:
        try:
            rows.append(stat_row((folder / name).stat()))
        except FileNotFoundError:
            rows.append(MISSING)
    return rows


def speaker_folders(root: Path) -> list[Path]:
    """The speaker folders of a tree, sorted (hidden names and packed stores ignored)."""
    with os.scandir(root) as entries:
        return sorted(
            Path(e.path)
            for e in entries
            if e.is_dir() and not e.name.startswith(".") and not e.name.endswith(STORE_SUFFIX)
        )


def utterance_entries(folder: Path) -> Iterator[tuple[os.DirEntry, str]]:
    """The `.npy` files below `folder` (any depth) with the `/`-joined path of their folder relative
    to `folder`'s parent; hidden names and packed stores are skipped. One scandir pass."""
    pending = [(str(folder), folder.name + "/")]
    while pending:
        path, prefix = pending.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_dir():
                    if not name.endswith(STORE_SUFFIX):
                        pending.append((entry.path, prefix + name + "/"))
                elif name.endswith(".npy"):
                    yield entry, prefix


def folder_files(folder: Path) -> list[str]:
    """The `.npy` files below `folder` as `/`-joined paths relative to its parent, sorted as pathlib
    sorts them."""
    found = [prefix + entry.name for entry, prefix in utterance_entries(folder)]
    return sorted_files(found)


def sorted_files(rels: list[str]) -> list[str]:
    """`/`-joined relative paths sorted as pathlib sorts them (component by component)."""
    return sorted(rels, key=lambda rel: rel.split("/"))


def tree_sources(root: Path) -> Sources:
    """Every utterance file of a tree in walk order, then its side files (utt2dur, manifest), with
    a stat each: the freshness check of a tree (one scandir walk and a stat per file)."""
    taken = time.time_ns()
    names, values = [], array("q")  # 24 bytes a file, not a tuple of three ints
    for folder in speaker_folders(root):
        for entry, prefix in utterance_entries(folder):
            stat = entry.stat()
            names.append(prefix + entry.name)
            values.extend((stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    for row in side_stats(root, SIDE_FILES):
        values.extend(row)
    stats = np.frombuffer(values, np.int64).reshape(-1, 3).copy()
    return Sources(names + list(SIDE_FILES), stats, taken)


def scp_entries(scp: Path) -> list[tuple[str, str]]:
    """(utterance id, `ark:offset` location) of every line of a Kaldi .scp; errors name the line
    (and, for an utterance listed twice, the line that listed it first)."""
    entries = []
    first_line: dict[str, int] = {}  # store key -> the line that gave it
    for lineno, line in enumerate(user_text_lines(scp, "Kaldi scp file"), start=1):
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        if len(parts) != 2:
            raise UserError(
                f"{scp}:{lineno}: a .scp line is `utterance-id ark-file:offset`, found {line.strip()!r}"
            )
        key = store_key(parts[0])
        if key in first_line:
            raise UserError(
                f"{scp}:{lineno}: utterance {parts[0]} is listed twice (first on line {first_line[key]})"
            )
        first_line[key] = lineno
        entries.append((parts[0], parts[1]))
    if not entries:
        raise UserError(f"{scp}: the .scp file is empty")
    return entries


def ark_of(location: str) -> str:
    """The ark file of a .scp location `file.ark:123` (or `file.ark:123[0:9]`)."""
    return location.rsplit(":", 1)[0] if ":" in location else location


def scp_arks(entries: Sequence[tuple[str, str]]) -> list[str]:
    """The ark files a .scp names, sorted, as it names them."""
    return sorted({ark_of(location) for _, location in entries})


def scp_sources(scp: Path, entries: Sequence[tuple[str, str]]) -> Sources:
    """The .scp itself, its ark files (as the .scp names them) and the Kaldi side files beside it
    (utt2spk, utt2dur, manifest), with a stat each."""
    taken = time.time_ns()
    arks = scp_arks(entries)
    rows = [
        stat_row(scp.stat()),
        *(stat_row(Path(ark).stat()) for ark in arks),
        *side_stats(scp.parent, KALDI_SIDE_FILES),
    ]
    return Sources([scp.name, *arks, *KALDI_SIDE_FILES], stats_array(rows), taken)


def content_hash(data: bytes | memoryview | np.ndarray) -> int:
    """A 64-bit hash (signed, for an int64 array) of bytes or of an array's C-ordered bytes."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).data
    hasher = content_hasher()
    hasher.update(data)
    return hash_value(hasher)


def content_hasher() -> hashlib.blake2b:
    """content_hash in pieces: update() it with the bytes in order, then hash_value() it (the same
    value as content_hash of all of them at once)."""
    return hashlib.blake2b(digest_size=8)


def hash_value(hasher: hashlib.blake2b) -> int:
    return int.from_bytes(hasher.digest(), "little", signed=True)


def file_hash(path: Path) -> int:
    """content_hash of a file's bytes; 0 for a file that does not exist (as MISSING's hash)."""
    try:
        return content_hash(path.read_bytes())
    except FileNotFoundError:
        return 0


def side_hashes(folder: Path, names: Sequence[str]) -> list[int]:
    return [file_hash(folder / name) for name in names]
