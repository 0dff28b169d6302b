"""Enrolment models (issue 26, items 1 and 2): trial lists over spk2utt models scored against a
direct computation, in both trial formats and with AS-Norm; the bad inputs named; the lists of
`m_gen_list.py --lists enroll`; and a training run with --check over an enrolment list."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import config, make_embedding_tree, train

import m_trainer
from m_comb_embs import combine
from m_gen_list import make_lists
from m_network import parse_score_line
from m_utils import UserError
from scoring.backends import make_backend
from scoring.enrollment import ModelTrials, read_spk2utt
from scoring.evaluation import Settings, TrainingSet, TrialList, evaluate
from stores.keys import key_category

DIM = 8
# Models of 1 to 3 utterances; trials name each model on their left side.
SPK2UTT = {
    "a": ["id10000/sess0000000/00001.npy", "id10000/sess0000000/00002.npy", "id10000/sess0000001/00001.npy"],
    "b": ["id10001/sess0000000/00001.npy"],
    "c": ["id10002/sess0000001/00002.npy", "id10002/sess0000001/00003.npy"],
}
TRIALS = [
    (1, "a", "id10000/sess0000002/00001.npy"),
    (0, "a", "id10001/sess0000002/00003.npy"),
    (1, "b", "id10001/sess0000002/00002.npy"),
    (0, "b", "id10002/sess0000002/00001.npy"),
    (1, "c", "id10002/sess0000000/00004.npy"),
    (0, "c", "id10000/sess0000002/00001.npy"),
    (0, "a", "id10002/sess0000002/00001.npy"),
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_embedding_tree(tmp_path_factory.mktemp("enroll") / "emb", speakers=4, dim=DIM)


def write_lists(folder: Path, kaldi: bool = False) -> tuple[Path, Path]:
    spk2utt = folder / "models.spk2utt"
    spk2utt.write_text("".join(f"{model} {' '.join(utts)}\n" for model, utts in SPK2UTT.items()))
    trials = folder / ("trials.kaldi" if kaldi else "trials.txt")
    trials.write_text(
        "".join(
            f"{m} {t} {'target' if label else 'nontarget'}\n" if kaldi else f"{label} {m} {t}\n"
            for label, m, t in TRIALS
        )
    )
    return spk2utt, trials


def single(tree: Path, rel: str) -> np.ndarray:
    mean = np.load(tree / rel).astype(np.float64).mean(axis=0)
    return mean / np.linalg.norm(mean)


def direct_scores(tree: Path, embedding_type: str, system=lambda x: x) -> np.ndarray:
    """Each trial's score by hand: the model is the mean of its utterances' (system's) embeddings
    (type C: normalised, cosine scoring), L2 distance for type B."""
    scores = []
    for _, model, test in TRIALS:
        rows = system(np.stack([single(tree, rel) for rel in SPK2UTT[model]]))
        if embedding_type == "B":
            rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        enrolled = rows.mean(axis=0)
        probe = system(single(tree, test)[None, :])[0]
        if embedding_type == "C":
            scores.append(enrolled @ probe / np.linalg.norm(enrolled) / np.linalg.norm(probe) - 1)
        else:
            scores.append(-np.linalg.norm(enrolled - probe))
    return np.array(scores)


def trial_list(tree: Path, folder: Path, embedding_type: str, kaldi: bool = False) -> TrialList:
    spk2utt, trials = write_lists(folder, kaldi)
    read = ModelTrials(trials, tree, spk2utt, tree, embedding_type, DIM, threads=0)
    return TrialList(
        "test",
        str(trials),
        read.labels,
        read.left,
        read.right,
        read.files,
        read.embeddings,
        read.speaker_of_trials(),
        models=read.models,
    )


@pytest.mark.parametrize("embedding_type", ["B", "C"])
@pytest.mark.parametrize("kaldi", [False, True])
def test_model_scores_equal_a_direct_computation(tree, tmp_path, embedding_type, kaldi):
    trials = trial_list(tree, tmp_path, embedding_type, kaldi)
    assert trials.labels.tolist() == [label for label, *_ in TRIALS]
    # the enhanced system: a fixed nonlinear map, applied to the utterances before the model is pooled
    weights = np.random.default_rng(1).standard_normal((DIM, DIM)).astype(np.float32)
    systems = {
        "original": lambda table: table,
        "enhanced": lambda table: np.tanh(np.asarray(table) @ weights),
    }
    results = evaluate([trials], systems, Settings(["none"], cosine=embedding_type == "C", resamples=10))
    scores = results.lists["test"].scores
    np.testing.assert_allclose(scores[("original", "none")], direct_scores(tree, embedding_type), atol=1e-5)
    np.testing.assert_allclose(
        scores[("enhanced", "none")],
        direct_scores(tree, embedding_type, lambda x: np.tanh(x @ weights)),
        atol=1e-4,
    )
    # the bootstrap's speaker of each trial is its model's speaker
    speakers = [SPK2UTT[model][0].split("/")[0] for _, model, _ in TRIALS]
    assert trials.speakers.tolist() == np.unique(speakers, return_inverse=True)[1].tolist()
    assert [trials.files[i] for i in trials.left] == [model for _, model, _ in TRIALS]
    assert [trials.files[i] for i in trials.right] == [test for *_, test in TRIALS]


def test_asnorm_scores_models_as_rows_of_their_embeddings(tree, tmp_path):
    trials = trial_list(tree, tmp_path, "C")
    cohort = make_embedding_tree(tmp_path / "cohort", speakers=6, dim=DIM, seed=5)
    files = sorted(cohort.glob("*/*/*.npy"))
    train = TrainingSet(
        np.stack([single(cohort, f.relative_to(cohort)) for f in files]).astype(np.float32),
        np.array([f.relative_to(cohort).parts[0] for f in files]),
    )
    settings = Settings(["asnorm"], {"asnorm_topk": 5}, cosine=True, resamples=10)
    got = evaluate([trials], {"original": lambda table: table}, settings, train).lists["test"].scores
    # by hand: the models' embeddings as rows of one table, scored by the same back-end
    models = [np.mean([single(tree, rel) for rel in SPK2UTT[m]], axis=0) for m in ("a", "b", "c")]
    tests = sorted({test for *_, test in TRIALS})
    table = np.stack([*models, *(single(tree, rel) for rel in tests)]).astype(np.float32)
    left = np.array([("a", "b", "c").index(m) for _, m, _ in TRIALS])
    right = np.array([3 + tests.index(t) for *_, t in TRIALS])
    asnorm = make_backend("asnorm", True, asnorm_topk=5).fit(train.embeddings, train.speakers)
    np.testing.assert_allclose(got[("original", "asnorm")], asnorm.score(table, left, right), atol=1e-5)


def test_a_model_without_utterance_is_named(tmp_path):
    path = tmp_path / "models.spk2utt"
    path.write_text("a id10000/x/1.npy\n\nb\n")
    with pytest.raises(UserError, match=rf"{path}:3: model b has no utterance"):
        read_spk2utt(path)


def test_a_missing_utterance_or_model_is_named(tree, tmp_path):
    spk2utt, trials = write_lists(tmp_path)
    lines = spk2utt.read_text().splitlines()
    spk2utt.write_text("\n".join([*lines[:2], lines[2] + " id10002/sess0000001/09999.npy"]) + "\n")
    with pytest.raises(UserError, match=rf"{spk2utt}:3"):
        ModelTrials(trials, tree, spk2utt, tree, "B", DIM, threads=0)
    spk2utt.write_text("\n".join(lines[:2]) + "\n")  # c is not a model any more
    with pytest.raises(UserError, match=rf"{trials}:5: c is not a model of the enrolment list"):
        ModelTrials(trials, tree, spk2utt, tree, "B", DIM, threads=0)


def read_enrolment(spk2utt: Path, trials: Path) -> tuple[dict[str, list[str]], list[list[str]]]:
    return read_spk2utt(spk2utt), [line.split() for line in trials.read_text().splitlines()]


def fewest_categories(utterances: list[str], k: int) -> int:
    """The fewest categories of one speaker that hold k of its utterances."""
    sizes = sorted(Counter(key_category(u.removesuffix(".npy")) for u in utterances).values(), reverse=True)
    return next(n for n in range(1, len(sizes) + 1) if sum(sizes[:n]) >= k)


def test_enrolment_lists(tmp_path):
    # speakers with categories of unequal sizes: 1 to 5 utterances
    root = tmp_path / "emb"
    for s in range(6):
        for c, count in enumerate((1 + s % 3, 5, 2, 3 - s % 2)):
            for u in range(count):
                path = root / f"id{10000 + s}" / f"v{c}" / f"{u:05d}.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, np.full((2, 4), s + 1.0, np.float32))
    written = make_lists(root, "vox", tmp_path / "lists", seed=4, kinds=("enroll",), enroll_utts=(2, 7))
    assert sorted(p.name for p in written.values()) == [
        "vox_enroll2.spk2utt",
        "vox_enroll2_test_list.txt",
        "vox_enroll7.spk2utt",
        "vox_enroll7_test_list.txt",
    ]
    every = sorted(str(p.relative_to(root)) for p in root.glob("*/*/*.npy"))
    tests_of = {}
    for k in (2, 7):
        models, trials = read_enrolment(written[f"enroll{k}"], written[f"enroll{k}_test"])
        assert len(models) == 6
        for model, utterances in models.items():
            speaker = model.split("-")[0]
            assert model == f"{speaker}-enroll{k}" and len(set(utterances)) == k
            assert all(u.startswith(speaker + "/") for u in utterances)
            own = [u for u in every if u.startswith(speaker + "/")]
            assert len({key_category(u) for u in utterances}) == fewest_categories(own, k)
        labels = Counter(label for label, *_ in trials)
        assert labels["1"] == labels["0"] > 0
        for label, model, test in trials:
            speaker = model.split("-")[0]
            assert (test.split("/")[0] == speaker) == (label == "1")
            assert test not in models[model]
        tests_of[k] = [(label, model.split("-")[0], test) for label, model, test in trials]
    assert tests_of[2] == tests_of[7]  # the same test utterances and trials for every K
    # no target test utterance from a category that any K's model of its speaker draws from
    pools = {
        m.split("-")[0]: {key_category(u) for u in us} for m, us in read_spk2utt(written["enroll7"]).items()
    }
    assert all(key_category(test) not in pools[spk] for label, spk, test in tests_of[7] if label == "1")
    again = make_lists(root, "vox", tmp_path / "again", seed=4, kinds=("enroll",), enroll_utts=(2, 7))
    assert all(again[k].read_bytes() == written[k].read_bytes() for k in written)


def test_check_over_enrolment_models(tmp_path, one_thread):
    data = tmp_path / "data"
    for seed, (name, speakers) in enumerate((("train", 12), ("test", 6), ("libri", 4))):
        tree = make_embedding_tree(data / name, speakers=speakers, dim=24, seed=seed, libri=name == "libri")
        combine(tree)
        make_lists(tree, name, data / "lists", seed=10)
    written = make_lists(data / "test", "test", data / "lists", seed=10, kinds=("enroll",), enroll_utts=(3,))
    cfg = config(
        data,
        tmp_path,
        test_list=str(written["enroll3_test"]),
        enroll_list=str(written["enroll3"]),
        nClasses=12,
        max_epoch=1,
        backends=["none", "asnorm"],
        asnorm_topk=5,
        bootstrap=20,
        multiple_embedding_flag="C",
        trainfunc="MSE_CS",
    )
    save = tmp_path / "exp"
    validations = [values for is_val, values in map(parse_score_line, train(cfg, save)) if is_val]
    assert len(validations) == 1 and 0 <= validations[0]["VEER"] <= 100  # scored over the models
    m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--check"])
    records = json.loads((save / "result" / "check.json").read_text())
    eers = {(r["trials"], r["system"], r["backend"]) for r in records if "eer" in r and "system" in r}
    assert {("test", s, b) for s in ("original", "enhanced") for b in ("none", "asnorm")} <= eers
    saved = np.load(save / "result" / "trials_test.npz")
    models, trials = read_enrolment(written["enroll3"], written["enroll3_test"])
    assert saved["labels"].tolist() == [int(label) for label, *_ in trials]
    by_hand = []
    for _, model, test in trials:
        enrolled = np.mean([single(data / "test", u) for u in models[model]], axis=0)
        probe = single(data / "test", test)
        by_hand.append(enrolled @ probe / np.linalg.norm(enrolled) - 1)
    np.testing.assert_allclose(saved["original/none"], by_hand, atol=1e-5)


def test_model_quality_sums_durations_and_averages_norms(tmp_path):
    tree = make_embedding_tree(tmp_path / "emb", speakers=4, dim=DIM)
    files = sorted(str(p.relative_to(tree)) for p in tree.glob("*/*/*.npy"))
    seconds = {rel: 1.0 + k for k, rel in enumerate(files)}
    (tree / "utt2dur").write_text("".join(f"{rel} {s}\n" for rel, s in seconds.items()))
    spk2utt, trials = write_lists(tmp_path)
    read = ModelTrials(trials, tree, spk2utt, tree, "C", DIM, threads=0)
    tests = read.files[: len(read.embeddings)]
    assert read.durations.tolist() == [seconds[t] for t in tests] + [
        sum(seconds[u] for u in SPK2UTT[m]) for m in ("a", "b", "c")
    ]
    norm = {rel: np.linalg.norm(np.load(tree / rel).astype(np.float64).mean(axis=0)) for rel in files}
    np.testing.assert_allclose(
        read.norms,
        [norm[t] for t in tests] + [np.mean([norm[u] for u in SPK2UTT[m]]) for m in ("a", "b", "c")],
        rtol=1e-5,
    )
