"""Issue 27: a packed store is used only while every embedding it holds equals the file it came
from, and speakers' B/C embeddings are never older than their utterances. Each case changes the
files as a user's tools do (same size with the mtime kept, an older or newer mtime, a file added,
removed or renamed, an ark rewritten, a tree copied with its store) and asserts the numbers a run
gets: the embeddings served equal the files, the B/C targets equal those of a new m_comb_embs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from conftest import make_embedding_tree

import stores.fresh
from m_comb_embs import combine
from m_DataLoader import EmbeddingData, TrialSet
from m_gen_list import make_lists
from stores.arrays import combine_speaker
from stores.fresh import read_record, save_stamps
from stores.kaldi import KaldiSource
from stores.open import forget_freshness, open_embeddings
from stores.packed import PackedStore
from stores.stamps import tree_sources
from stores.tree import TreeSource

DIM = 16


def rels_of(tree: Path) -> list[str]:
    return sorted(p.relative_to(tree).as_posix() for p in tree.glob("*/*/*.npy"))


@pytest.fixture
def tree(tmp_path) -> Path:
    """A tree packed by m_comb_embs (B/C files and the store), its normal list beside."""
    root = make_embedding_tree(tmp_path / "emb", speakers=4, sessions=2, utterances=3, dim=DIM)
    combine(root, pack=True)
    make_lists(root, "t", tmp_path / "lists", seed=1, kinds=("normal",))
    forget_freshness()
    return root


def rewrite(path: Path, value: float, mtime_ns: int | None = None) -> np.ndarray:
    """Overwrite an embedding file with other values of the same shape (so the same size) and
    give it `mtime_ns` (default: its old one, as `cp -p` or `rsync -a` from an older copy)."""
    old = path.stat()
    array = np.full(np.load(path).shape, value, np.float32)
    np.save(path, array)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns if mtime_ns is None else mtime_ns))
    assert path.stat().st_size == old.st_size
    return array


def served(root: Path) -> np.ndarray:
    """Every utterance's embedding as a run gets it from `root` (tree or .scp)."""
    forget_freshness()
    return open_embeddings(root).utterances(rels_of(root) if root.is_dir() else keys_of(root)).matrix()


def from_files(root: Path) -> np.ndarray:
    return TreeSource(root).utterances(rels_of(root), threads=0).matrix()


def targets(root: Path, list_path: Path, kind: str = "B") -> np.ndarray:
    forget_freshness()
    return EmbeddingData(list_path, root, "normal", kind, DIM).speaker_embeddings.numpy()


def recombined_targets(root: Path, list_path: Path, kind: str = "B") -> np.ndarray:
    """The targets after running m_comb_embs again (the reference a stale run must equal)."""
    combine(root, pack=True)
    return targets(root, list_path, kind)


def test_same_size_with_the_mtime_kept_is_seen(tree, tmp_path):
    rel = rels_of(tree)[4]
    rewrite(tree / rel, 0.25)
    assert not isinstance(open_embeddings(tree), PackedStore)
    np.testing.assert_array_equal(served(tree), from_files(tree))
    assert np.allclose(served(tree)[4], 0.25)
    listed = tmp_path / "lists" / "t_normal_list.txt"
    for kind in ("B", "C"):
        stale = targets(tree, listed, kind)
        np.testing.assert_array_equal(stale, recombined_targets(tree, listed, kind))


@pytest.mark.parametrize("shift_ns", [-(10**9), 1])
def test_an_older_or_a_newer_mtime_is_seen(tree, tmp_path, shift_ns):
    """Newer by 1 ns, so the tree's newest mtime (the old whole-tree stamp) does not move."""
    rel = rels_of(tree)[0]
    rewrite(tree / rel, -0.5, (tree / rel).stat().st_mtime_ns + shift_ns)
    np.testing.assert_array_equal(served(tree), from_files(tree))
    assert np.allclose(served(tree)[0], -0.25)
    listed = tmp_path / "lists" / "t_normal_list.txt"
    np.testing.assert_array_equal(targets(tree, listed), recombined_targets(tree, listed))


def test_a_file_added_or_removed_changes_the_speaker_targets(tree, tmp_path):
    listed = tmp_path / "lists" / "t_normal_list.txt"
    rels = rels_of(tree)
    np.save(tree / rels[0].replace("00001", "00009"), np.full((3, DIM), 2.0, np.float32))  # added
    (tree / rels[-1]).unlink()  # removed
    speakers = sorted({rel.split("/")[0] for rel in rels})
    source = open_embeddings(tree)
    assert isinstance(source, TreeSource)
    for kind in ("B", "C"):
        fresh = combine_speaker(
            np.stack(
                [
                    np.load(tree / rel).mean(axis=0, dtype=np.float64)
                    for rel in rels_of(tree)
                    if rel.startswith(speakers[0])
                ]
            ),
            kind,
        )
        np.testing.assert_array_equal(source.speaker_embeddings(speakers, kind)[0], fresh)
    kept = [line for line in listed.read_text().splitlines() if rels[-1] not in line]
    listed.write_text("\n".join(kept) + "\n")
    np.testing.assert_array_equal(targets(tree, listed), recombined_targets(tree, listed))


def test_a_renamed_file_is_seen(tree):
    """A rename keeps the count, the sizes and every mtime: the old whole-tree stamp missed it."""
    rels = rels_of(tree)
    (tree / rels[1]).rename(tree / rels[1].replace("00002", "00007"))
    assert isinstance(open_embeddings(tree), TreeSource)
    np.testing.assert_array_equal(served(tree), from_files(tree))


def test_a_stale_tree_without_a_store_combines_its_speakers_afresh(tmp_path):
    """m_comb_embs --pack false: the <spk>.npy files are not read; B/C come from the files."""
    root = make_embedding_tree(tmp_path / "emb", speakers=3, sessions=2, utterances=2, dim=DIM)
    combine(root)
    make_lists(root, "t", tmp_path / "lists", seed=1, kinds=("normal",))
    listed = tmp_path / "lists" / "t_normal_list.txt"
    rewrite(root / rels_of(root)[0], 3.0)
    np.testing.assert_array_equal(targets(root, listed), recombined_targets(root, listed))
    np.testing.assert_array_equal(targets(root, listed, "C"), recombined_targets(root, listed, "C"))


def test_a_stale_store_gives_the_b_c_rows_of_speakers_it_shows_unchanged(tree, tmp_path, monkeypatch):
    """One speaker's file changes size: the other speakers' B/C rows come from the store (none of
    their files read for them, none racy here), the changed one's are combined from its files."""
    monkeypatch.setattr(stores.fresh, "RACY_NS", 0)
    rel = rels_of(tree)[0]
    np.save(tree / rel, np.full((5, DIM), 1.0, np.float32))
    combined = []
    speaker_means = TreeSource.speaker_means
    monkeypatch.setattr(
        TreeSource,
        "speaker_means",
        lambda self, spk, dim: combined.append(spk) or speaker_means(self, spk, dim),
    )
    forget_freshness()
    source = open_embeddings(tree)
    speakers = sorted({r.split("/")[0] for r in rels_of(tree)})
    stale = source.speaker_embeddings(speakers, "C")
    assert combined == [rel.split("/")[0]]
    combine(tree, pack=True)
    forget_freshness()
    np.testing.assert_array_equal(stale, open_embeddings(tree).speaker_embeddings(speakers, "C"))


def test_a_tree_copied_with_its_store_is_verified_and_kept(tree, tmp_path, monkeypatch):
    """copytree with copy2 keeps sizes and mtimes, not ctimes: the store is verified by content,
    kept, and its new stamps recorded, so the next open reads no file."""
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    checks = []
    first_mismatch = stores.fresh.first_mismatch
    monkeypatch.setattr(
        stores.fresh,
        "first_mismatch",
        lambda names, *rest: checks.append(len(names)) or first_mismatch(names, *rest),
    )
    forget_freshness()
    opened = open_embeddings(copy)
    assert isinstance(opened, PackedStore) and opened.path == copy / "embeddings.store"
    assert checks == [len(rels_of(copy))]  # every utterance file (no side files here)
    np.testing.assert_array_equal(served(copy), from_files(copy))
    now = tree_sources(copy)
    names, stats, _, _ = read_record(copy / "embeddings.store")
    order = [now.names.index(name) for name in names]
    np.testing.assert_array_equal(stats, now.stats[order])  # the copy's own stamps recorded
    racy_ns = stores.fresh.RACY_NS
    monkeypatch.setattr(stores.fresh, "RACY_NS", 0)  # as when the packing is long past
    checks.clear()
    assert isinstance(served_source(copy), PackedStore) and checks == []
    monkeypatch.setattr(stores.fresh, "RACY_NS", racy_ns)
    rewrite(copy / rels_of(copy)[2], 7.0)  # the copy changed later: seen
    np.testing.assert_array_equal(served(copy), from_files(copy))


def served_source(root: Path):
    forget_freshness()
    return open_embeddings(root)


def test_a_change_within_a_clock_step_of_packing_is_checked_by_content(tree, monkeypatch):
    """A file rewritten within a coarse clock's step keeps all three values; a file stamped that
    close to its packing is always hashed again. Simulated: the record made to hold the changed
    file's current stamps as if taken at that moment."""
    rel = rels_of(tree)[3]
    rewrite(tree / rel, 0.75)
    store = tree / "embeddings.store"
    names, _, hashes, _ = read_record(store)
    now = tree_sources(tree)
    save_stamps(store, now.stats[[now.names.index(name) for name in names]], hashes, now.taken_ns)
    assert isinstance(served_source(tree), TreeSource)
    np.testing.assert_array_equal(served(tree), from_files(tree))


def keys_of(scp: Path) -> list[str]:
    return [line.split()[0] for line in scp.read_text().splitlines()]


def test_an_ark_rewritten_with_its_size_and_mtime_kept_is_seen(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {
        f"s{k % 3}/v{k % 2}/{k:05d}": rng.standard_normal((2, DIM)).astype(np.float32) for k in range(12)
    }
    folder = tmp_path / "kaldi"
    folder.mkdir()
    scp, ark = folder / "xvector.scp", folder / "xvector.ark"
    kaldiio.save_ark(str(ark), arrays, scp=str(scp))
    combine(scp)
    forget_freshness()
    assert isinstance(open_embeddings(scp), PackedStore)
    old, scp_text = ark.stat(), scp.read_text()
    changed = {key: value + 1 for key, value in arrays.items()}
    kaldiio.save_ark(str(ark), changed, scp=str(tmp_path / "new.scp"))
    os.utime(ark, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert ark.stat().st_size == old.st_size and scp.read_text() == scp_text
    source = served_source(scp)
    assert isinstance(source, KaldiSource)
    expected = np.stack([value.mean(axis=0, dtype=np.float64) for value in changed.values()])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(served(scp), expected, rtol=1e-6)


def test_check_numbers_come_from_the_files(tree, tmp_path):
    """The trials --check scores: equal to the files after a same-size, same-mtime rewrite."""
    rels = rels_of(tree)
    trials = tmp_path / "trials.txt"
    trials.write_text(f"1 {rels[0]} {rels[1]}\n0 {rels[0]} {rels[-1]}\n")
    rewrite(tree / rels[1], -1.0)
    forget_freshness()
    trial_set = TrialSet(trials, tree, DIM)
    np.testing.assert_array_equal(
        trial_set.embeddings, TreeSource(tree).utterances(trial_set.files, threads=0).matrix()
    )


def test_an_scp_side_file_rewritten_with_its_size_and_mtime_kept_is_seen(tmp_path):
    """utt2spk with two speakers' names swapped (same bytes count), its mtime kept: the speakers
    a run gets are the new file's, and their B/C combine the new speakers' utterances."""
    rng = np.random.default_rng(4)
    arrays = {f"u{k:03d}": rng.standard_normal(DIM).astype(np.float32) for k in range(8)}
    folder = tmp_path / "kaldi"
    folder.mkdir()
    scp = folder / "xvector.scp"
    kaldiio.save_ark(str(folder / "xvector.ark"), arrays, scp=str(scp))
    utt2spk = folder / "utt2spk"
    utt2spk.write_text("".join(f"{utt} spk{k % 2}\n" for k, utt in enumerate(arrays)))
    combine(scp)
    old = utt2spk.stat()
    utt2spk.write_text("".join(f"{utt} spk{(k + (k < 2)) % 2}\n" for k, utt in enumerate(arrays)))
    os.utime(utt2spk, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert utt2spk.stat().st_size == old.st_size
    source = served_source(scp)
    assert isinstance(source, KaldiSource)
    assert source.speaker_of(["u000", "u001", "u002"]) == ["spk1", "spk0", "spk0"]
    spk0 = [utt for k, utt in enumerate(arrays) if (k + (k < 2)) % 2 == 0]
    expected = combine_speaker(np.stack([arrays[utt].astype(np.float64) for utt in spk0]), "B")
    np.testing.assert_array_equal(source.speaker_embeddings(["spk0"], "B")[0], expected)


def test_a_store_whose_record_is_damaged_is_not_used(tree):
    (tree / "embeddings.store" / "sources.npz").write_bytes(b"PK\x03\x04 cut short")
    assert isinstance(served_source(tree), TreeSource)
    np.testing.assert_array_equal(served(tree), from_files(tree))
