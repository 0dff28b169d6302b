"""Writing stores: a packed store built row block by row block and renamed into place
(StoreBuilder, pack_*), and --generate's writers (of a tree, a Kaldi .scp; a packed store is
pack_arrays) with the folders and names each writes; stores.kinds says which kind uses which."""

from __future__ import annotations

import io
import json
import mmap
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from m_utils import (
    UserError,
    fault_point,
    save_npy_atomic,
    temporary_beside,
    temporary_folder_beside,
    write_error,
    write_text_atomic,
)
from stores.arrays import EMBEDDING_TYPES, combine_speaker, reduce_means
from stores.fresh import record_sources
from stores.keys import key_speaker, store_key
from stores.packed import STORE_DTYPES, STORE_FORMAT, STORE_VERSION, is_packed_store
from stores.stamps import SIDE_FILES, Sources

if TYPE_CHECKING:
    from stores.kinds import StoreKind

RELEASE_BYTES = 64 << 20  # rows a StoreBuilder holds in memory before writing them out


class StoreBuilder:
    """Builds a packed store in a hidden folder beside its target, row block by row block, then
    renames it into place: a reader sees the old store or the new one, never half of one. An old
    store this project wrote is replaced; anything else at the target is left alone (UserError)."""

    def __init__(self, target: Path, rows: int, dim: int, dtype: str = "float32"):
        if dtype not in STORE_DTYPES:
            raise UserError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, found {dtype!r}")
        if target.exists() and not is_packed_store(target):
            raise UserError(
                f"{target}: exists and is not a packed store this project wrote; not replaced (move it away)"
            )
        self.target = target
        self.dtype = np.dtype(dtype)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.temp = temporary_folder_beside(target)
            self.matrix = np.lib.format.open_memmap(self.temp / "embeddings.npy", "w+", dtype, (rows, dim))
        except OSError as err:
            raise write_error(target, err) from None
        self.norms = np.zeros(rows, np.float32)
        self.unreleased = 0  # bytes put since the last release

    def __enter__(self) -> StoreBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.temp.exists():  # not finished: the half-built folder was ours
            self.matrix = None  # type: ignore[assignment]  # releases the memory map
            shutil.rmtree(self.temp, ignore_errors=True)

    def put(self, start: int, embeddings: np.ndarray, norms: np.ndarray) -> None:
        self.matrix[start : start + len(embeddings)] = embeddings
        self.norms[start : start + len(embeddings)] = norms
        fault_point("store.block")
        self.unreleased += embeddings.nbytes
        if self.unreleased >= RELEASE_BYTES:
            self.release()

    def release(self) -> None:
        """Write the rows put so far to the file and drop them from this process's memory: the
        rows written stay in the page cache, not in the process (its peak stays near one block
        of rows, not the matrix)."""
        self.matrix.flush()
        mapped = getattr(self.matrix, "_mmap", None)  # numpy's own mmap of the file
        if hasattr(mmap, "MADV_DONTNEED") and isinstance(mapped, mmap.mmap):
            mapped.madvise(mmap.MADV_DONTNEED)
        self.unreleased = 0

    def finish(
        self,
        keys: Sequence[str],
        speakers: Sequence[str],
        speaker_of: np.ndarray,
        tables: dict[str, np.ndarray],
        header: dict,
        side_dir: Path | None = None,
        sources: tuple[Sources, np.ndarray] | None = None,
    ) -> Path:
        """Write the index and header (and the record of the source files with their content
        hashes, stores.fresh), then rename the folder into place; returns the target."""
        try:
            self.matrix.flush()
            rows, dim = self.matrix.shape
            self.matrix = None  # type: ignore[assignment]  # releases the memory map
            (self.temp / "keys.txt").write_text("\n".join(keys) + "\n")
            (self.temp / "speakers.txt").write_text("\n".join(speakers) + "\n")
            np.save(self.temp / "norms.npy", self.norms)
            np.save(self.temp / "speaker_of.npy", np.asarray(speaker_of, np.int32))
            for name, table in tables.items():
                np.save(self.temp / f"speakers_{name}.npy", np.asarray(table, np.float32))
            for name in SIDE_FILES if side_dir is not None else ():
                if side_dir is not None and (side_dir / name).is_file():
                    shutil.copyfile(side_dir / name, self.temp / name)
            header = {
                "format": STORE_FORMAT,
                "version": STORE_VERSION,
                **header,
                "dtype": self.dtype.name,
                "utterances": rows,
                "speakers": len(speakers),
                "dim": dim,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            if sources is not None:
                record_sources(self.temp, *sources)
            (self.temp / "header.json").write_text(json.dumps(header, indent=1) + "\n")
            sync_folder(self.temp)
            self.replace()
        except OSError as err:
            raise write_error(self.target, err) from None
        return self.target

    def replace(self) -> None:
        """Rename the built folder over the target (an old store goes aside, then away)."""
        old = None
        if self.target.exists():
            old = temporary_folder_beside(self.target, ".old")
            os.replace(self.target, old / "store")
        os.replace(self.temp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def sync_folder(folder: Path) -> None:
    """fsync every file of a folder, then the folder: on disk before it is renamed into place."""
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def speaker_tables(means: np.ndarray, speaker_of: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """The (S, D) B and C speaker embeddings of rows' crop means grouped by speaker index (one
    speaker's rows in float64 at a time)."""
    order = np.argsort(speaker_of, kind="stable")
    bounds = np.searchsorted(speaker_of[order], np.arange(count + 1))
    tables = {name: np.empty((count, means.shape[1]), np.float32) for name in EMBEDDING_TYPES}
    for s in range(count):
        group = np.asarray(means[order[bounds[s] : bounds[s + 1]]], np.float64)
        for name, table in tables.items():
            table[s] = combine_speaker(group, name)
    return tables


def pack_arrays(
    target: str | os.PathLike,
    keys: Sequence[str],
    means: np.ndarray,
    speakers_of_keys: Sequence[str] | None = None,
    dtype: str = "float32",
    source: str = "arrays",
) -> Path:
    """A packed store from per-utterance vectors (crop means, or embeddings): rows L2-normalised,
    norms kept, B/C speaker embeddings combined. Speakers default to the keys' first component.
    Rows keep their order; quick at scale (blocks of rows, no float64 copy of the whole matrix)."""
    keys = [store_key(key) for key in keys]
    names = list(speakers_of_keys) if speakers_of_keys is not None else [key_speaker(k) for k in keys]
    speakers = sorted(set(names))
    position = {spk: k for k, spk in enumerate(speakers)}
    speaker_of = np.array([position[name] for name in names], np.int32)
    return pack_means(
        target, keys, means, speakers, speaker_of, dtype, {"source": source, "source_kind": "arrays"}
    )


def pack_means(
    target: str | os.PathLike,
    keys: Sequence[str],
    means: np.ndarray,
    speakers: Sequence[str],
    speaker_of: np.ndarray,
    dtype: str,
    header: dict,
    side_dir: Path | None = None,
    block: int = 65536,
    sources: tuple[Sources, np.ndarray] | None = None,
) -> Path:
    """Write the packed store of crop means (N, D) under store `keys`, each row's speaker index
    into `speakers` in `speaker_of`; `header` says the source, `sources` the files it was built
    from with their content hashes."""
    if len(set(keys)) < len(keys):
        seen: set[str] = set()
        twice = next(key for key in keys if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise UserError(f"{header.get('source')}: two utterances have the store key {twice}")
    with StoreBuilder(Path(target), len(keys), means.shape[1], dtype) as builder:
        for start in range(0, len(keys), block):
            rows = np.asarray(means[start : start + block], np.float64)
            builder.put(start, *reduce_means(rows, keys[start : start + block]))
        tables = speaker_tables(means, speaker_of, len(speakers))
        return builder.finish(keys, speakers, speaker_of, tables, header, side_dir, sources)


def gen_format_of(target: str | os.PathLike, gen_format: str | None = None) -> str:
    """The name of the kind --generate writes: `gen_format` when given, else the kind of the target
    (stores.kinds)."""
    return kind_written(target, gen_format).name


def gen_target(folder: str | os.PathLike, gen_format: str) -> Path:
    """Where --generate writes embeddings of `gen_format` for the folder gen_target_dir names:
    the folder itself (tree), `<folder>/xvector.scp` (kaldi) or `<folder>.store` (packed)."""
    return kind_written(folder, gen_format).gen_target(Path(folder))


def write_embeddings(
    target: str | os.PathLike, keys: Sequence[str], matrix: np.ndarray, gen_format: str | None = None
) -> Path:
    """Write (N, D) embeddings under their keys (list paths) in the kind `gen_format` names, else
    the kind of the target (a tree, a Kaldi .scp + .ark, a packed store...). Returns the target."""
    return kind_written(target, gen_format).write(Path(target), keys, matrix)


def kind_written(target: str | os.PathLike, gen_format: str | None) -> StoreKind:
    """stores.kinds.generated_kind (imported here: the table names this module's writers)."""
    from stores.kinds import generated_kind

    return generated_kind(target, gen_format)


def write_tree(root: Path, keys: Sequence[str], matrix: np.ndarray) -> Path:
    """A tree of (1, D) `.npy` files, `<root>/<key>.npy`, each written atomically."""
    for rel, row in zip(keys, matrix, strict=True):
        save_npy_atomic((root / rel).with_suffix(".npy"), np.asarray(row[None, :], np.float32))
        fault_point("generate.entry")
    return root


def tree_written(root: Path, keys: Sequence[str]) -> tuple[set[Path], str]:
    """The folders write_tree writes into (the root and each key's) and the names it writes there."""
    return {root, *((root / rel).parent for rel in keys)}, r"[^/]+\.npy"


def kaldi_written(scp: Path, keys: Sequence[str]) -> tuple[set[Path], str]:
    """The folder write_kaldi writes into and the names it writes there (the .scp and its .ark)."""
    return {scp.parent}, f"{re.escape(scp.name)}|{re.escape(scp.with_suffix('.ark').name)}"


def beside(target: Path, keys: Sequence[str]) -> tuple[set[Path], str]:
    """The folder of a target written as one file or folder, and its name."""
    return {target.parent}, re.escape(target.name)


def write_kaldi(scp: Path, keys: Sequence[str], matrix: np.ndarray) -> Path:
    """A Kaldi `.scp` and its `.ark` (float32 vectors, kaldiio's binary format) beside it, each
    written to a temporary name and renamed; the .scp names the .ark by its absolute path."""
    import kaldiio

    if scp.suffix != ".scp":
        raise UserError(f"{scp}: a Kaldi target is a .scp file")
    ark = scp.with_suffix(".ark").resolve()
    try:
        scp.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = temporary_beside(ark)
        os.close(fd)
    except OSError as err:
        raise write_error(ark, err) from None
    lines = io.StringIO()
    arrays = {key: np.asarray(row, np.float32) for key, row in zip(keys, matrix, strict=True)}
    try:
        kaldiio.save_ark(temp, arrays, scp=lines)
        os.replace(temp, ark)
    except BaseException as err:
        Path(temp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(ark, err) from None
        raise
    text = "".join(
        f"{line.split(' ', 1)[0]} {ark}:{line.rsplit(':', 1)[1]}\n" for line in lines.getvalue().splitlines()
    )
    write_text_atomic(scp, text)
    return scp


def kaldi_key(rel: str) -> str:
    """The key --generate writes in a Kaldi .scp for a list path: a tree's `<spk>/<video>/<n>.npy`
    as `<spk>/<video>/<n>.wav`, the form VoxCeleb's trial lists and WeSpeaker's use; any other
    path (a .scp's own key) as written."""
    return rel[: -len(".npy")] + ".wav" if rel.endswith(".npy") else rel


def write_side_files(
    source: str | os.PathLike, target: Path, rels: Sequence[str], keys: Sequence[str], note: dict
) -> list[Path]:
    """utt2dur and manifest.json beside embeddings written from a store (a tree's folder, a
    .scp's folder, a packed store's own): the durations of the entries `rels` of `source`
    under the `keys` written, and its manifest with `note` added; each where the source has
    it, so that what reads the written embeddings (QMF, the viewer) knows what they saw.
    manifest.json is written last."""
    from stores.open import open_embeddings  # stores.open reaches this module through the kinds

    found = open_embeddings(source)
    kaldi = not target.is_dir()  # a .scp file, else a tree's or a packed store's folder
    side_dir = target.parent if kaldi else target
    written = []
    durations = found.durations(rels)
    if durations is not None:
        # the .scp's keys as written there, else store keys as m_gen_embs.py writes them
        names = list(keys) if kaldi else [store_key(key) for key in keys]
        lines = sorted(f"{name} {seconds:.3f}\n" for name, seconds in zip(names, durations, strict=True))
        written.append(side_dir / "utt2dur")
        write_text_atomic(written[-1], "".join(lines))
    manifest = found.manifest
    if manifest is not None:
        written.append(side_dir / "manifest.json")
        write_text_atomic(written[-1], json.dumps({**manifest, **note}, indent=1) + "\n")
    return written
