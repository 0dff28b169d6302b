"""Store kinds are one table (stores.kinds.KINDS): a kind defined here, a single `.npz` file of keys
and crop means, added as one row, is read by runs, listed by m_gen_list.py and written by
--generate without another line of the project changing; the built-in kinds dispatch as before."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import config, train

import m_trainer
import stores.kinds
from m_comb_embs import combine
from m_DataLoader import load_embeddings, read_list
from m_gen_list import make_lists
from m_utils import UserError
from stores.arrays import combine_speaker, crop_mean, reduce_means
from stores.kaldi import KaldiSource
from stores.keys import key_speaker, store_key
from stores.kinds import KINDS, StoreKind, kind_named, kind_of, store_path_of
from stores.open import open_embeddings
from stores.packed import PackedStore
from stores.source import EmbeddingSource, Utterances
from stores.tree import TreeSource
from stores.write import gen_target, write_embeddings

# ----------------------------------------------------------------------------------------------
# The new kind: its module (a source and a writer) and its row


class NpzSource(EmbeddingSource):
    """A `.npz` of `keys` (N,) and `means` (N, D) float64 crop means."""

    def __init__(self, path: Path):
        self.path, self.side_dir = path, path.parent
        with np.load(path) as npz:
            self.keys, self.means = [str(key) for key in npz["keys"]], npz["means"]
        self.row = {store_key(key): k for k, key in enumerate(self.keys)}

    def utterances(
        self, rels: Sequence[str], dim=None, threads=8, desc="", show_progress=True, source="the list"
    ):
        if any(store_key(rel) not in self.row for rel in rels):
            raise self.missing_key(next(rel for rel in rels if store_key(rel) not in self.row), source)
        matrix, norms = reduce_means(self.means[[self.row[store_key(rel)] for rel in rels]])
        return Utterances(matrix, np.arange(len(rels)), norms)

    def speaker_embeddings(self, speakers: Sequence[str], embedding_type: str, dim=None) -> np.ndarray:
        of = [key_speaker(store_key(key)) for key in self.keys]
        return np.stack(
            [combine_speaker(self.means[[s == spk for s in of]], embedding_type) for spk in speakers]
        )


def npz_names(path: Path) -> tuple[list[str], list[str]]:
    source = NpzSource(path)
    return source.keys, source.speaker_of(source.keys)


def write_npz(target: Path, keys: Sequence[str], matrix: np.ndarray) -> Path:
    np.savez(target, keys=np.array(keys), means=np.asarray(matrix, np.float64))
    return target


NPZ = StoreKind(
    "npz",
    ".npz",
    open=NpzSource,
    scan=npz_names,
    write=write_npz,
    gen_target=lambda folder: folder.with_name(folder.name + ".npz"),
)


@pytest.fixture
def with_npz(monkeypatch):
    monkeypatch.setattr(stores.kinds, "KINDS", (*KINDS, NPZ))


def tree_as_npz(tree: Path, target: Path) -> Path:
    """The tree's files as one .npz: their paths (as lists name them) and crop means."""
    rels = sorted(
        (path.relative_to(tree).as_posix() for path in tree.glob("*/*/*.npy")), key=lambda r: r.split("/")
    )
    return write_npz(target, rels, np.stack([crop_mean(np.load(tree / rel)) for rel in rels]))


# ----------------------------------------------------------------------------------------------


def test_a_new_kind_is_one_row(data, tmp_path, with_npz):
    """The .npz kind as a run's store, a list's source and --generate's output: the same lists,
    embeddings, scores and enhanced embeddings as the tree it was made from."""
    stores_ = {
        name: tree_as_npz(data / name, tmp_path / f"{name}.npz") for name in ("train", "test", "libri")
    }
    assert kind_of(stores_["train"]) is NPZ and isinstance(open_embeddings(stores_["libri"]), NpzSource)

    for name, source in (("tree", data / "libri"), ("npz", stores_["libri"])):
        make_lists(source, "libri", tmp_path / name, seed=10)
    for path in (tmp_path / "tree").iterdir():
        assert (tmp_path / "npz" / path.name).read_bytes() == path.read_bytes(), path.name

    gen_list = data / "lists" / "libri_normal_list.txt"
    files = [rel for _, rel in read_list(gen_list, "normal")]
    np.testing.assert_array_equal(
        load_embeddings(stores_["libri"], files), load_embeddings(data / "libri", files)
    )

    runs = {}
    for name, path_of in (("tree", lambda n: data / n), ("npz", stores_.get)):
        paths = {
            f"{what}_path": str(path_of(n))
            for what, n in (("train", "train"), ("valid", "train"), ("test", "test"))
        }
        cfg = config(
            data,
            tmp_path,
            **paths,
            test_path_libri=str(path_of("libri")),
            gen_list=str(gen_list),
            gen_path=str(path_of("libri")),
        )
        save = tmp_path / f"exp_{name}"
        runs[name] = train(cfg, save, "--max_epoch", "1")
        m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--generate"])
    assert runs["npz"] == runs["tree"]
    assert gen_target(tmp_path / "exp_npz" / "enhanced", "npz") == tmp_path / "exp_npz" / "enhanced.npz"
    written = NpzSource(tmp_path / "exp_npz" / "enhanced.npz")
    assert written.keys == files
    tree = [np.load(tmp_path / "exp_tree" / "enhanced" / f"{store_key(rel)}.npy")[0] for rel in files]
    np.testing.assert_array_equal(written.means, np.stack(tree))
    with pytest.raises(UserError, match="m_comb_embs.py packs tree and kaldi stores, not npz ones"):
        combine(stores_["libri"])


def test_an_unknown_kind_lists_the_known_ones(tmp_path, with_npz):
    with pytest.raises(UserError, match="unknown store kind 'hdf5'; known: kaldi, npz, packed, tree"):
        write_embeddings(tmp_path / "out", ["a/b/c"], np.ones((1, 3)), "hdf5")
    assert kind_named("npz") is NPZ


def test_the_built_in_kinds(tmp_path):
    assert [kind.name for kind in KINDS] == ["tree", "kaldi", "packed"]
    assert [kind_of(tmp_path / name).name for name in ("emb", "emb.v2", "x.scp", "x.store", "x.npz")] == [
        "tree",
        "tree",
        "kaldi",
        "packed",
        "tree",
    ]
    assert store_path_of(tmp_path / "emb") == tmp_path / "emb" / "embeddings.store"
    assert store_path_of(tmp_path / "x" / "xvector.scp") == tmp_path / "x" / "xvector.store"
    with pytest.raises(UserError, match="unknown store kind 'hdf5'; known: kaldi, packed, tree"):
        kind_named("hdf5")
    with pytest.raises(UserError, match="packs tree and kaldi stores, not packed ones"):
        combine(tmp_path / "x.store")
    keys, rows = ["s1/v1/u1.wav", "s2/v1/u2.wav"], np.eye(2, 3, dtype=np.float32)
    for target, source in (("tree", TreeSource), ("x.scp", KaldiSource), ("x.store", PackedStore)):
        written = write_embeddings(tmp_path / "gen" / target, keys, rows)
        assert isinstance(open_embeddings(written), source)
        np.testing.assert_array_equal(load_embeddings(written, keys), rows)
    assert sorted(os.listdir(tmp_path / "gen" / "tree")) == ["s1", "s2"]
