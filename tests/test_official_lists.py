"""VoxCeleb1's official trial lists (veri_test.txt, veri_test2.txt, list_test_all2.txt,
list_test_hard2.txt: `label enrolment.wav test.wav`, paths relative to the wav root) work unchanged
as `test_list`, whatever their line ends and blank lines."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_embedding_tree, run_script

import m_trainer
from m_DataLoader import TrialSet, read_list
from m_network import SpeakerNet, Trainer
from scoring.metrics import compute_eer

DIM = 24
ORIGINAL_EER = re.compile(r"\[testset original EER\] (\d+\.\d{4}),")


@pytest.fixture(scope="module")
def vox1(tmp_path_factory) -> Path:
    return make_embedding_tree(
        tmp_path_factory.mktemp("vox1") / "wav", speakers=5, sessions=2, utterances=3, dim=DIM
    )


def official_trials(root: Path) -> list[tuple[int, str, str]]:
    """Every pair of files, as (label, enrolment, test) with VoxCeleb1's `.wav` names."""
    files = sorted(p.relative_to(root).with_suffix(".wav").as_posix() for p in root.glob("*/*/*.npy"))
    return [(int(a.split("/")[0] == b.split("/")[0]), a, b) for a, b in itertools.combinations(files, 2)]


def trial_text(trials: list[tuple[int, str, str]], layout: str) -> str:
    lines = [f"{label} {a} {b}" for label, a, b in trials]
    if layout == "plain":
        return "\n".join(lines) + "\n"
    if layout == "no final newline":
        return "\n".join(lines)
    if layout == "crlf":
        return "\r\n".join(lines) + "\r\n"
    if layout == "blank lines":
        return "\n\n" + "\n\n \t\n".join(lines) + "\n\n\n"
    # all of them: CRLF, blank lines, no newline after the last trial
    return "\r\n\r\n" + "\r\n\r\n".join(lines)


def direct_scores(root: Path, trials: list[tuple[int, str, str]], cosine: bool) -> np.ndarray:
    """Each trial scored from the .npy files themselves: crop mean, L2 norm, then -L2 distance or
    cosine - 1."""

    def embedding(rel: str) -> np.ndarray:
        mean = np.load(root / Path(rel).with_suffix(".npy")).astype(np.float64).mean(axis=0)
        return mean / np.linalg.norm(mean)

    pairs = [(embedding(a), embedding(b)) for _, a, b in trials]
    if cosine:
        return np.array([a @ b - 1 for a, b in pairs])
    return np.array([-np.linalg.norm(a - b) for a, b in pairs])


@pytest.mark.parametrize("layout", ["plain", "no final newline", "crlf", "blank lines", "all"])
def test_official_list_layouts_parse_alike(vox1, tmp_path, layout):
    trials = official_trials(vox1)
    path = tmp_path / "veri_test.txt"
    path.write_bytes(trial_text(trials, layout).encode())
    assert read_list(path, "test") == trials
    trial_set = TrialSet(path, vox1, DIM, threads=0)
    assert trial_set.files[0] == "id10000/sess0000000/00001.wav"
    assert trial_set.labels.tolist() == [label for label, _, _ in trials]


def check_config(vox1: Path, tmp_path: Path, trials: list[tuple[int, str, str]]) -> tuple[Path, Path]:
    """A config whose test_list is an official-format list (every oddity at once), and a model."""
    trial_list = tmp_path / "veri_test2.txt"
    trial_list.write_bytes(trial_text(trials, "all").encode())
    model = tmp_path / "initial.model"
    Trainer(SpeakerNet("MyLinearNetv2", "MSE", nOut=DIM), torch.device("cpu")).save(model, 0)
    cfg = tmp_path / "check.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "test_list": str(trial_list),
                "test_path": str(vox1),
                "nOut": DIM,
                "initial_model": str(model),
                "device": "cpu",
            }
        )
    )
    return cfg, tmp_path / "exp"


def assert_original_scores(save: Path, output: str, expected: np.ndarray, labels: np.ndarray) -> None:
    saved = np.load(save / "result" / "trials_test.npz")
    assert saved["labels"].tolist() == labels.tolist()
    np.testing.assert_allclose(saved["original"], expected, atol=1e-5)
    assert ORIGINAL_EER.search(output).group(1) == f"{compute_eer(expected, labels)[0]:.4f}"


def test_check_scores_an_official_list_by_l2(vox1, tmp_path):
    trials = official_trials(vox1)
    cfg, save = check_config(vox1, tmp_path, trials)
    result = run_script("m_trainer.py", "--config", str(cfg), "--save_path", str(save), "--check")
    labels = np.array([label for label, _, _ in trials])
    assert 0 < labels.sum() < len(labels)
    assert_original_scores(save, result.stdout, direct_scores(vox1, trials, cosine=False), labels)


def test_check_scores_an_official_list_by_cosine(vox1, tmp_path, capsys):
    trials = official_trials(vox1)
    cfg, save = check_config(vox1, tmp_path, trials)
    m_trainer.main(
        [
            "--config",
            str(cfg),
            "--save_path",
            str(save),
            "--check",
            "--multiple_embedding_flag",
            "C",
            "--nDataLoaderThread",
            "0",
        ]
    )
    labels = np.array([label for label, _, _ in trials])
    assert_original_scores(save, capsys.readouterr().out, direct_scores(vox1, trials, cosine=True), labels)
