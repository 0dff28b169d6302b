from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_embedding_tree

import m_DataLoader
import stores.arrays
from m_comb_embs import combine
from m_DataLoader import EmbeddingData, chunk_starts, speaker_grouped_batches
from m_gen_list import make_lists
from m_network import SpeakerNet, Trainer
from m_utils import SINGLE, DistContext
from stores.keys import embedding_file


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl")
    emb = make_embedding_tree(root / "emb", speakers=6, sessions=3, utterances=5, dim=8)
    combine(emb)
    make_lists(emb, "t", root / "lists", seed=1)
    return root


def data(tree, kind="normal") -> EmbeddingData:
    return EmbeddingData(tree / "lists" / f"t_{kind}_list.txt", tree / "emb", kind, "B", 8)


def test_each_file_read_once_per_run(tree, monkeypatch):
    calls = Counter()

    def counting(real):
        def load(path, *args, **kwargs):
            calls[str(path)] += 1
            return real(path, *args, **kwargs)
        return load

    monkeypatch.setattr(np, "load", counting(np.load))
    monkeypatch.setattr(stores.arrays, "read_npy", counting(stores.arrays.read_npy))
    train = data(tree)
    trainer = Trainer(SpeakerNet("MyLinearNetv2", "MSE", nOut=8), torch.device("cpu"))
    for epoch in range(1, 4):
        trainer.train_epoch(train, epoch, batch_size=7, seed=1)
    assert len(calls) == 6 * 3 * 5 and set(calls.values()) == {1}  # B/C combined from the files read


def test_batches_come_from_memory_and_match_files(tree):
    train = data(tree, "triplet")
    batch = next(train.epoch(4, seed=3, epoch=1))
    records = [line.split() for line in (tree / "lists" / "t_triplet_list.txt").read_text().splitlines()]
    order = train.global_batches(4, 3, 1)[0]
    for row, record_index in enumerate(order):
        spk, rel, other = records[record_index]
        stored = np.load(embedding_file(tree / "emb", rel)).mean(axis=0)
        np.testing.assert_allclose(batch.inputs[row].numpy(), stored / np.linalg.norm(stored), atol=1e-6)
        np.testing.assert_allclose(batch.targets[row].numpy(), np.load(tree / "emb" / f"{spk}.npy"))
        np.testing.assert_allclose(batch.others[row].numpy(), np.load(tree / "emb" / f"{other}.npy"))
        assert train.speakers[batch.labels[row]] == spk


def test_epochs_reshuffle_reproducibly(tree):
    train = data(tree)
    first = train.global_batches(10, seed=1, epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, train.global_batches(10, 1, 1), strict=True))
    assert not np.array_equal(first[0], train.global_batches(10, 1, 2)[0])
    assert sorted(np.concatenate(first).tolist()) == list(range(len(train)))


def test_ranks_split_each_global_batch(tree):
    train = data(tree)
    ranks = [list(train.epoch(4, 1, 1, DistContext(rank=r, world_size=3))) for r in range(3)]
    single = list(train.epoch(12, 1, 1))
    assert len(ranks[0]) == len(ranks[1]) == len(ranks[2]) == len(single)
    for step, whole in enumerate(single):
        parts = torch.cat([ranks[r][step].inputs for r in range(3)])
        assert torch.equal(parts, whole.inputs)
        # DDP averages the ranks' weighted mean losses: every sample must count 1 / global size
        for r in range(3):
            part = ranks[r][step]
            assert part.weight / part.size / 3 == pytest.approx(1 / whole.size)


def test_n_per_speaker_sampler():
    rng = np.random.default_rng(0)
    speaker = np.repeat(np.arange(10), [3, 5, 8, 2, 9, 4, 6, 7, 1, 12])
    batches = speaker_grouped_batches(speaker, groups_per_batch=4, n_per_speaker=2,
                                      max_seg_per_spk=6, rng=rng)
    used = np.concatenate(batches)
    assert len(set(used.tolist())) == len(used)
    per_speaker = Counter(speaker[used].tolist())
    assert max(per_speaker.values()) <= 6 and 8 not in per_speaker  # one utterance: no pair
    for batch in batches:
        groups = speaker[batch].reshape(-1, 2)
        assert (groups[:, 0] == groups[:, 1]).all()          # a group is one speaker
        assert len(set(groups[:, 0].tolist())) == len(groups)  # no speaker twice in a batch
        assert len(groups) <= 4
    again = speaker_grouped_batches(speaker, 4, 2, 6, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_n_per_speaker_labels_every_item(tree):
    train = data(tree)
    for batch in train.epoch(3, 1, 1, n_per_speaker=2, max_seg_per_spk=10):
        labels = batch.labels.view(-1, 2)
        assert (labels[:, 0] == labels[:, 1]).all() and len(set(labels[:, 0].tolist())) == len(labels)
        np.testing.assert_allclose(batch.targets.numpy(),
                                   train.speaker_embeddings[batch.labels].numpy())


def test_distribution_batches_one_speaker_same_pairs_first(tree):
    train = data(tree, "distribution")
    batches = list(train.epoch(12321, 1, 1))
    assert len(batches) == 6
    for batch in batches:
        assert len(torch.unique(batch.pair_speaker)) == 1
        same = batch.pair_same.tolist()
        assert same == sorted(same, reverse=True) and any(same) and not all(same)
        assert batch.inputs.shape[0] == 2 * len(same)
    two = list(train.epoch(1, 1, 1, speakers_per_step=2))
    assert len(two) == 3 and all(len(torch.unique(b.pair_speaker)) == 2 for b in two)


@pytest.mark.parametrize(("kind", "sampling"), [
    ("normal", {}), ("triplet", {}), ("normal", {"n_per_speaker": 2}),
    ("distribution", {"speakers_per_step": 2}),
])
@pytest.mark.parametrize("chunk_rows", [1, 9, 100_000])
def test_batches_sliced_from_chunks_equal_per_batch_ones(tree, kind, sampling, chunk_rows):
    """The GPU path (an epoch's index arrays moved at once, rows gathered for several batches at a
    time, each batch a slice) builds the same batches as the per-batch path; run here on CPU
    tensors, which exercise the same code. Chunks of 1 row hold one batch each, of 9 rows one or
    two, of 100,000 the whole epoch."""
    train = data(tree, kind)
    ctx = DistContext(rank=1, world_size=2, local_rank=1)
    parts = [train._rank_part(items, ctx, sampling.get("n_per_speaker", 1))
             for items in train.global_batches(5, 3, 2, ctx.world_size, **sampling)]
    parts = [part for part in parts if part is not None]
    expected = [train.batch_of(*part) for part in parts]
    train.chunk_rows = chunk_rows
    got = list(train._batches_in_chunks(parts))
    assert len(got) == len(expected) > 1
    for a, b in zip(got, expected, strict=True):
        assert a.weight == b.weight
        for name in ("inputs", "targets", "labels", "others", "pair_same", "pair_speaker"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert torch.equal(x, y), name


def test_chunks_hold_whole_batches_up_to_their_rows():
    assert chunk_starts(np.array([5, 5, 5, 20, 1, 4]), 10) == [0, 2, 3, 4, 6]
    assert chunk_starts(np.array([3, 3]), 1) == [0, 1, 2]
    assert chunk_starts(np.array([], np.int64), 10) == [0, 0]


def test_single_process_epochs_equal_a_one_rank_shard(tree):
    """One process takes each global batch whole (no split): the same batches as sharding it over
    a world of one would give."""
    for kind, sampling in (("normal", {}), ("normal", {"n_per_speaker": 2}),
                           ("distribution", {"speakers_per_step": 2})):
        train = data(tree, kind)
        for items in train.global_batches(5, 3, 2, 1, **sampling):
            records, weight = train._rank_part(items, SINGLE, sampling.get("n_per_speaker", 1))
            assert weight == 1.0 and np.array_equal(records, items)
            if kind == "distribution":
                records, weight = train._speaker_shard(items, SINGLE)
            else:
                records, weight = m_DataLoader.shard(items, SINGLE)
            assert weight == 1.0 and np.array_equal(np.sort(records), np.sort(items))


def test_speaker_pairs_group_every_pair_in_order(tree):
    train = data(tree, "distribution")
    groups = train.speaker_pairs()
    assert [int(train.target[g[0]]) for g in groups] == sorted(set(train.target.tolist()))
    for group in groups:
        assert np.all(np.diff(group) > 0) and len(set(train.target[group].tolist())) == 1
    assert sum(len(g) for g in groups) == len(train.target)


def test_read_npy_equals_np_load_and_survives_many_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from stores.arrays import read_npy

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=7),
              np.asfortranarray(rng.normal(size=(4, 5)).astype(np.float32)), np.zeros((0, 4), np.float32),
              np.arange(6, dtype=np.int16).reshape(2, 3)]
    for k, array in enumerate(arrays):
        np.save(tmp_path / f"{k}.npy", array)
        loaded = read_npy(tmp_path / f"{k}.npy")
        assert loaded.dtype == array.dtype and loaded.shape == array.shape
        np.testing.assert_array_equal(loaded, array)
    with open(tmp_path / "v2.npy", "wb") as file:
        np.lib.format.write_array(file, arrays[0], version=(2, 0))
    np.testing.assert_array_equal(read_npy(tmp_path / "v2.npy"), arrays[0])
    whole = (tmp_path / "0.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_npy(tmp_path / "cut.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects"):
        read_npy(tmp_path / "objects.npy")
    files = [tmp_path / f"{k % 5}.npy" for k in range(4000)]
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(read_npy, files))
    assert all(np.array_equal(a, arrays[k % 5]) for k, a in enumerate(loaded))


def test_trial_set_rows_name_the_listed_files_and_take_supplied_embeddings(tree, tmp_path):
    """read_trials' rows point at the sorted distinct files (comments, blank lines, repeats and
    audio suffixes as in any list); a supplied loader gives the same TrialSet as the files."""
    lines = (tree / "lists" / "t_test_list.txt").read_text().splitlines()
    listed = tmp_path / "trials.txt"
    listed.write_text("# a comment\n\n" + "\n".join(lines[:30]).replace(".npy", ".wav") + "\n"
                      + "\n".join(lines[:5]) + "\n")
    records = [line.split() for line in listed.read_text().splitlines()[2:]]
    from_files = m_DataLoader.TrialSet(listed, tree / "emb", 8)
    assert from_files.files == sorted({rel for r in records for rel in r[1:]})
    assert len(from_files) == 35
    files = from_files.files
    for k, (label, first, second) in enumerate(records):
        assert from_files.labels[k] == int(label)
        assert (files[from_files.left[k]], files[from_files.right[k]]) == (first, second)
    for row, rel in enumerate(from_files.files):
        stored = np.load(embedding_file(tree / "emb", rel)).mean(axis=0)
        np.testing.assert_allclose(from_files.embeddings[row], stored / np.linalg.norm(stored), atol=1e-6)
    supplied = []

    def load(files):
        supplied.append(files)
        return from_files.embeddings.copy()

    given = m_DataLoader.TrialSet(listed, "/nonexistent", 8, load=load)
    assert supplied == [from_files.files]
    for name in ("labels", "left", "right", "embeddings"):
        np.testing.assert_array_equal(getattr(given, name), getattr(from_files, name))
    with pytest.raises(ValueError, match="as many embeddings"):
        m_DataLoader.TrialSet(listed, "/nonexistent", 8, load=lambda files: np.zeros((1, 8)))
