from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_embedding_tree

import m_DataLoader
import stores.arrays
from m_comb_embs import combine
from m_DataLoader import EmbeddingData, Sampling, speaker_grouped_batches
from m_gen_list import make_lists
from m_network import SpeakerNet, Trainer
from m_utils import DistContext
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
        trainer.train_epoch(train, epoch, Sampling(batch_size=7, seed=1))
    assert len(calls) == 6 * 3 * 5 and set(calls.values()) == {1}  # B/C combined from the files read


def stored(tree, rel: str) -> np.ndarray:
    """A file's single-utterance embedding as the list's files hold it: crop mean, L2-normalised."""
    mean = np.load(embedding_file(tree / "emb", rel)).mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_batches_hold_the_listed_files_and_speakers(tree):
    train = data(tree, "triplet")
    records = [line.split() for line in (tree / "lists" / "t_triplet_list.txt").read_text().splitlines()]
    seen = []
    for batch in train.batches(1, Sampling(batch_size=4, seed=3)):
        assert batch.size == len(batch.records) <= 4
        for row, record in enumerate(batch.records):
            spk, rel, other = records[record]
            np.testing.assert_allclose(batch.inputs[row].numpy(), stored(tree, rel), atol=1e-6)
            np.testing.assert_allclose(batch.targets[row].numpy(), np.load(tree / "emb" / f"{spk}.npy"))
            np.testing.assert_allclose(batch.others[row].numpy(), np.load(tree / "emb" / f"{other}.npy"))
            assert train.speakers[batch.labels[row]] == spk
        seen += batch.records.tolist()
    assert sorted(seen) == list(range(len(records)))  # every record once an epoch


def epoch_records(train, epoch: int, **sampling) -> list[list[int]]:
    return [batch.records.tolist() for batch in train.batches(epoch, Sampling(**sampling))]


def test_epochs_reshuffle_reproducibly(tree):
    train = data(tree)
    first = epoch_records(train, 1, batch_size=10, seed=1)
    assert first == epoch_records(train, 1, batch_size=10, seed=1)
    assert first != epoch_records(train, 2, batch_size=10, seed=1)
    assert first != epoch_records(train, 1, batch_size=10, seed=2)
    assert sorted(sum(first, [])) == list(range(len(train)))
    in_order = epoch_records(train, 1, batch_size=10, seed=1, shuffle=False)
    assert sum(in_order, []) == list(range(len(train)))


@pytest.mark.parametrize(
    ("kind", "sampling"),
    [
        ("normal", {}),
        ("triplet", {}),
        ("normal", {"n_per_speaker": 2}),
        ("distribution", {"speakers_per_step": 1}),
        ("distribution", {"speakers_per_step": 2}),
    ],
)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_global_batch(tree, kind, sampling, world_size):
    """The processes' batches of a step, put together, are the batch one process draws with the
    global size; each weighs its loss so that every sample counts 1 / the global batch (a DA loss,
    a mean over speakers: each process's speakers count alike); a global batch some process
    would get nothing of is left out by all."""
    train = data(tree, kind)
    size = sampling.get("speakers_per_step", 5)
    ranks = [
        list(
            train.batches(
                2, Sampling(batch_size=5, seed=3, **sampling), DistContext(rank=r, world_size=world_size)
            )
        )
        for r in range(world_size)
    ]
    bigger = {"speakers_per_step": size * world_size} if kind == "distribution" else {}
    single = list(train.batches(2, Sampling(batch_size=5 * world_size, seed=3, **{**sampling, **bigger})))
    kept = [
        whole
        for whole in single
        if whole.size >= world_size * (2 if kind == "distribution" else 1)
        and (kind != "distribution" or len(torch.unique(whole.pair_speaker)) >= world_size)
    ]
    assert all(len(batches) == len(kept) for batches in ranks) and kept
    for step, whole in enumerate(kept):
        parts = [ranks[r][step] for r in range(world_size)]
        for name in ("inputs", "targets", "labels", "others", "pair_same", "pair_speaker"):
            if getattr(whole, name) is None:
                assert all(getattr(part, name) is None for part in parts)
            else:
                assert torch.equal(torch.cat([getattr(part, name) for part in parts]), getattr(whole, name))
        for part in parts:
            expected = 1.0 if kind == "distribution" else part.size * world_size / whole.size
            assert part.weight == pytest.approx(expected)


def test_a_global_batch_too_small_to_split_is_left_out_and_the_rest_split_as_before(tree):
    train = data(tree)  # 90 records: global batches of 44, 44 and 2
    single = list(train.batches(1, Sampling(batch_size=44, seed=1)))
    ranks = [
        list(train.batches(1, Sampling(batch_size=11, seed=1), DistContext(rank=r, world_size=4)))
        for r in range(4)
    ]
    assert [batch.size for batch in single] == [44, 44, 2]
    assert [[batch.size for batch in batches] for batches in ranks] == [[11, 11]] * 4
    # a global batch that does not split evenly: the first processes take one more (numpy's
    # array_split, as before: DDP runs keep their exact weights)
    ranks = [
        list(train.batches(1, Sampling(batch_size=10, seed=1), DistContext(rank=r, world_size=4)))
        for r in range(4)
    ]
    assert [[batch.size for batch in batches] for batches in ranks] == [[10, 10, 3]] * 2 + [[10, 10, 2]] * 2


def test_n_per_speaker_sampler():
    rng = np.random.default_rng(0)
    speaker = np.repeat(np.arange(10), [3, 5, 8, 2, 9, 4, 6, 7, 1, 12])
    batches = speaker_grouped_batches(
        speaker, groups_per_batch=4, n_per_speaker=2, max_seg_per_spk=6, rng=rng
    )
    used = np.concatenate(batches)
    assert len(set(used.tolist())) == len(used)
    per_speaker = Counter(speaker[used].tolist())
    assert max(per_speaker.values()) <= 6 and 8 not in per_speaker  # one utterance: no pair
    for batch in batches:
        groups = speaker[batch].reshape(-1, 2)
        assert (groups[:, 0] == groups[:, 1]).all()  # a group is one speaker
        assert len(set(groups[:, 0].tolist())) == len(groups)  # no speaker twice in a batch
        assert len(groups) <= 4
    again = speaker_grouped_batches(speaker, 4, 2, 6, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_n_per_speaker_labels_every_item(tree):
    train = data(tree)
    for batch in train.batches(1, Sampling(batch_size=3, seed=1, n_per_speaker=2, max_seg_per_spk=10)):
        labels = batch.labels.view(-1, 2)
        assert (labels[:, 0] == labels[:, 1]).all() and len(set(labels[:, 0].tolist())) == len(labels)
        np.testing.assert_allclose(batch.targets.numpy(), train.speaker_embeddings[batch.labels].numpy())


def test_distribution_batches_are_whole_speakers_same_pairs_first(tree):
    """A step holds whole speakers in speaker order, each one's same-category pairs first, as
    rows (2p, 2p + 1); an epoch holds every pair of the list once."""
    train = data(tree, "distribution")
    lines = [line.split() for line in (tree / "lists" / "t_distribution_list.txt").read_text().splitlines()]

    def key(spk: str, first: np.ndarray, second: np.ndarray, flag: bool) -> tuple:
        return spk, tuple(np.round(first, 4)), tuple(np.round(second, 4)), flag

    listed = Counter(key(spk, stored(tree, a), stored(tree, b), flag == "1") for spk, a, b, flag in lines)
    for per_step, steps in ((1, 6), (2, 3)):
        batches = list(train.batches(1, Sampling(batch_size=1, seed=1, speakers_per_step=per_step)))
        assert len(batches) == steps
        found = Counter()
        for batch in batches:
            speakers = batch.pair_speaker.tolist()
            assert len(set(speakers)) == per_step and speakers == sorted(speakers)
            for spk in set(speakers):
                same = batch.pair_same[batch.pair_speaker == spk].tolist()
                assert same == sorted(same, reverse=True) and any(same) and not all(same)
            assert batch.inputs.shape[0] == 2 * len(speakers)
            torch.testing.assert_close(batch.targets, train.speaker_embeddings[batch.labels])
            for p, spk in enumerate(speakers):
                found[
                    key(
                        train.speakers[spk],
                        batch.inputs[2 * p].numpy(),
                        batch.inputs[2 * p + 1].numpy(),
                        bool(batch.pair_same[p]),
                    )
                ] += 1
        assert found == listed


def test_read_npy_equals_np_load_and_survives_many_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from stores.arrays import read_npy

    rng = np.random.default_rng(0)
    arrays = [
        rng.normal(size=(3, 8)).astype(np.float32),
        rng.normal(size=7),
        np.asfortranarray(rng.normal(size=(4, 5)).astype(np.float32)),
        np.zeros((0, 4), np.float32),
        np.arange(6, dtype=np.int16).reshape(2, 3),
    ]
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
    listed.write_text(
        "# a comment\n\n" + "\n".join(lines[:30]).replace(".npy", ".wav") + "\n" + "\n".join(lines[:5]) + "\n"
    )
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
