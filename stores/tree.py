"""The project's tree of per-utterance `.npy` files as an embedding store: reading it (through
its packed store while that is fresh), where its packed store lies and what m_gen_list lists."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from m_utils import UserError
from stores.arrays import (
    EMBEDDING_TYPES,
    combine_speaker,
    crop_mean,
    crop_means,
    embedding_type_of,
    read_embedding,
    read_files,
)
from stores.fresh import fresh_store
from stores.keys import embedding_file, key_speaker, line_naming, store_keys
from stores.packed import PackedStore, open_store
from stores.source import EmbeddingSource, Utterances
from stores.stamps import TREE_STORE, content_hash, file_hash, folder_files, speaker_folders, tree_sources

SPEAKER_THREADS = 4  # speakers whose files are read at once to combine them


class TreeSource(EmbeddingSource):
    """The project's tree of per-utterance `.npy` files. Its speakers' B/C embeddings are combined
    from their folders' files as m_comb_embs.py combines them, never read from the `<spk>.npy`
    files beside (nothing shows those as new as the utterances). A tree whose packed store is
    stale passes it with the files not shown unchanged (`unproven`): a speaker none of whose files
    is among them takes the store's B/C rows, equal to a new combination, without reading."""

    def __init__(self, root: Path, stale_store: PackedStore | None = None, unproven: Iterable[str] = ()):
        self.path = self.side_dir = root
        self.stale_store = stale_store
        self.changed_speakers = {name.split("/", 1)[0] for name in unproven}
        self.combined: dict[str, dict[str, np.ndarray]] = {}  # B/C of speakers whose files were read

    def utterances(
        self,
        rels: Sequence[str],
        dim: int | None = None,
        threads: int = 8,
        desc: str = "loading embeddings",
        show_progress: bool = True,
        source: str | os.PathLike = "the list",
    ) -> Utterances:
        files = [embedding_file(self.path, rel) for rel in rels]
        missing = [k for k, f in enumerate(files) if not f.is_file()]
        if missing:
            shown = "\n  ".join(str(files[k]) for k in missing[:5])
            more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            line = line_naming(source, rels[missing[0]]) if Path(str(source)).is_file() else None
            where = f"{source}:{line}" if line is not None else str(source)
            raise UserError(
                f"{len(missing)} embedding file(s) named by {where} are missing under "
                f"{self.path}:\n  {shown}{more}\n(m_gen_embs.py writes them)"
            )
        gathered = SpeakerGather(self.path, store_keys(rels), self.vouched_speakers())
        matrix, norms = read_files(files, dim, threads, desc, show_progress, gathered.keep)
        self.combined.update(gathered.combined)
        return Utterances(matrix, np.arange(len(files)), norms)

    def vouched_speakers(self) -> set[str]:
        """Speakers whose B/C rows the stale store holds as a new combination would give."""
        if self.stale_store is None:
            return set()
        return set(self.stale_store.speakers) - self.changed_speakers

    def speaker_embeddings(
        self, speakers: Sequence[str], embedding_type: str, dim: int | None = None
    ) -> np.ndarray:
        embedding_type_of(embedding_type)
        vouched = self.vouched_speakers()
        from_store = [spk for spk in speakers if spk in vouched]
        rows = {spk: self.combined[spk][embedding_type] for spk in speakers if spk in self.combined}
        unread = [spk for spk in speakers if spk not in vouched and spk not in rows]
        with ThreadPoolExecutor(SPEAKER_THREADS) as pool:
            rows.update(
                zip(
                    unread,
                    pool.map(
                        lambda spk: combine_speaker(self.speaker_means(spk, dim), embedding_type), unread
                    ),
                    strict=True,
                )
            )
        if from_store and self.stale_store is not None:
            rows.update(
                zip(
                    from_store,
                    self.stale_store.speaker_embeddings(from_store, embedding_type, dim),
                    strict=True,
                )
            )
        return np.stack([rows[spk] for spk in speakers])

    def speaker_means(self, spk: str, dim: int | None) -> np.ndarray:
        """(U, D) float64 crop means of every file of a speaker's folder, in m_comb_embs' order."""
        folder = self.path / spk
        rels = folder_files(folder) if folder.is_dir() else []
        if not rels:
            raise UserError(
                f"{folder}: no utterance embeddings of speaker {spk} to combine into its speaker embeddings"
            )
        return crop_means([read_embedding(self.path / rel, dim) for rel in rels])


class SpeakerGather:
    """Combines the B and C embeddings of each speaker a read covers whole (every file of its
    folder among the keys read) from the crop means the read gives, so its files are not read
    again for them; a speaker's means are held only until its last file is read."""

    def __init__(self, root: Path, keys: Sequence[str], skip: set[str]):
        self.lock = threading.Lock()
        self.keys = keys
        self.combined: dict[str, dict[str, np.ndarray]] = {}
        self.position: dict[str, dict[str, int]] = {}  # speaker -> key -> row in its folder's order
        self.means: dict[str, np.ndarray] = {}
        self.left: dict[str, int] = {}
        read = set(keys)
        for spk in sorted({key.split("/", 1)[0] for key in keys if "/" in key} - skip):
            folder = store_keys(folder_files(root / spk)) if (root / spk).is_dir() else []
            if folder and read.issuperset(folder):
                self.position[spk] = {key: k for k, key in enumerate(folder)}
                self.left[spk] = len(folder)

    def keep(self, rows: range, arrays: list[np.ndarray]) -> None:
        means = np.stack([crop_mean(a) for a in arrays])  # as read_files and m_comb_embs take them
        with self.lock:
            for row, mean in zip(rows, means, strict=True):
                key = self.keys[row]
                spk = key.split("/", 1)[0]
                k = self.position.get(spk, {}).pop(key, None)
                if k is None:  # not a speaker read whole, or a key read twice
                    continue
                if spk not in self.means:
                    self.means[spk] = np.empty((self.left[spk], len(mean)), np.float64)  # none counted yet
                self.means[spk][k] = mean
                self.left[spk] -= 1
                if not self.left[spk]:
                    done = self.means.pop(spk)
                    self.combined[spk] = {name: combine_speaker(done, name) for name in EMBEDDING_TYPES}


def tree_store_path(root: Path) -> Path:
    """Where m_comb_embs.py writes the packed store of a tree: inside it."""
    return root / TREE_STORE


def tree_hash_of(root: Path) -> Callable[[str], int]:
    """How packing hashed a tree's source file: an utterance file by its float64 crop mean, a side
    file (no `/` in its name) by its bytes."""

    def hash_of(name: str) -> int:
        if "/" not in name:
            return file_hash(root / name)
        return content_hash(crop_mean(read_embedding(root / name)))

    return hash_of


def open_tree(root: Path) -> EmbeddingSource:
    """A tree of `.npy` files: its packed store while that is fresh, else its files (passing a
    stale store, whose rows of unchanged speakers still serve)."""
    if not root.is_dir():
        raise UserError(
            f"{root}: embedding store not found (a folder of .npy files, a Kaldi .scp "
            "or a packed .store; m_gen_embs.py and m_comb_embs.py write them)"
        )
    store = tree_store_path(root)
    packed, found = fresh_store(store, lambda: tree_sources(root), tree_hash_of(root))
    if packed is not None:
        return packed
    if found is None:
        return TreeSource(root)
    return TreeSource(root, open_store(store), found.unproven)


def tree_names(root: Path) -> tuple[list[str], list[str]]:
    """Every `<spk>/<category>/.../<file>.npy` below root (speaker files, hidden names and packed
    stores ignored), relative to it, and its speaker (what m_gen_list lists)."""
    if not root.is_dir():
        raise UserError(f"{root}: embedding folder not found (m_gen_embs.py writes it)")
    paths = []
    for folder in speaker_folders(root):
        paths += [rel for rel in folder_files(folder) if rel.count("/") >= 2]
    if not paths:
        raise UserError(f"{root}: no <speaker>/<category>/<file>.npy embeddings found")
    return paths, [key_speaker(path) for path in paths]
