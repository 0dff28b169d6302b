"""Bad input gets one clear error naming the file (and line), exit status 2, files untouched."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, config, make_embedding_tree

import m_trainer
from m_DataLoader import read_list
from m_network import checkpoints
from m_utils import FAULT_EXIT_STATUS, FAULT_VARIABLE, UserError


def trainer_error(argv: list[str]) -> str:
    """Run the trainer's main in-process and return its UserError message."""
    with pytest.raises(UserError) as err:
        m_trainer.main(argv)
    return str(err.value)


def run_trainer(
    cfg: Path, save: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "m_trainer.py", "--config", str(cfg), "--save_path", str(save), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "content, kind, message",
    [
        ("id1 a/b/1.npy extra\n", "normal", ":1: a normal list line has 2 fields"),
        ("1 a.npy\n", "test", ":1: a test list line has 3 fields"),
        ("2 a.npy b.npy\n", "test", ":1: label must be 0 or 1, found '2'"),
        ("1 a.npy b.npy\nyes a.npy b.npy\n", "test", ":2: label must be 0 or 1"),
        ("s a b 3\n", "distribution", ":1: flag must be 0 or 1"),
        ("\n# only a comment\n", "normal", "list is empty"),
    ],
)
def test_list_errors_name_file_and_line(tmp_path, content, kind, message):
    path = tmp_path / "my_list.txt"
    path.write_text(content)
    with pytest.raises(UserError, match="my_list.txt") as err:
        read_list(path, kind)
    assert message in str(err.value)


def exp_config(data, tmp_path, **options):
    return [
        "--config",
        str(config(data, tmp_path, max_epoch=1, **options)),
        "--save_path",
        str(tmp_path / "exp"),
    ]


def test_missing_npy_named_with_its_list(data, tmp_path):
    listed = tmp_path / "train.txt"
    listed.write_text(
        (data / "lists" / "train_normal_list.txt").read_text() + "id10000 id10000/sess0000000/99999.npy\n"
    )
    message = trainer_error(exp_config(data, tmp_path, train_list=str(listed)))
    assert "train.txt" in message and "99999.npy" in message


def corrupt_tree(tmp_path: Path, array: np.ndarray) -> Path:
    root = make_embedding_tree(tmp_path / "emb", speakers=3, dim=24)
    np.save(root / "id10001" / "sess0000001" / "00002.npy", array)
    return root


@pytest.mark.parametrize(
    "array, message",
    [
        (np.ones((3, 16), np.float32), "embedding dimension 16 does not match nOut 24"),
        (np.ones((2, 3, 24), np.float32), "expected an embedding of shape"),
        (np.full((3, 24), np.nan, np.float32), "NaN or infinite"),
        (np.array([[np.inf] * 24], np.float32), "NaN or infinite"),
    ],
)
def test_bad_embedding_files(data, tmp_path, array, message):
    root = corrupt_tree(tmp_path, array)
    trials = tmp_path / "trials.txt"
    trials.write_text(
        "1 id10001/sess0000001/00002.npy id10001/sess0000001/00001.npy\n"
        "0 id10000/sess0000001/00001.npy id10001/sess0000001/00001.npy\n"
    )
    error = trainer_error(exp_config(data, tmp_path, test_list=str(trials), test_path=str(root)))
    assert "00002.npy" in error and message in error


def test_test_list_naming_missing_files(data, tmp_path):
    trials = tmp_path / "trials.txt"
    trials.write_text("1 id10000/sess0000000/00001.wav id99999/x/00001.wav\n")
    error = trainer_error(exp_config(data, tmp_path, test_list=str(trials)))
    assert "trials.txt" in error and "id99999/x/00001.npy" in error


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("model", "MyLinearNetv9", "unknown model 'MyLinearNetv9'"),
        ("trainfunc", "MSE_XX", "unknown loss (trainfunc) 'MSE_XX'"),
        ("optimizer", "adagrad", "unknown optimizer 'adagrad'"),
        ("scheduler", "exp", "unknown scheduler 'exp'"),
        ("activation", "tanh", "unknown activation 'tanh'"),
        ("multiple_embedding_flag", "A", "must be B or C"),
        ("batch_size", 0, "'batch_size' must be at least 1"),
    ],
)
def test_unknown_names_and_bad_values(data, tmp_path, option, value, message):
    assert message in trainer_error(exp_config(data, tmp_path, **{option: value}))
    assert not (tmp_path / "exp").exists()


def test_nclasses_smaller_than_training_speakers(data, tmp_path):
    error = trainer_error(exp_config(data, tmp_path, trainfunc="Softmax", nClasses=5))
    assert "nClasses 5 is smaller than the 40 training speakers" in error


def test_unwritable_save_path(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("user data")
    cfg = config(data, tmp_path)
    error = trainer_error(["--config", str(cfg), "--save_path", str(blocker / "exp")])
    assert "is not writable" in error and blocker.read_text() == "user data"


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04truncated"])
def test_truncated_or_foreign_checkpoint(data, tmp_path, content):
    bad = tmp_path / "bad.model"
    bad.write_bytes(content)
    error = trainer_error(exp_config(data, tmp_path) + ["--check", "--initial_model", str(bad)])
    assert "bad.model: not a readable checkpoint" in error
    assert bad.read_bytes() == content


def test_checkpoint_of_another_kind(data, tmp_path):
    foreign = tmp_path / "foreign.model"
    torch.save({"weights": torch.zeros(3)}, foreign)
    error = trainer_error(exp_config(data, tmp_path) + ["--check", "--initial_model", str(foreign)])
    assert "foreign.model: neither a checkpoint of this project" in error


def test_command_line_error_has_no_traceback(data, tmp_path):
    cfg = config(data, tmp_path, model="Nope")
    result = run_trainer(cfg, tmp_path / "exp")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {cfg}:") and "Traceback" not in result.stderr
    assert ": model: unknown model 'Nope'" in result.stderr


def test_training_stopped_hard_resumes_from_its_last_checkpoint(data, tmp_path):
    """A run stopped hard (fault_point, as kill -9) right after its second checkpoint: every
    checkpoint under its final name is complete, and the re-run ends with the scores.txt and weights
    of an uninterrupted run."""
    cfg = config(data, tmp_path, trainfunc="MSE", max_epoch=6, test_interval=2)
    reference = run_trainer(cfg, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr
    save = tmp_path / "killed"
    stopped = run_trainer(cfg, save, env={FAULT_VARIABLE: "exit_after:trainer.checkpoint:2"})
    assert stopped.returncode == FAULT_EXIT_STATUS, stopped.stderr
    assert sorted(checkpoints(save / "model")) == [2, 4]
    for path in checkpoints(save / "model").values():
        torch.load(path, weights_only=True)  # every checkpoint under its final name is complete
    resumed = run_trainer(cfg, save)
    assert resumed.returncode == 0, resumed.stderr
    lines = (save / "result" / "scores.txt").read_text().splitlines()
    assert lines == (tmp_path / "ref" / "result" / "scores.txt").read_text().splitlines()
    last = max(checkpoints(save / "model"))
    ours = torch.load(checkpoints(save / "model")[last], weights_only=True)["network"]
    theirs = torch.load(checkpoints(tmp_path / "ref" / "model")[last], weights_only=True)["network"]
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


TOKENS = [
    "1",
    "0",
    "2",
    "-1",
    "id1",
    "a/b/c.npy",
    "x.wav",
    "",
    " ",
    "\t",
    "#",
    "nan",
    "é",
    "\x00",
    "1.0",
    "yes",
    "\\",
    "'",
    '"',
    "a b",
    "\n",
]


def random_line(rng: random.Random) -> str:
    return " ".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 6)))


def test_fuzz_list_parser(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "fuzz.txt"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(1500):
        if rng.random() < 0.1:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
        else:
            path.write_text("\n".join(random_line(rng) for _ in range(rng.randint(0, 5))))
        kind = rng.choice(["normal", "test", "triplet", "distribution"])
        try:
            records = read_list(path, kind)
        except UserError as err:
            assert "fuzz.txt" in str(err)
            outcomes["error"] += 1
        else:
            assert records and all(isinstance(r, tuple) for r in records)
            outcomes["ok"] += 1
    assert outcomes["ok"] > 10 and outcomes["error"] > 1000


YAML_VALUES = [
    "1",
    "-3",
    "0.5",
    "true",
    "null",
    "[1, 2]",
    "{a: 1}",
    "abc",
    "'5'",
    "1e-3",
    "2020-01-01",
    ".inf",
    "~",
    "!!binary aGk=",
    "*x",
    "&x 1",
    "{",
    "[",
    ":",
    "- a",
]


def test_fuzz_config_parser(tmp_path):
    rng = random.Random(1)
    keys = list(m_trainer.OPTIONS) + ["lrr", "batchsize", "1", "", "model model"]
    path = tmp_path / "fuzz.yaml"
    accepted = 0
    for _ in range(1500):
        lines = [f"{rng.choice(keys)}: {rng.choice(YAML_VALUES)}" for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.1:
            lines.append(random_line(rng))
        path.write_text("\n".join(lines))
        try:
            values = m_trainer.read_config(str(path))
        except UserError as err:
            assert "fuzz.yaml" in str(err)
        else:
            accepted += 1
            for key, value in values.items():
                kind = m_trainer.OPTIONS[key].type
                assert value is None or isinstance(value, kind)
    assert accepted > 20
    # The parser is PyYAML's safe loader: a tag that would run code is refused, naming the file.
    marker = tmp_path / "ran"
    path.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError, match=r"fuzz.yaml: not valid YAML \(could not determine a constructor"):
        m_trainer.read_config(str(path))
    assert not marker.exists()
