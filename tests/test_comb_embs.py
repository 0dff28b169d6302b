from pathlib import Path

import numpy as np
import pytest
from conftest import make_embedding_tree, run_script

import m_comb_embs
from m_comb_embs import combine


def direct_speaker_embeddings(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    means = np.stack([np.load(f).astype(np.float64).mean(axis=0) for f in sorted(folder.rglob("*.npy"))])
    normed = means / np.linalg.norm(means, axis=1, keepdims=True)
    avg = means.mean(axis=0)
    return normed.mean(axis=0), avg / np.linalg.norm(avg)


@pytest.mark.parametrize("libri", [False, True])
def test_type_b_and_c_match_direct_computation(tmp_path, libri):
    root = make_embedding_tree(tmp_path / "emb", speakers=3, dim=20, libri=libri)
    assert combine(root) == 3
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        expected_b, expected_c = direct_speaker_embeddings(folder)
        b = np.load(root / f"{folder.name}.npy")
        c = np.load(root / f"{folder.name}_type2.npy")
        assert b.shape == c.shape == (20,) and b.dtype == np.float32
        np.testing.assert_allclose(b, expected_b, atol=1e-6)
        np.testing.assert_allclose(c, expected_c, atol=1e-6)
        assert abs(np.linalg.norm(c) - 1) < 1e-5
        assert np.linalg.norm(b) < 1  # an average of unit vectors pointing different ways


def test_script_flag_and_bad_file(tmp_path):
    root = make_embedding_tree(tmp_path / "emb", speakers=2)
    run_script("m_comb_embs.py", "--embed_dir", str(root))
    assert (root / "id10000.npy").is_file() and (root / "id10001_type2.npy").is_file()
    bad = root / "id10000" / "sess0000000" / "00001.npy"
    np.save(bad, np.zeros((2, 3, 4), np.float32))
    result = run_script("m_comb_embs.py", "--embed_dir", str(root), check=False)
    assert result.returncode == 2
    assert str(bad) in result.stderr and "shape" in result.stderr


def test_missing_folder_is_an_error(tmp_path):
    result = run_script("m_comb_embs.py", "--embed_dir", str(tmp_path / "nowhere"), check=False)
    assert result.returncode == 2 and "nowhere" in result.stderr


def test_script_packs_the_tree_and_replaces_only_its_own_store(tmp_path):
    from stores.keys import store_key
    from stores.open import open_store

    root = make_embedding_tree(tmp_path / "emb", speakers=3, dim=12)
    result = run_script("m_comb_embs.py", "--embed_dir", str(root))
    assert "file/s" in result.stderr  # the progress bar counts files per second
    store = open_store(root / "embeddings.store")
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/*.npy"))
    assert sorted(store.keys) == [store_key(rel) for rel in files]
    assert store.speakers == ["id10000", "id10001", "id10002"]
    for kind, pattern in (("B", "{}.npy"), ("C", "{}_type2.npy")):
        np.testing.assert_array_equal(
            store.speaker_embeddings(store.speakers, kind),
            np.stack([np.load(root / pattern.format(s)) for s in store.speakers]),
        )
    assert combine(root) == 3  # the store inside the tree is not a speaker folder
    run_script("m_comb_embs.py", "--embed_dir", str(root), "--store_dtype", "float16")
    assert open_store(root / "embeddings.store").matrix.dtype == np.float16
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporary left
    other = tmp_path / "other"
    make_embedding_tree(other, speakers=2, dim=12)
    (other / "embeddings.store").mkdir()
    (other / "embeddings.store" / "mine.txt").write_text("the user's")
    result = run_script("m_comb_embs.py", "--embed_dir", str(other), check=False)
    assert result.returncode == 2 and "not replaced" in result.stderr
    assert (other / "embeddings.store" / "mine.txt").read_text() == "the user's"


def test_help_prints_the_whole_description(capsys):
    with pytest.raises(SystemExit):
        m_comb_embs.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert " ".join(m_comb_embs.__doc__.split()) in shown
