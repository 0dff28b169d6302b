"""DDP on CPU (Gloo): two processes must train exactly as one process on the same global batch."""

import socket
from pathlib import Path

import pytest
import torch
from conftest import ROOT, config, make_experiment_data, run_script

from m_network import checkpoints, parse_score_line


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_experiment_data(tmp_path_factory.mktemp("ddp"), 10, 6, 4)


def weights(save: Path) -> dict[str, torch.Tensor]:
    found = checkpoints(save / "model")
    assert len(found) == 1
    return torch.load(found[max(found)], weights_only=True)["network"]


def assert_same_run(single: Path, group: Path) -> None:
    one, two = weights(single), weights(group)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
    lines_one = (single / "result" / "scores.txt").read_text().splitlines()
    lines_two = (group / "result" / "scores.txt").read_text().splitlines()
    assert len(lines_two) == len(lines_one) == 2
    veer = [parse_score_line(line)[1]["VEER"] for line in (lines_one[1], lines_two[1])]
    assert veer[0] == veer[1]


@pytest.mark.parametrize("trainfunc, kind", [("MSE_CS", "normal"), ("MyTriplet_CS", "triplet")])
def test_two_gloo_processes_equal_one_process(data, tmp_path, trainfunc, kind):
    lists = data / "lists"
    cfg = config(
        data,
        tmp_path,
        trainfunc=trainfunc,
        max_epoch=1,
        test_interval=1,
        model="MyLinearNetv2",
        train_list=str(lists / f"train_{kind}_list.txt"),
        valid_list=str(lists / f"train_{kind}_list.txt"),
    )
    run_script(
        "m_trainer.py", "--config", str(cfg), "--save_path", str(tmp_path / "one"), "--batch_size", "16"
    )
    result = run_script(
        "m_trainer.py",
        "--config",
        str(cfg),
        "--save_path",
        str(tmp_path / "two"),
        "--batch_size",
        "8",
        "--distributed",
        "--nprocs",
        "2",
        "--port",
        str(free_port()),
    )
    assert "2 CPU process(es), backend gloo" in result.stdout + result.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_torchrun_launch_and_distributed_check(data, tmp_path):
    cfg = config(data, tmp_path, trainfunc="MSE", max_epoch=1, test_interval=1)
    run_script(
        "m_trainer.py", "--config", str(cfg), "--save_path", str(tmp_path / "one"), "--batch_size", "16"
    )
    torchrun = run_script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "m_trainer.py"),
        "--config",
        str(cfg),
        "--save_path",
        str(tmp_path / "two"),
        "--batch_size",
        "8",
    )
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert (torchrun.stdout + torchrun.stderr).count(f"save_path {tmp_path / 'two'}") == 1  # not per rank
    single = run_script("m_trainer.py", "--config", str(cfg), "--save_path", str(tmp_path / "two"), "--check")
    group = run_script(
        "m_trainer.py",
        "--config",
        str(cfg),
        "--save_path",
        str(tmp_path / "two"),
        "--check",
        "--distributed",
        "--nprocs",
        "2",
        "--port",
        str(free_port()),
    )
    lines = [line for line in group.stdout.splitlines() if "EER]" in line]
    assert len(lines) == 2  # printed by rank 0 only, test and libri
    assert lines == [line for line in single.stdout.splitlines() if "EER]" in line]


def test_error_in_a_worker_is_reported_cleanly(data, tmp_path):
    cfg = config(data, tmp_path, trainfunc="Softmax", nClasses=3, max_epoch=1)
    result = run_script(
        "m_trainer.py",
        "--config",
        str(cfg),
        "--save_path",
        str(tmp_path / "x"),
        "--distributed",
        "--nprocs",
        "2",
        "--port",
        str(free_port()),
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "nClasses 3 is smaller than the 10 training speakers" in result.stderr
    assert "Traceback" not in result.stderr
