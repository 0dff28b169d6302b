"""Packing: the B and C speaker files and packed store of a tree (`pack_tree`, speaker by speaker
on reader threads) and the packed store of a Kaldi .scp (`pack_scp`, streamed speaker by speaker);
m_comb_embs.py runs them."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from m_utils import UserError, fault_point, save_npy_atomic
from stores.arrays import (
    EMBEDDING_TYPES,
    check_embedding,
    combine_speaker,
    crop_mean,
    crop_means,
    read_embedding,
    reduce_means,
)
from stores.kaldi import KaldiSource, scp_store_path
from stores.keys import key_speaker, store_key
from stores.stamps import (
    KALDI_SIDE_FILES,
    SIDE_FILES,
    Sources,
    ark_of,
    content_hash,
    content_hasher,
    file_hash,
    hash_value,
    scp_entries,
    scp_sources,
    side_hashes,
    sorted_files,
    speaker_folders,
    tree_sources,
)
from stores.tree import tree_store_path
from stores.write import StoreBuilder

CHUNK = 64  # files a reader thread reads at a time
log = logging.getLogger("stores")


def tree_speakers(embed_dir: Path) -> list[Path]:
    if not embed_dir.is_dir():
        raise UserError(f"{embed_dir}: embedding folder not found (m_gen_embs.py writes it)")
    folders = speaker_folders(embed_dir)
    if not folders:
        raise UserError(f"{embed_dir}: holds no speaker folders")
    return folders


def ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], window: int
) -> Iterator[Any]:
    """pool.map in order, with at most `window` tasks ahead of the consumer (bounded memory)."""
    pending: list[Future] = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


def read_chunk(files: list[str], dim: int, first: str) -> np.ndarray:
    """(files, D) float64 crop means of a chunk of one speaker's files, each of the dimension `dim`
    of the tree's `first` file; finiteness is checked on the means (a NaN or infinity in a file
    makes its mean one)."""
    expected = f"{dim}, the dimension of {first}"
    arrays = [read_embedding(path, dim, finite=False, expected=expected) for path in files]
    means = crop_means(arrays)
    if not np.isfinite(means).all():
        for path, array in zip(files, arrays, strict=True):
            check_embedding(array, path)
    return means


def speaker_embeddings(means: np.ndarray) -> dict[str, np.ndarray]:
    """Every embedding type's (B, C) speaker embedding from a speaker's crop means."""
    return {name: combine_speaker(means, name) for name in EMBEDDING_TYPES}


class TreePacker:
    """Reads a tree speaker by speaker, writes each speaker's B and C files and (when packing)
    fills the packed store's rows."""

    def __init__(self, embed_dir: Path, pack: bool, dtype: str, pool: ThreadPoolExecutor):
        self.embed_dir, self.pack, self.dtype, self.pool = embed_dir, pack, dtype, pool
        self.hashes: dict[str, int] = {}  # of each file's crop mean, for the store's record
        self.writes: list[Future] = []  # B/C files, written (and synced) on the pool's threads
        self.builder: StoreBuilder | None = None
        self.keys: list[str] = []
        self.speakers: list[str] = []
        self.speaker_of: list[np.ndarray] = []
        self.tables: dict[str, list[np.ndarray]] = {name: [] for name in EMBEDDING_TYPES}

    def add(self, spk: str, rels: list[str], means: np.ndarray, total: int) -> None:
        for name, embedding in speaker_embeddings(means).items():
            self.writes.append(
                self.pool.submit(
                    save_npy_atomic,
                    self.embed_dir / EMBEDDING_TYPES[name].speaker_file.format(spk),
                    embedding,
                )
            )
            self.tables[name].append(embedding)
        self.settle()
        fault_point("comb_embs.speaker")
        if not self.pack:
            return
        if self.builder is None:
            self.builder = StoreBuilder(tree_store_path(self.embed_dir), total, means.shape[1], self.dtype)
        self.builder.put(len(self.keys), *reduce_means(means, [f"{self.embed_dir}/{rel}" for rel in rels]))
        self.keys += [store_key(rel) for rel in rels]
        self.hashes.update((rel, content_hash(mean)) for rel, mean in zip(rels, means, strict=True))
        self.speaker_of.append(np.full(len(rels), len(self.speakers), np.int32))
        self.speakers.append(spk)

    def settle(self, wait: bool = False) -> None:
        """Raise the error of a failed B/C write, in the order the writes were asked for (all of them
        waited for with `wait`): the first file that failed is the one named, whatever thread ran it."""
        while self.writes and (wait or self.writes[0].done()):
            self.writes.pop(0).result()

    def finish(self, sources: Sources) -> Path | None:
        """Write the store (when packing) with the record of `sources`, the files it was read from."""
        self.settle(wait=True)
        if self.builder is None:
            return None
        with self.builder:
            rows = len(self.keys)
            if rows != len(self.builder.norms):  # the listing and the reads disagree
                raise UserError(f"{self.embed_dir}: the files changed while they were read; run again")
            tables = {name: np.stack(rows_) for name, rows_ in self.tables.items()}
            hashes = [
                *(self.hashes[name] for name in sources.names[: -len(SIDE_FILES)]),
                *side_hashes(self.embed_dir, SIDE_FILES),
            ]
            return self.builder.finish(
                self.keys,
                self.speakers,
                np.concatenate(self.speaker_of),
                tables,
                {"source": str(self.embed_dir), "source_kind": "tree"},
                side_dir=self.embed_dir,
                sources=(sources, np.array(hashes, np.int64)),
            )


def pack_tree(embed_dir: Path, dtype: str, threads: int, pack: bool) -> int:
    """Write the B and C files of every speaker folder of a tree beside the folders and, with
    `pack`, the tree's packed store, reading files on `threads` threads. Returns the number of
    speakers."""
    folders = tree_speakers(embed_dir)
    sources = tree_sources(embed_dir)  # stamped before reading: a file changed later is seen
    files_of: dict[str, list[str]] = {folder.name: [] for folder in folders}
    for name in sources.names[: -len(SIDE_FILES)]:
        files_of[name.split("/", 1)[0]].append(name)
    listing = [(folder, sorted_files(files_of[folder.name])) for folder in folders]
    for folder, rels in listing:
        if not rels:
            log.warning("%s: no utterance embeddings, skipped", folder)
    listing = [(folder, rels) for folder, rels in listing if rels]
    total = sum(len(rels) for _, rels in listing)
    chunks = [
        (k, rels[start : start + CHUNK])
        for k, (_, rels) in enumerate(listing)
        for start in range(0, len(rels), CHUNK)
    ]
    means: list[np.ndarray] = []
    root = str(embed_dir)
    first = os.path.join(root, listing[0][1][0]) if listing else ""
    dim = read_embedding(first, finite=False).shape[-1] if listing else 0  # every file's, as the first's
    with (
        ThreadPoolExecutor(max(1, threads)) as pool,
        tqdm(total=total, desc="reading embeddings", unit="file", unit_scale=True) as bar,
    ):
        packer = TreePacker(embed_dir, pack, dtype, pool)
        results = ordered_map(
            pool,
            lambda chunk: read_chunk([os.path.join(root, rel) for rel in chunk[1]], dim, first),
            chunks,
            window=4 * max(1, threads),
        )
        for (k, chunk), chunk_means in zip(chunks, results, strict=True):
            means.append(chunk_means)
            bar.update(len(chunk))
            folder, rels = listing[k]
            if sum(len(m) for m in means) == len(rels):
                packer.add(folder.name, rels, np.concatenate(means), total)
                means = []
        store = packer.finish(sources)
    if store is not None:
        log.info("packed %d utterances into %s", total, store)
    return len(listing)


def pack_scp(scp: Path, dtype: str = "float32") -> int:
    """The packed store of a Kaldi .scp beside it (speakers from utt2spk or the keys), rows sorted
    by speaker then key; returns the number of speakers. Streams: each speaker's rows are written
    to the store once read and its B/C combined from them, so one speaker's crop means are held at
    a time, not the matrix."""
    entries = scp_entries(scp)
    sources = scp_sources(scp, entries)
    source = KaldiSource(scp, entries)
    keys = [store_key(utt) for utt, _ in entries]
    names = [key_speaker(key, source.utt2spk) for key in keys]
    order = sorted(range(len(keys)), key=lambda i: (names[i], keys[i].split("/")))
    speakers = sorted(set(names))
    position = {spk: k for k, spk in enumerate(speakers)}
    speaker_of = np.array([position[names[k]] for k in order], np.int32)
    arks = ArkHashes(entries, order)
    dim = len(crop_mean(source.read(entries[order[0]][0])))
    tables = {name: np.empty((len(speakers), dim), np.float32) for name in EMBEDDING_TYPES}
    bounds = np.searchsorted(speaker_of, np.arange(len(speakers) + 1))
    with (
        StoreBuilder(scp_store_path(scp), len(keys), dim, dtype) as builder,
        tqdm(total=len(keys), desc="reading embeddings", unit="file", unit_scale=True) as bar,
    ):
        for s in range(len(speakers)):
            rows = range(int(bounds[s]), int(bounds[s + 1]))
            means = np.empty((len(rows), dim), np.float64)
            for j, row in enumerate(rows):
                means[j] = scp_mean(scp, source, entries[order[row]][0], dim)
                arks.add(order[row], means[j])
            builder.put(rows.start, *reduce_means(means, [keys[order[row]] for row in rows]))
            for name, table in tables.items():
                table[s] = combine_speaker(means, name)
            bar.update(len(rows))
        hashes = [
            file_hash(scp),
            *arks.values(lambda k: scp_mean(scp, source, entries[k][0], dim)),
            *side_hashes(scp.parent, KALDI_SIDE_FILES),
        ]
        store = builder.finish(
            [keys[k] for k in order],
            speakers,
            speaker_of,
            tables,
            {"source": str(scp), "source_kind": "kaldi"},
            side_dir=scp.parent,
            sources=(sources, np.array(hashes, np.int64)),
        )
    log.info("packed %d utterances of %d speakers into %s", len(keys), len(speakers), store)
    return len(speakers)


def scp_mean(scp: Path, source: KaldiSource, utt: str, dim: int) -> np.ndarray:
    """The (D,) float64 crop mean of a .scp's utterance, of the dimension `dim` of the others."""
    mean = crop_mean(source.read(utt))
    if len(mean) != dim:
        raise UserError(f"{scp}: {utt} has dimension {len(mean)}, others {dim}")
    return mean


class ArkHashes:
    """The content hash of each ark of a .scp (sorted by name): the float64 crop means of its
    utterances in the .scp's order, hashed as they are read where packing reads them in that
    order, else hashed in a second read of that ark in the .scp's order."""

    def __init__(self, entries: list[tuple[str, str]], order: list[int]):
        row_of = np.empty(len(order), np.int64)
        row_of[order] = np.arange(len(order))
        of_ark: dict[str, list[int]] = {}
        for k, (_, location) in enumerate(entries):
            of_ark.setdefault(ark_of(location), []).append(k)
        self.entries_of = {ark: of_ark[ark] for ark in sorted(of_ark)}
        self.ark_of = np.empty(len(entries), np.int32)
        self.hashers: list[hashlib.blake2b | None] = []
        for a, members in enumerate(self.entries_of.values()):
            self.ark_of[members] = a
            in_order = bool((np.diff(row_of[members]) > 0).all())
            self.hashers.append(content_hasher() if in_order else None)

    def add(self, k: int, mean: np.ndarray) -> None:
        """Entry k's crop mean, read in the packing order."""
        hasher = self.hashers[self.ark_of[k]]
        if hasher is not None:
            hasher.update(mean.tobytes())

    def values(self, mean_of: Callable[[int], np.ndarray]) -> list[int]:
        """Every ark's hash; `mean_of(k)` reads entry k again for an ark read out of order."""
        found = []
        for hasher, (ark, members) in zip(self.hashers, self.entries_of.items(), strict=True):
            if hasher is None:
                log.info("%s: its utterances are not in speaker order; read again to hash them", ark)
                hasher = content_hasher()
                for k in members:
                    hasher.update(mean_of(k).tobytes())
            found.append(hash_value(hasher))
        return found
