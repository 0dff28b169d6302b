"""Back-ends as chains of steps (issue 26, item 7): `mean+asnorm` is AS-Norm on mean-subtracted
embeddings against the mean-subtracted cohort, `mean+asnorm+qmf` QMF over those scores, each
against a direct numpy computation; single names keep their numbers; a chain that cannot be
fitted is a UserError naming where it was given; --check records a chain like any back-end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from conftest import config, train
from sklearn.linear_model import LogisticRegression
from test_backends import speaker_data, speaker_trials
from test_check_report import DIM, enhancer, m_trainer_output

import m_trainer
import m_viewer
from m_DataLoader import EmbeddingData, TrialSet
from m_utils import UserError
from scoring.backends import Quality, chain_steps, check_backend_options, make_backend
from scoring.evaluation import Settings, TrainingSet, TrialList, evaluate
from scoring.report import SystemResult

TOPK = 5


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mean_asnorm_by_hand(
    train: np.ndarray, speakers: np.ndarray, table: np.ndarray, left: np.ndarray, right: np.ndarray, topk: int
) -> np.ndarray:
    """WeSpeaker's recipe: subtract the training mean from every embedding and from the cohort
    (one mean embedding per training speaker), then AS-Norm of cosine scores -(1 - cos)."""
    mean = train.astype(np.float64).mean(axis=0)
    centred = train - mean
    cohort = unit_rows(np.stack([centred[speakers == s].mean(axis=0) for s in np.unique(speakers)]))
    rows = unit_rows(table.astype(np.float64) - mean)
    top = -np.sort(-(rows @ cohort.T - 1), axis=1)[:, :topk]
    means, stds = top.mean(axis=1), top.std(axis=1)
    raw = np.sum(rows[left] * rows[right], axis=1) - 1
    return 0.5 * ((raw - means[left]) / stds[left] + (raw - means[right]) / stds[right])


@pytest.mark.parametrize("cosine", [False, True])
def test_mean_asnorm_is_asnorm_of_mean_subtracted_embeddings(cosine):
    """Whatever the embedding type: after `mean` the steps score by cosine, as `mean` does."""
    rng = np.random.default_rng(3)
    train_table, speakers = speaker_data(rng, 12, 6, 8)
    train_table += 0.4  # an offset the mean takes away, which moves the cohort's scores
    table, left, right, _, _ = speaker_trials(rng, 10, 6, 8, 200)
    chain = make_backend("mean+asnorm", cosine, asnorm_topk=TOPK).fit(train_table, speakers)
    expected = mean_asnorm_by_hand(train_table, speakers, table, left, right, TOPK)
    np.testing.assert_allclose(chain.score(table, left, right), expected, rtol=1e-4, atol=1e-4)
    plain = make_backend("asnorm", True, asnorm_topk=TOPK).fit(train_table, speakers)
    assert np.abs(plain.score(table, left, right) - expected).max() > 1e-2  # the mean matters here


def test_mean_asnorm_qmf_is_a_logistic_regression_on_the_chain_scores():
    rng = np.random.default_rng(4)
    train_table, speakers = speaker_data(rng, 12, 6, 8)
    train_table += 0.4
    table, left, right, labels, _ = speaker_trials(rng, 10, 8, 8, 600)
    quality = Quality(rng.uniform(1, 20, len(table)))
    chain = make_backend("mean+asnorm+qmf", True, asnorm_topk=TOPK, qmf_base="plda", backends=["none"])
    assert chain.name == "mean+asnorm+qmf" and chain.base_name == "mean+asnorm"  # qmf_base: bare qmf only
    chain.fit(train_table, speakers)
    chain.fit_trials(table, left[:400], right[:400], labels[:400], quality)
    logs = np.log(quality.durations)
    features = np.column_stack(
        [
            mean_asnorm_by_hand(train_table, speakers, table, left, right, TOPK),
            np.minimum(logs[left], logs[right]),
            np.maximum(logs[left], logs[right]),
        ]
    )
    centre, scale = features[:400].mean(axis=0), features[:400].std(axis=0)
    direct = LogisticRegression(class_weight="balanced").fit((features[:400] - centre) / scale, labels[:400])
    np.testing.assert_allclose(
        chain.score(table, left[400:], right[400:], quality),
        direct.decision_function((features[400:] - centre) / scale),
        rtol=1e-3,
        atol=1e-3,
    )


def trial_list(rng: np.random.Generator, name: str) -> TrialList:
    table, left, right, labels, speakers = speaker_trials(rng, 8, 6, 8, 300)
    return TrialList(
        name,
        f"{name}.txt",
        labels,
        left,
        right,
        [f"f{i}" for i in range(len(table))],
        table + 0.3,
        speakers,
        Quality(rng.uniform(1, 20, len(table))),
    )


def evaluated(backends: list[str]):
    rng = np.random.default_rng(8)
    train_table, speakers = speaker_data(rng, 12, 6, 8)
    training = TrainingSet(train_table + 0.3, speakers)
    test, calib = trial_list(rng, "test"), trial_list(rng, "calib")
    settings = Settings(backends, {"asnorm_topk": TOPK}, cosine=True, resamples=20)
    results = evaluate([test], {"original": lambda table: table}, settings, training, calib)
    return results, training, test, calib


def test_evaluate_scores_chains_with_their_bases_shared_or_their_own():
    chains = ["asnorm", "qmf", "asnorm+qmf", "mean", "mean+asnorm", "mean+asnorm+qmf", "plda+qmf"]
    results, training, test, calib = evaluated(["none", *chains])
    scores = {name: values for (_, name), values in results.lists["test"].scores.items()}
    assert set(scores) == {"none", *chains}
    np.testing.assert_array_equal(scores["asnorm+qmf"], scores["qmf"])  # qmf_base asnorm by default
    expected = mean_asnorm_by_hand(
        training.embeddings, training.speakers, test.embeddings, test.left, test.right, TOPK
    )
    np.testing.assert_allclose(scores["mean+asnorm"], expected, rtol=1e-4, atol=1e-4)
    alone, *_ = evaluated(["none", "mean+asnorm+qmf", "plda+qmf"])  # bases not scored: fitted by the chains
    for name in ("mean+asnorm+qmf", "plda+qmf"):
        np.testing.assert_allclose(
            alone.lists["test"].scores[("original", name)], scores[name], rtol=1e-5, atol=1e-5
        )
    rows = {r.backend for r in alone.records if isinstance(r, SystemResult)}
    assert rows == {"none", "mean+asnorm+qmf", "plda+qmf"}
    without_training = evaluate(
        [test],
        {"original": lambda table: table},
        Settings(["none", "mean+asnorm+qmf"], {"asnorm_topk": TOPK}, cosine=True, resamples=20),
        None,
        calib,
    )
    assert [name for _, name in without_training.lists["test"].scores] == ["none"]


KNOWN = "known steps: asnorm, mean, none, plda, qmf"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("asnorm+mean", "the score-level step asnorm before the embedding-level step mean"),
        ("mean+qmf+asnorm", "the rescore-level step qmf before the score-level step asnorm"),
        ("mean+plda", "plda not first"),
        ("plda+asnorm", "two steps that score embeddings (plda, asnorm)"),
        ("mean+mean", "mean twice"),
        ("none+qmf", "none is the back-end of no step"),
    ],
)
def test_a_chain_that_cannot_be_fitted_is_an_error_listing_the_steps(name, problem):
    message = f"x.yaml:3: backends: back-end '{name}': {problem}; "
    with pytest.raises(UserError, match=f"{re.escape(message)}.*{KNOWN}"):
        chain_steps(name, "x.yaml:3: backends")
    with pytest.raises(UserError, match=re.escape(problem)):
        check_backend_options(["none", name], {})


def test_an_unknown_step_names_the_config_file_and_line(tmp_path):
    cfg = tmp_path / "chains.yaml"
    cfg.write_text(yaml.safe_dump({"nOut": 24, "backends": ["none", "mean+znorm"]}))
    with pytest.raises(
        UserError,
        match=rf"{cfg}:1: backends: back-end 'mean\+znorm': unknown step 'znorm' "
        r"\(did you mean asnorm\?\); known: asnorm, mean, none, plda, qmf",
    ):
        m_trainer.parse_options(["--config", str(cfg)])
    cfg.write_text(yaml.safe_dump({"backends": ["none", "asnorm+mean"]}))
    with pytest.raises(UserError, match=rf"{cfg}:1: backends: .*{KNOWN}"):
        m_trainer.parse_options(["--config", str(cfg)])


CHECKED = ["none", "asnorm", "mean+asnorm"]


def test_check_records_a_chain_like_any_backend(data, tmp_path):
    """--check with chains in the config: their records in check.json for both systems, their paired
    difference, their scores in trials_test.npz equal to the chain fitted by hand on the enhanced
    embeddings, their rows in the table, and the viewer's labels."""
    lists = data / "lists"
    cfg = config(
        data,
        tmp_path,
        trainfunc="MSE_CS",
        multiple_embedding_flag="C",
        backends=CHECKED,
        max_epoch=1,
        bootstrap=50,
        asnorm_topk=10,
        calib_list=str(lists / "train_test_list.txt"),
        calib_path=str(data / "train"),
    )
    save = tmp_path / "exp"
    train(cfg, save)
    out = m_trainer_output(["--config", str(cfg), "--save_path", str(save), "--check"])
    records = json.loads((save / "result" / "check.json").read_text())
    rows = {(r["trials"], r["system"], r["backend"]) for r in records if "eer" in r}
    assert rows == {(t, s, b) for t in ("test", "libri") for s in ("original", "enhanced") for b in CHECKED}
    assert {(r["trials"], r["backend"]) for r in records if "eer_diff" in r} == {
        (t, b) for t in ("test", "libri") for b in CHECKED
    }
    assert any(line.split()[:3] == ["test", "enhanced", "mean+asnorm"] for line in out.splitlines())
    trainer = enhancer(save)
    training = EmbeddingData(lists / "train_normal_list.txt", data / "train", "normal", "C", DIM)
    trials = TrialSet(lists / "test_test_list.txt", data / "test", DIM)
    chain = make_backend("mean+asnorm", True, asnorm_topk=10)
    chain.fit(trainer.enhance(training.embeddings.numpy()), training.row_speakers())
    saved = np.load(save / "result" / "trials_test.npz")
    np.testing.assert_allclose(
        saved["enhanced/mean+asnorm"],
        chain.score(trainer.enhance(trials.embeddings), trials.left, trials.right),
        rtol=1e-4,
        atol=1e-4,
    )
    viewed = m_viewer.load_trial_scores(save / "result" / "trials_test.npz")
    assert viewed.backends() == CHECKED
    assert m_viewer.score_meanings(viewed.backends(), "C")[1:] == [
        "asnorm: AS-Norm of -(cosine distance)",
        "mean+asnorm: AS-Norm of -(cosine distance) after subtracting the training mean",
    ]
