"""The kinds of embedding store, one row each in KINDS: what identifies a kind's path, how it is
opened and listed, where its packed store lies and how it is packed, and how --generate writes it.
Every choice that depends on a store's kind looks its row up here (open_embeddings, m_gen_list's
scan, m_comb_embs.py, --generate); a new kind is its module and one row."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m_utils import UserError, unknown_name
from stores.kaldi import open_scp, scp_names, scp_store_path
from stores.pack import pack_scp, pack_tree
from stores.packed import open_store, store_names
from stores.source import EmbeddingSource
from stores.stamps import STORE_SUFFIX
from stores.tree import open_tree, tree_names, tree_store_path
from stores.write import beside, kaldi_written, pack_arrays, tree_written, write_kaldi, write_tree


@dataclass(frozen=True)
class StoreKind:
    """A kind of embedding store: a row of KINDS (the functions it names take the store's path)."""

    name: str  # as gen_format names it
    suffix: str | None  # the suffix of its path; None: a folder (any path no other kind claims)
    open: Callable[[Path], EmbeddingSource]  # what runs read (a source through its fresh packed store)
    scan: Callable[[Path], tuple[list[str], list[str]]]  # every utterance as lists name it, its speaker
    write: Callable[[Path, Sequence[str], np.ndarray], Path]  # --generate: (N, D) rows under their keys
    gen_target: Callable[[Path], Path]  # what --generate writes for the folder gen_target_dir names
    # the folders --generate writes into and the pattern of the names it writes there (whose
    # temporaries a killed run leaves)
    gen_written: Callable[[Path, Sequence[str]], tuple[set[Path], str]] = beside
    store_path: Callable[[Path], Path] | None = None  # where m_comb_embs.py writes its packed store
    pack: Callable[[Path, str, int, bool], int] | None = None  # (source, dtype, threads, pack) -> speakers
    pack_names: str = ""  # the pattern of the names packing writes beside its store (B/C files)


KINDS: tuple[StoreKind, ...] = (
    StoreKind(
        "tree",
        None,
        open=open_tree,
        scan=tree_names,
        write=write_tree,
        gen_target=lambda folder: folder,
        gen_written=tree_written,
        store_path=tree_store_path,
        pack=pack_tree,
        pack_names=r"[^/]+\.npy",  # the speakers' B/C files
    ),
    StoreKind(
        "kaldi",
        ".scp",
        open=open_scp,
        scan=scp_names,
        write=write_kaldi,
        gen_target=lambda folder: folder / "xvector.scp",  # WeSpeaker's name
        gen_written=kaldi_written,
        store_path=scp_store_path,
        pack=lambda scp, dtype, threads, pack: pack_scp(scp, dtype),  # read in order, always packed
    ),
    StoreKind(
        "packed",
        STORE_SUFFIX,
        open=open_store,
        scan=store_names,
        write=lambda target, keys, matrix: pack_arrays(target, keys, matrix, source="generated"),
        gen_target=lambda folder: folder.with_name(folder.name + STORE_SUFFIX),
    ),
)


def kind_of(path: str | os.PathLike) -> StoreKind:
    """The kind of the store at `path`: the kind of its suffix, else the folder kind (a tree)."""
    suffix = Path(path).suffix
    by_suffix = [kind for kind in KINDS if kind.suffix == suffix]
    return by_suffix[0] if by_suffix else next(kind for kind in KINDS if kind.suffix is None)


def kind_named(name: str) -> StoreKind:
    """The kind called `name`, or a UserError listing the known kinds."""
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise unknown_name("store kind", name, [kind.name for kind in KINDS])


def generated_kind(gen_path: str | os.PathLike, gen_format: str | None = None) -> StoreKind:
    """The kind --generate writes: the one `gen_format` names, else the kind of `gen_path`."""
    return kind_named(gen_format) if gen_format else kind_of(gen_path)


def store_path_of(source: Path) -> Path:
    """Where m_comb_embs.py writes the packed store of a source (a tree's inside it, a .scp's
    beside it)."""
    kind = kind_of(source)
    if kind.store_path is None:
        raise not_packed(source, kind)
    return kind.store_path(source)


def not_packed(source: str | os.PathLike, kind: StoreKind) -> UserError:
    """The error for a source of a kind that m_comb_embs.py does not pack."""
    packed = [other.name for other in KINDS if other.pack is not None]
    return UserError(f"{source}: m_comb_embs.py packs {' and '.join(packed)} stores, not {kind.name} ones")
