"""Embedding files -> arrays: reading `.npy` embeddings (many threads at once), checking them,
crop means and single-utterance embeddings, and the B/C embedding types that combine a speaker's
utterances."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from m_utils import UserError
from scoring.metrics import l2_normalize

LOAD_BLOCK = 512  # files one reader thread loads at a time


@dataclass(frozen=True)
class EmbeddingType:
    """One value of the `multiple_embedding_flag` option: how a speaker's utterances combine into
    its multi-utterance embedding, the file that holds it, and how trials are scored."""

    speaker_file: str  # name pattern beside the speaker folders
    combine: str  # avg-norm-avg or avg-avg-norm
    cosine: bool  # trials scored by cosine distance (else by L2 distance)


EMBEDDING_TYPES = {
    "B": EmbeddingType("{}.npy", "avg-norm-avg", cosine=False),
    "C": EmbeddingType("{}_type2.npy", "avg-avg-norm", cosine=True),
}


def embedding_type_of(name: str) -> EmbeddingType:
    """The EmbeddingType of `multiple_embedding_flag` B or C; anything else is a UserError."""
    if name not in EMBEDDING_TYPES:
        raise UserError(f"multiple_embedding_flag must be B or C, found {name!r}")
    return EMBEDDING_TYPES[name]


def combine_speaker(means: np.ndarray, embedding_type: str) -> np.ndarray:
    """A speaker's (D,) float32 embedding of `embedding_type` (B or C) from its utterances' crop
    means (U, D)."""
    if embedding_type_of(embedding_type).combine == "avg-norm-avg":
        return l2_normalize(means).mean(axis=0).astype(np.float32)
    return l2_normalize(means.mean(axis=0)).astype(np.float32)


def check_embedding(
    array: np.ndarray,
    path: Path | str,
    dim: int | None = None,
    finite: bool = True,
    expected: str | None = None,
) -> np.ndarray:
    """Validate an embedding file's array: floating point, (crops, D) or (D,), of dimension `dim`
    (`expected` says whose dimension that is; default "nOut <dim>"), finite (unless the caller
    checks that of many arrays at once)."""
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{path}: embeddings must be floating point, found {array.dtype} values")
    if array.ndim not in (1, 2) or array.size == 0:
        raise UserError(
            f"{path}: expected an embedding of shape (crops, D) or (D,), found shape {array.shape}"
        )
    if dim is not None and array.shape[-1] != dim:
        raise UserError(
            f"{path}: embedding dimension {array.shape[-1]} does not match {expected or f'nOut {dim}'}"
        )
    if finite and not np.isfinite(array).all():
        raise UserError(f"{path}: embedding holds NaN or infinite values")
    return array


_NPY_HEADER_LOCK = threading.Lock()
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple, bool]] = {}  # header bytes -> dtype, shape, order


def _npy_header(head: bytes) -> tuple[np.dtype, tuple, bool]:
    """The parsed header of a .npy (its bytes up to the data). The trees hold a few distinct
    headers, so each is parsed once: numpy parses with ast.literal_eval, slow next to the read,
    and CPython 3.11's parser can fail spuriously when threads parse at once (python/cpython#106905)."""
    found = _NPY_HEADERS.get(head)
    if found is None:
        with _NPY_HEADER_LOCK:
            file = io.BytesIO(head)
            version = np.lib.format.read_magic(file)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = reader(file)
            found = (dtype, shape, fortran_order)
            if len(_NPY_HEADERS) < 4096:
                _NPY_HEADERS[head] = found
    return found


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """np.load of one .npy file in one read, safe from many threads at once (see _npy_header)."""
    with open(path, "rb") as file:
        data = bytearray(os.fstat(file.fileno()).st_size)
        got = file.readinto(data)
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    if data[6] == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] == 2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        return np.lib.format.read_array(io.BytesIO(data[:got]), allow_pickle=False)
    dtype, shape, fortran_order = _npy_header(bytes(data[:end]))
    if dtype.hasobject:
        raise ValueError("holds Python objects, which are not loaded")
    count = int(np.prod(shape, dtype=np.int64))
    available = max(0, got - end) // dtype.itemsize
    if available < count:
        raise ValueError(f"truncated: {available} of {count} values")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return values.reshape(shape, order="F" if fortran_order else "C")


def read_embedding(
    path: Path | str, dim: int | None = None, finite: bool = True, expected: str | None = None
) -> np.ndarray:
    """The checked array of an embedding file (check_embedding); errors name the file."""
    try:
        array = read_npy(path)
    except FileNotFoundError:
        raise UserError(f"{path}: embedding file not found (m_gen_embs.py writes them)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npy embedding ({err})") from None
    return check_embedding(np.asarray(array), path, dim, finite, expected)


def crop_mean(array: np.ndarray) -> np.ndarray:
    """(D,) float64 mean over the crops of a (crops, D) or (D,) embedding."""
    return array.reshape(-1, array.shape[-1]).astype(np.float64).mean(axis=0)


def crop_means(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """(N, D) float64 crop means of many embeddings: one operation when they share a shape, the
    same values as crop_mean of each."""
    if len({a.shape for a in arrays}) == 1:
        stacked = np.stack(arrays)
        return stacked.reshape(len(arrays), -1, stacked.shape[-1]).astype(np.float64).mean(axis=1)
    return np.stack([crop_mean(a) for a in arrays])


def reduce_means(means: np.ndarray, names: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Single-utterance embeddings of (N, D) float64 crop means: each row L2-normalised (float32),
    and the rows' norms before (float32, for QMF). A zero row is a UserError naming its file."""
    norms = np.linalg.norm(means, axis=-1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if len(zero):
        name = names[zero[0]] if names is not None else f"row {zero[0]}"
        raise UserError(f"{name}: embedding is all zeros")
    return (means / np.maximum(norms, 1e-12)).astype(np.float32), norms[:, 0].astype(np.float32)


def single_utterance_embedding(array: np.ndarray, path: Path | None = None) -> np.ndarray:
    """Mean over crops, then L2 norm: the (D,) single-utterance embedding of one file."""
    return reduce_means(crop_mean(array)[None, :], [path])[0][0]


def read_files(
    files: Sequence[Path],
    dim: int | None,
    threads: int,
    desc: str,
    show_progress: bool,
    keep: Callable[[range, list[np.ndarray]], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read and reduce embedding files: (N, D) float32 single-utterance embeddings and their
    norms, in order; `threads` reader threads, none (the calling thread) for 0. `keep(rows,
    arrays)` is given each block's arrays as read (from its reader thread)."""
    first = read_embedding(files[0], dim) if files else None
    width = dim if dim is not None else (first.shape[-1] if first is not None else 0)
    expected = None if dim is not None or not files else f"{width}, the dimension of {files[0]}"
    matrix = np.empty((len(files), width), np.float32)
    norms = np.empty(len(files), np.float32)
    blocks = [range(start, min(start + LOAD_BLOCK, len(files))) for start in range(0, len(files), LOAD_BLOCK)]

    def load_block(rows: range) -> int:
        """Read a block of files straight into their rows of the matrix."""
        arrays = [
            read_embedding(files[row], width, expected=expected) if row or first is None else first
            for row in rows
        ]
        matrix[rows.start : rows.stop], norms[rows.start : rows.stop] = reduce_means(
            np.stack([crop_mean(a) for a in arrays]), [files[row] for row in rows]
        )
        if keep is not None:
            keep(rows, arrays)
        return len(rows)

    # threads 0 (nDataLoaderThread 0): read in the calling thread, as the original's num_workers 0
    pool = ThreadPoolExecutor(threads) if threads > 0 else None
    with (
        pool or nullcontext(),
        tqdm(
            total=len(files),
            desc=desc,
            unit="file",
            leave=False,
            disable=not show_progress or len(files) < 2000,
        ) as bar,
    ):
        for done in (pool.map if pool is not None else map)(load_block, blocks):
            bar.update(done)
    return matrix, norms
