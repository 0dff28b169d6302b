"""--check and --eval with back-ends, intervals and calibration: the table, check.json, the trial
scores the viewer reads, and the viewer's DET curves and closing table of every back-end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config, train

import m_trainer
import m_viewer
from m_DataLoader import EmbeddingData, TrialSet
from m_network import SpeakerNet, Trainer
from m_utils import UserError
from scoring.backends import make_backend
from scoring.metrics import evaluate_scores, interpolated_eer, score_trials

DIM = 24
BACKENDS = ["none", "mean", "asnorm", "plda"]


def backend_config(data: Path, tmp_path: Path, **options) -> Path:
    lists = data / "lists"
    values = {
        "trainfunc": "MSE_CS",
        "multiple_embedding_flag": "C",
        "max_epoch": 2,
        "backends": BACKENDS,
        "bootstrap": 100,
        "asnorm_topk": 10,
        "lda_dim": 8,
        "calib_list": str(lists / "train_test_list.txt"),
        "calib_path": str(data / "train"),
        **options,
    }
    return config(data, tmp_path, **values)


@pytest.fixture(scope="module")
def checked(data, tmp_path_factory):
    """A trained run checked with every back-end and a calibration list: (run folder, stdout)."""
    tmp_path = tmp_path_factory.mktemp("checked")
    cfg = backend_config(data, tmp_path)
    save = tmp_path / "exp"
    train(cfg, save)
    out = m_trainer_output(["--config", str(cfg), "--save_path", str(save), "--check"])
    return save, cfg, out


def m_trainer_output(argv: list[str]) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        m_trainer.main(argv)
    return buffer.getvalue()


def enhancer(save: Path) -> Trainer:
    trainer = Trainer(SpeakerNet("MyLinearNetv2", "MSE_CS", nOut=DIM), torch.device("cpu"))
    found = sorted((save / "model").glob("model*.model"))
    trainer.load(found[-1], weights_only=True)
    return trainer


def test_check_records_cover_every_system_and_backend(checked):
    save, _, out = checked
    records = json.loads((save / "result" / "check.json").read_text())
    rows = [r for r in records if "eer" in r]
    assert {(r["trials"], r["system"], r["backend"]) for r in rows} == {
        (t, s, b) for t in ("test", "libri") for s in ("original", "enhanced") for b in BACKENDS
    }
    for r in rows:
        lo, hi = r["eer_ci95"]
        assert lo <= r["eer"] <= hi and 0 <= r["mindcf_p01"] and 0 <= r["mindcf_p05"]
        assert 0 <= r["min_cllr"] <= r["cllr"] + 1e-9  # calibrated on calib_list
    differences = [r for r in records if "eer_diff" in r]
    assert len(differences) == 8
    point = {(r["trials"], r["system"], r["backend"]): r["eer"] for r in rows}
    for r in differences:
        assert r["eer_diff"] == pytest.approx(
            point[(r["trials"], "enhanced", r["backend"])] - point[(r["trials"], "original", r["backend"])]
        )
    calibrations = [r for r in records if r["trials"] == "calib"]
    assert len(calibrations) == 8 and all(set(c["thresholds"]) == {"raw", "llr"} for c in calibrations)
    # the lines scripts parse are unchanged, and they are the none back-end's
    line = re.search(r"\[testset original EER\] ([\d.]+), \[testset processed EER\] ([\d.]+)", out)
    assert float(line.group(1)) == pytest.approx(point[("test", "original", "none")], abs=1e-4)
    assert float(line.group(2)) == pytest.approx(point[("test", "enhanced", "none")], abs=1e-4)
    assert "[95 % CI]" in out and "excludes 0" in out and "false accepts 1 %" in out


def test_check_records_both_eer_definitions_and_the_seed(checked):
    """Every system record holds the interpolated EER of its saved scores beside compute_eer's,
    and says the tables show the latter (the default); the sources record holds the seed."""
    save, _, _ = checked
    records = json.loads((save / "result" / "check.json").read_text())
    for trials in ("test", "libri"):
        saved = np.load(save / "result" / f"trials_{trials}.npz")
        rows = {(r["system"], r["backend"]): r for r in records if "eer" in r and r["trials"] == trials}
        for (system, backend), r in rows.items():
            assert r["eer_interpolated"] == pytest.approx(
                interpolated_eer(saved[f"{system}/{backend}"], saved["labels"]), abs=1e-9
            )
            assert r["eer_shown"] == "roc"
        for r in (r for r in records if "eer_diff" in r and r["trials"] == trials):
            assert r["eer_diff_interpolated"] == pytest.approx(
                rows[("enhanced", r["backend"])]["eer_interpolated"]
                - rows[("original", r["backend"])]["eer_interpolated"]
            )
    assert next(r for r in records if r["trials"] is None)["model"]["seed"] == 10


def test_saved_backend_scores_equal_a_direct_fit(data, checked):
    """The enhanced PLDA and AS-Norm scores are those of the back-ends fitted on the enhanced
    training embeddings, scored on the enhanced test embeddings."""
    save, _, _ = checked
    trainer = enhancer(save)
    train_data = EmbeddingData(data / "lists" / "train_normal_list.txt", data / "train", "normal", "C", DIM)
    trials = TrialSet(data / "lists" / "test_test_list.txt", data / "test", DIM)
    saved = np.load(save / "result" / "trials_test.npz")
    for name, options in (("plda", {"lda_dim": 8}), ("asnorm", {"asnorm_topk": 10})):
        backend = make_backend(name, True, **options)
        backend.fit(trainer.enhance(train_data.embeddings.numpy()), train_data.row_speakers())
        expected = backend.score(trainer.enhance(trials.embeddings), trials.left, trials.right)
        np.testing.assert_allclose(saved[f"enhanced/{name}"], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(saved["processed"], saved["enhanced/none"])
    np.testing.assert_allclose(
        saved["original/none"],
        score_trials(trials.embeddings, trials.left, trials.right, cosine=True),
        rtol=1e-6,
        atol=1e-6,
    )


def test_thresholds_from_the_calibration_list_hold_on_it(data, checked):
    save, _, _ = checked
    records = json.loads((save / "result" / "check.json").read_text())
    calib = TrialSet(data / "lists" / "train_test_list.txt", data / "train", DIM)
    nontargets = int((calib.labels == 0).sum())
    for record in (
        r for r in records if r["trials"] == "calib" and r["system"] == "original" and r["backend"] == "none"
    ):
        scores = -(1 - np.sum(l2(calib.embeddings[calib.left]) * l2(calib.embeddings[calib.right]), axis=1))
        accepted = scores >= record["thresholds"]["raw"]["far"] - 1e-6
        assert accepted[calib.labels == 0].sum() <= 0.01 * nontargets + 1


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_viewer_draws_every_backend_and_adds_its_rows(checked, capsys):
    save, _, _ = checked
    trials = m_viewer.load_trial_scores(save / "result" / "trials_test.npz")
    assert trials.backends() == BACKENDS and len(trials.scores) == 8
    m_viewer.main(["--save_path", str(save)])
    out = capsys.readouterr().out.split("Original vs enhanced")[1]
    for backend in BACKENDS[1:]:
        row = next(line for line in out.splitlines() if f"test list, {backend}" in line)
        expected = evaluate_scores(trials.scores[("enhanced", backend)], trials.labels)
        assert f"{expected['eer']:.2f}" in row.split() and f"{expected['mindcf_p01']:.4f}" in row.split()
    assert (save / "result" / "det.png").stat().st_size > 30_000


def test_eval_scores_every_backend(checked, capsys):
    save, cfg, _ = checked
    out = m_trainer_output(["--config", str(cfg), "--save_path", str(save), "--eval"])
    assert re.search(r"\[test plda\] EER [\d.]+, minDCF\(0.05\) [\d.]+", out)
    lines = (save / "result" / "eval_scores_test_asnorm.txt").read_text().splitlines()
    saved = np.load(save / "result" / "trials_test.npz")
    assert [float(line.split()[0]) for line in lines[:5]] == pytest.approx(
        saved["enhanced/asnorm"][:5], abs=2e-6
    )
    records = json.loads((save / "result" / "eval.json").read_text())
    assert {r["system"] for r in records if "eer" in r} == {"enhanced"}


def test_unknown_backend_and_backends_without_training_data(data, tmp_path):
    cfg = backend_config(data, tmp_path, backends=["none", "znorm"])
    with pytest.raises(UserError, match="unknown back-end 'znorm'.*known: asnorm, mean, none, plda"):
        m_trainer.main(["--config", str(cfg), "--save_path", str(tmp_path / "x"), "--check"])
    # none alone needs no training list
    cfg = backend_config(data, tmp_path, backends=["none"], train_list=None, train_path=None)
    out = m_trainer_output(["--config", str(cfg), "--save_path", str(tmp_path / "y"), "--check"])
    assert "[testset original EER]" in out and "asnorm" not in out


def test_backend_bounds_fail_at_the_config_check(data, tmp_path):  # noqa: F811
    cfg = backend_config(data, tmp_path, asnorm_topk=1)
    with pytest.raises(UserError, match="option 'asnorm_topk' must be at least 2"):
        m_trainer.main(["--config", str(cfg), "--save_path", str(tmp_path / "x"), "--check"])
    assert not (tmp_path / "x" / "result").exists()  # before any work


def test_records_name_their_sources_and_an_assumed_model(data, checked, tmp_path):  # noqa: F811
    """check.json's sources record: each list's file and size, and the model; for a checkpoint of
    the original repository (the same weights as the trained run) the model and loss assumed."""
    save, cfg, _ = checked
    records = json.loads((save / "result" / "check.json").read_text())
    sources = next(r for r in records if r["trials"] is None)
    lists = data / "lists"
    assert sources["sources"]["test"] == {
        "path": str(lists / "test_test_list.txt"),
        "count": len(TrialSet(lists / "test_test_list.txt", data / "test", DIM)),
        "embeddings": str(data / "test"),
        "manifest": None,
    }
    assert sources["sources"]["calib"]["path"] == str(lists / "train_test_list.txt")
    assert sources["sources"]["train"]["count"] == len(
        EmbeddingData(lists / "train_normal_list.txt", data / "train", "normal", "C", DIM)
    )
    assert sources["model"]["format"] == "m_trainer" and sources["model"]["assumed"] is False
    # the trained weights in the original repository's format: __S__.l1 ... onto the linear layers
    network = torch.load(sorted((save / "model").glob("model*.model"))[-1], weights_only=True)["network"]
    linear = [
        name
        for name, module in enhancer(save).net.model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    original = {
        f"__S__.l{number}.{part}": network[f"model.{name}.{part}"]
        for number, name in enumerate(linear, start=1)
        for part in ("weight", "bias")
    }
    torch.save(original, tmp_path / "model000000002.model")
    m_trainer_output(
        [
            "--config",
            str(cfg),
            "--save_path",
            str(tmp_path / "exp"),
            "--check",
            "--initial_model",
            str(tmp_path / "model000000002.model"),
            "--backends",
            "none",
        ]
    )
    again = json.loads((tmp_path / "exp" / "result" / "check.json").read_text())
    model = next(r for r in again if r["trials"] is None)["model"]
    assert model["format"] == "original repository" and model["assumed"] is True
    assert (model["model"], model["trainfunc"], model["nOut"]) == ("MyLinearNetv2", "MSE_CS", DIM)
    eer = {(r["trials"], r["system"]): r["eer"] for r in again if r.get("backend") == "none" and "eer" in r}
    assert eer[("test", "enhanced")] == next(
        r["eer"]
        for r in records
        if "eer" in r and r["trials"] == "test" and r["system"] == "enhanced" and r["backend"] == "none"
    )
