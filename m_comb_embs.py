"""Average each speaker's utterance embeddings into multi-utterance (speaker) embeddings, and pack
the store so that later runs start in seconds.

For every speaker folder of EMBED_DIR it writes, next to the folder:
  <spk>.npy        type B, avg-norm-avg: crop means L2-normalised, then averaged over utterances
  <spk>_type2.npy  type C, avg-avg-norm: crop means averaged over utterances, then L2-normalised
and the packed store of the tree, <embed_dir>/embeddings.store/ (one memory-mapped matrix of the
single-utterance embeddings, their index, norms, the B and C speaker embeddings, utt2dur and
manifest.json when the tree has them). Given a Kaldi .scp (WeSpeaker's xvector.scp), it writes
<dir>/<scp stem>.store/ beside it, holding the speaker embeddings too. Every later run given the
tree or the .scp reads the packed store instead of the files, while the store is fresh (no file
changed, added or removed since, each file checked by its size, mtime and ctime and, where only
a time changed, by a hash of its content; else the run says so and reads the files). A run that
reads a tree's files combines its speakers' B and C from them in memory, the same values as
these files hold while they are new; the `<spk>.npy` files are for other tools and for reading.

    python ./m_comb_embs.py --embed_dir data/embeddings/voxceleb2
    python ./m_comb_embs.py --embed_dir exp/wespeaker/embeddings/xvector.scp
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from m_utils import (
    Option,
    Options,
    UserError,
    add_options,
    check_options,
    clear_leftovers,
    fault_point,
    run_lock,
    run_main,
    save_npy_atomic,
    setup_logging,
)
from stores.arrays import (
    EMBEDDING_TYPES,
    check_embedding,
    combine_speaker,
    crop_mean,
    crop_means,
    read_embedding,
    reduce_means,
)
from stores.kaldi import KaldiSource
from stores.keys import key_speaker, store_key
from stores.packed import STORE_DTYPES
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
    store_path_of,
    tree_sources,
)
from stores.write import StoreBuilder

EMBED_DIR = "data/embeddings/voxceleb2"
THREADS = 4  # reader threads: more help a cold or network disk, fewer a warm page cache
STORE_DTYPE = "float32"

OPTIONS: Options = {
    "embed_dir": Option(EMBED_DIR, str, "single-utterance embeddings: a tree of .npy files or a Kaldi .scp"),
    "threads": Option(THREADS, int, "threads reading embedding files"),
    "pack": Option(True, bool, "also write the packed store (always for a .scp)"),
    "store_dtype": Option(STORE_DTYPE, str, "dtype of the packed store's matrix", choices=STORE_DTYPES),
}

CHUNK = 64  # files a reader thread reads at a time
log = logging.getLogger("m_comb_embs")


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
            self.builder = StoreBuilder(store_path_of(self.embed_dir), total, means.shape[1], self.dtype)
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


def combine(embed_dir: Path, threads: int = THREADS, pack: bool = False, dtype: str = STORE_DTYPE) -> int:
    """Write the B and C files of every speaker folder (and, with `pack`, the packed store of the
    tree); a .scp is packed with its speaker embeddings. Returns the number of speakers."""
    embed_dir = Path(embed_dir)
    if embed_dir.suffix == ".scp":
        return pack_scp(embed_dir, dtype)
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


def pack_scp(scp: Path, dtype: str = STORE_DTYPE) -> int:
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
        StoreBuilder(store_path_of(scp), len(keys), dim, dtype) as builder,
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


def written_names(embed_dir: Path) -> str:
    """The pattern of the names combine writes beside a tree's speaker folders (B and C files, the
    store) or beside a .scp (its store): their temporaries are a killed run's leftovers."""
    store = re.escape(store_path_of(embed_dir).name)
    return store if embed_dir.suffix == ".scp" else rf"{store}|[^/]+\.npy"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_options(parser, OPTIONS)
    args = parser.parse_args(argv)
    check_options(args, OPTIONS)
    setup_logging()
    embed_dir = Path(args.embed_dir)
    # Not beside an m_gen_embs.py (or another m_comb_embs.py) writing the same tree; a missing
    # folder has nothing to guard, and combine reports it.
    folder = embed_dir.parent if embed_dir.suffix == ".scp" else embed_dir
    with run_lock(folder, "embed_dir") if folder.is_dir() else nullcontext():
        clear_leftovers([folder], written_names(embed_dir), folder)
        if args.pack and up_to_date(embed_dir, args.store_dtype):
            log.info("%s: up to date (no file changed since it was packed): nothing written", embed_dir)
            return
        count = combine(embed_dir, max(1, args.threads), args.pack, args.store_dtype)
    log.info("wrote type B and C embeddings of %d speakers for %s", count, args.embed_dir)


def up_to_date(embed_dir: Path, dtype: str) -> bool:
    """A tree whose packed store (of `dtype`) is fresh, every file it was packed from unchanged,
    and whose speakers all have their B and C files: a run would write what is there."""
    from stores.arrays import EMBEDDING_TYPES
    from stores.open import open_embeddings
    from stores.packed import PackedStore

    if embed_dir.suffix == ".scp" or not embed_dir.is_dir():
        return False
    found = open_embeddings(embed_dir)
    if not isinstance(found, PackedStore) or found.header.get("dtype") != dtype:
        return False
    files = (
        EMBEDDING_TYPES[name].speaker_file.format(spk) for spk in found.speakers for name in EMBEDDING_TYPES
    )
    return all((embed_dir / name).is_file() for name in files)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
