from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from conftest import make_embedding_tree, run_script

from m_DataLoader import read_list, speaker_pairs
from m_gen_list import make_lists


def write(root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ones((2, 4), np.float32))


def test_four_lists_formats_and_labels(tmp_path):
    root = make_embedding_tree(tmp_path / "emb", speakers=6, sessions=3, utterances=4)
    paths = make_lists(root, "vox", tmp_path / "lists", seed=3)
    assert sorted(p.name for p in paths.values()) == [
        "vox_distribution_list.txt",
        "vox_normal_list.txt",
        "vox_test_list.txt",
        "vox_triplet_list.txt",
    ]
    normal = read_list(paths["normal"], "normal")
    assert len(normal) == 6 * 3 * 4
    assert all(path.startswith(spk + "/") and path.endswith(".npy") for spk, path in normal)
    assert all((root / path).is_file() for _, path in normal)

    test = read_list(paths["test"], "test")
    assert len(test) == 72 * 8
    assert [label for label, *_ in test[:8]] == [1, 0] * 4
    for label, a, b in test:
        assert a != b
        assert (a.split("/")[0] == b.split("/")[0]) == (label == 1)
    per_file = Counter(a for _, a, _ in test)
    assert set(per_file.values()) == {8}

    triplet = read_list(paths["triplet"], "triplet")
    assert len(triplet) == 72 and all(spk != other for spk, _, other in triplet)

    dist = read_list(paths["distribution"], "distribution")
    for spk, a, b, flag in dist:
        assert a.split("/")[0] == b.split("/")[0] == spk
        assert (a.split("/")[1] == b.split("/")[1]) == (flag == 1)
    flags = Counter(flag for *_, flag in dist)
    assert flags[1] == 6 * 3 * 2 and flags[0] == flags[1]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    root = make_embedding_tree(tmp_path / "emb", speakers=5)
    first = make_lists(root, "a", tmp_path / "l1", seed=7)
    second = make_lists(root, "a", tmp_path / "l2", seed=7)
    third = make_lists(root, "a", tmp_path / "l3", seed=8)
    for kind in first:
        assert first[kind].read_bytes() == second[kind].read_bytes()
    assert first["test"].read_bytes() != third["test"].read_bytes()
    assert first["triplet"].read_bytes() != third["triplet"].read_bytes()


def test_distribution_pairing_rule():
    categories = {"a": ["a1", "a2", "a3", "a4", "a5"], "b": ["b1", "b2"], "c": ["c1"]}
    same, different = speaker_pairs(categories)
    assert same == [("a1", "a2"), ("a3", "a4"), ("b1", "b2")]
    # fewest first: c (1 file) with a (5); then b (2) with a (4); then b (1) with a (3)
    assert different == [("c1", "a1"), ("b1", "a2"), ("b2", "a3")]


def test_small_speakers_get_what_is_possible(tmp_path):
    root = tmp_path / "emb"
    for rel in [
        "s1/c1/1.npy",
        "s1/c1/2.npy",  # one category, two files
        "s2/c1/1.npy",  # a single utterance
        "s3/c1/1.npy",
        "s3/c2/1.npy",
        "s3/c2/2.npy",
    ]:
        write(root, rel)
    result = run_script(
        "m_gen_list.py",
        "--embed_dir",
        str(root),
        "--filename",
        "tiny",
        "--list_dir",
        str(tmp_path / "lists"),
        "--seed",
        "1",
    )
    assert "could not make" in result.stdout + result.stderr
    test = read_list(tmp_path / "lists" / "tiny_test_list.txt", "test")
    by_file = defaultdict(Counter)
    for label, a, _ in test:
        by_file[a][label] += 1
    assert by_file["s2/c1/1.npy"] == Counter({0: 4})
    assert by_file["s1/c1/1.npy"] == Counter({1: 1, 0: 4})
    dist = read_list(tmp_path / "lists" / "tiny_distribution_list.txt", "distribution")
    assert ("s3", "s3/c1/1.npy", "s3/c2/1.npy", 0) in dist
    assert not [d for d in dist if d[0] == "s1" and d[3] == 0]


def test_only_chosen_lists_and_error_without_tree(tmp_path):
    root = make_embedding_tree(tmp_path / "emb", speakers=2)
    run_script(
        "m_gen_list.py",
        "--embed_dir",
        str(root),
        "--filename",
        "x",
        "--list_dir",
        str(tmp_path / "l"),
        "--lists",
        "normal",
        "test",
    )
    assert sorted(p.name for p in (tmp_path / "l").iterdir()) == ["x_normal_list.txt", "x_test_list.txt"]
    result = run_script("m_gen_list.py", "--embed_dir", str(tmp_path / "none"), check=False)
    assert result.returncode == 2 and str(tmp_path / "none") in result.stderr


def test_lists_of_a_scp_and_of_a_packed_tree_equal_the_tree_lists(tmp_path):
    import kaldiio

    from m_comb_embs import combine

    root = make_embedding_tree(tmp_path / "emb", speakers=4, dim=8)
    tree_lists = make_lists(root, "t", tmp_path / "tree", seed=5)
    combine(root, pack=True)  # a packed store inside the tree changes nothing
    again = make_lists(root, "t", tmp_path / "again", seed=5)
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/*.npy"))
    arrays = {rel.replace(".npy", ".wav"): np.load(root / rel) for rel in files}
    kaldiio.save_ark(str(tmp_path / "x.ark"), arrays, scp=str(tmp_path / "x.scp"))
    scp_lists = make_lists(tmp_path / "x.scp", "t", tmp_path / "scp", seed=5)
    store_lists = make_lists(root / "embeddings.store", "t", tmp_path / "store", seed=5)
    for kind, path in tree_lists.items():
        assert again[kind].read_bytes() == path.read_bytes()
        assert scp_lists[kind].read_text().replace(".wav", ".npy") == path.read_text(), kind
        assert store_lists[kind].read_text() == path.read_text().replace(".npy", ""), kind


def test_unknown_list_kind_is_an_error(tmp_path):
    root = make_embedding_tree(tmp_path / "emb", speakers=2)
    result = run_script("m_gen_list.py", "--embed_dir", str(root), "--lists", "normal", "pairs", check=False)
    assert result.returncode == 2 and "pairs" in result.stderr
