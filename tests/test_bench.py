"""The benchmark: it runs every stage at a toy size and writes what it measured; its goals are
judged met or not from known records; its data makers write what the stages are said to read."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import bench
import bench_data
import bench_stages
import numpy as np
import pytest
import torch
from bench_goals import MemoryBudget
from bench_measure import CHECK_KEY, COMPUTE_KEY, GPU_KEY, PEAK_KEY, SHARE_KEY
from conftest import run_script

from m_utils import bf16_is_native
from stores.open import open_store

TOY = [
    "--utterances",
    "240",
    "--speakers",
    "12",
    "--sessions",
    "3",
    "--crops",
    "3",
    "--dim",
    "32",
    "--trials",
    "3000",
    "--baseline_trials",
    "500",
    "--baseline_batches",
    "3",
    "--workers",
    "2",
    "--audio_utterances",
    "2",
    "--audio_seconds",
    "1.5",
    "--eval_frames",
    "60",
    "--num_eval",
    "2",
    "--extract_batch",
    "2",
    "--baseline_utterances",
    "1",
    "--min_seconds",
    "0.05",
    "--audio_files",
    "2",
    "--vox1e_trials",
    "2000",
    "--vox1e_utterances",
    "400",
    "--cohort_speakers",
    "30",
    "--vox2_utterances",
    "600",
    "--vox2_speakers",
    "12",
    "--vox2_videos",
    "60",
    "--vox2_crops",
    "2",
    "--vox2_dim",
    "16",
    "--file_part",
    "200",
    "--blink_rows",
    "5000",
    "--blink_speakers",
    "50",
    "--blink_small_rows",
    "1000",
    "--steps",
    "20",
    "--step_batch",
    "50",
    "--vox1h_utterances",
    "400",
    "--vox1h_speakers",
    "20",
    "--vox1h_trial_speakers",
    "18",
    "--vox1h_trials",
    "2000",
    "--check_resamples",
    "20",
    "--check_model_steps",
    "5",
]
NAMES = [
    "load",
    "data_path",
    "train_mse",
    "train_da_mse",
    "score",
    "score_vox1e",
    "backend_asnorm",
    "extract_ge2e",
    "extract_resnetse34v2",
    "extract_ge2e_bf16",
    "extract_resnetse34v2_bf16",
    "decode_wav",
    "decode_m4a",
    "extract_resnetse34v2_m4a",
    "pack_vox2",
    "store_open",
    "train_vox2_steps",
    "train_vox2_epoch",
    "check_vox1h",
]
KEYS = {"name", "project_per_s", "baseline_per_s", "ratio", "peak_rss_mb"}
EXTRA_KEYS = {
    "train_mse": {COMPUTE_KEY},
    "train_da_mse": {COMPUTE_KEY},
    "train_vox2_epoch": {COMPUTE_KEY},
    "check_vox1h": {CHECK_KEY, SHARE_KEY},
}
NO_BASELINE = {
    "load",
    "backend_asnorm",
    "decode_wav",
    "decode_m4a",
    "pack_vox2",
    "train_vox2_epoch",
    "check_vox1h",
}
BUDGET = MemoryBudget(
    matrix_mb=100.0, parameters_mb=10.0, vox1e_mb=300.0, cohort_mb=12.0, vox2_matrix_mb=1066.4
)
GOAL_LINE = re.compile(r"^  (met    |NOT met)  (\S+) ")


def test_bench_writes_every_record(tmp_path: Path):
    result = run_script("tests/bench.py", "--out", str(tmp_path), *TOY, timeout=600)
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "bench.json"
    records = json.loads(path.read_text())
    skipped = [] if bf16_is_native("cpu") else ["extract_ge2e_bf16", "extract_resnetse34v2_bf16"]
    assert [r["name"] for r in records] == [name for name in NAMES if name not in skipped]
    for name in skipped:
        assert f"{name}: skipped: this CPU has no bfloat16 instructions" in result.stdout
    for record in records:
        if record["name"] in ("extract_resnetse34v2", "extract_resnetse34v2_bf16"):
            assert record.pop(PEAK_KEY) is None  # no peak known for a CPU
        assert set(record) == KEYS | EXTRA_KEYS.get(record["name"], set()), record["name"]
        assert record["project_per_s"] > 0 and record["peak_rss_mb"] is not None
        if record["name"] in NO_BASELINE:
            assert record["baseline_per_s"] is None and record["ratio"] is None
        else:
            assert record["baseline_per_s"] > 0 and record["ratio"] > 0
    by_name = {r["name"]: r for r in records}
    assert by_name["train_vox2_epoch"][COMPUTE_KEY] > 0
    assert by_name["check_vox1h"][CHECK_KEY] > 0 and by_name["check_vox1h"][SHARE_KEY] < 1
    goals = result.stdout.split("\ngoals:\n")[1].splitlines()[:-1]  # the JSON path last
    judged = [GOAL_LINE.match(line).group(2) for line in goals]
    assert set(judged) == {
        "load",
        "data_path",
        "train_mse",
        "train_da_mse",
        "score",
        "score_vox1e",
        "backend_asnorm",
        "extract_ge2e",
        "extract_resnetse34v2",
        "extract_resnetse34v2_m4a",
        "store_open",
        "train_vox2_steps",
        "train_vox2_epoch",
        "check_vox1h",
    }
    assert judged.count("check_vox1h") == 2  # seconds after the stores are open; the bootstrap's share
    judged_memory = {line.split()[-8] for line in goals if " peak " in line}  # NAME peak RSS x MB <= y MB
    assert judged_memory == {
        "load",
        "data_path",
        "train_mse",
        "train_da_mse",
        "score",
        "score_vox1e",
        "backend_asnorm",
        "store_open",
        "train_vox2_steps",
    }
    vox2 = next((tmp_path / "data").glob("vox2_*"))
    assert len(list(vox2.glob("embeddings/*/*/*.npy"))) == 600  # the VoxCeleb2-shaped tree
    assert len(list(vox2.glob("embeddings/*.npy"))) == 2 * 12  # B and C files (pack_vox2)
    assert (vox2 / "embeddings" / "embeddings.store" / "header.json").is_file()
    assert len((vox2 / "part_normal_list.txt").read_text().splitlines()) >= 200
    store = open_store(next((tmp_path / "data").glob("blink_*")) / "big.store")
    assert store.matrix.shape == (5000, 16) and store.matrix.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(store.matrix[:100].astype(np.float32), axis=1), 1, atol=2e-3)
    # check_vox1h ran m_trainer.py --check twice, with 20 resamples and with 1, each to its end
    for resamples in (1, 20):
        check = json.loads((tmp_path / "check_vox1h" / "result" / f"check_r{resamples}.json").read_text())
        assert check, resamples
        log = (tmp_path / "check_vox1h" / f"check_r{resamples}.log").read_text()
        assert f"over {resamples} resamples" in log


def test_bench_reuses_its_tree(tmp_path: Path):
    args = ["tests/bench.py", "--out", str(tmp_path), *TOY, "--stages", "load"]
    run_script(*args, timeout=300)
    files = sorted((tmp_path / "data").rglob("*.npy"))
    written = [path.stat().st_mtime_ns for path in files]
    run_script(*args, timeout=300)
    assert len(files) == 240 + 12 * 2  # the utterances and each speaker's B and C files
    assert sorted((tmp_path / "data").rglob("*.npy")) == files
    assert [path.stat().st_mtime_ns for path in files] == written  # not one rewritten
    assert [r["name"] for r in json.loads((tmp_path / "bench.json").read_text())] == ["load"]


def test_an_unknown_stage_is_an_error_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as raised:
        bench.parse_args(["--stages", "load", "check_vox1", "nope"])
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1].split(": ", 1)[1]  # after the program's name
    assert error.startswith("error: unknown stage(s) check_vox1, nope; known: load, data_path, ")
    assert error.endswith(", train_vox2_steps, train_vox2_epoch, check_vox1h")


def test_vox1h_data_pairs_the_trial_speakers_utterances(tmp_path: Path):
    """The H-sized list names utterances of the store by their keys (`.wav` added), the first
    `trial_speakers` speakers' only; a trial is a target one exactly when both sides are of one
    speaker; half are; every one of those utterances enrols."""
    args = bench.parse_args(
        [
            "--out",
            str(tmp_path),
            "--vox2_utterances",
            "300",
            "--vox2_speakers",
            "10",
            "--vox2_dim",
            "8",
            "--vox1h_utterances",
            "200",
            "--vox1h_speakers",
            "10",
            "--vox1h_trial_speakers",
            "7",
            "--vox1h_trials",
            "500",
            "--file_part",
            "100",
        ]
    )
    data = bench_data.ensure_vox1h(args)
    test, train = open_store(data.test.store), open_store(data.train.store)
    assert test.matrix.shape == (200, 8) and train.matrix.shape == (300, 8)
    assert train.matrix.dtype == np.float32 and len(train.speakers) == 10
    np.testing.assert_allclose(np.linalg.norm(train.matrix, axis=1), 1, atol=1e-5)
    lines = [line.split() for line in data.trial_list.read_text().splitlines()]
    assert len(lines) == 500
    speaker = dict(zip(test.keys, (test.speakers[s] for s in test.speaker_of_rows()), strict=True))
    named = set()
    for label, a, b in lines:
        assert a.endswith(".wav") and b.endswith(".wav")
        a, b = a[:-4], b[:-4]
        assert label == str(int(speaker[a] == speaker[b]))
        named |= {a, b}
    assert {speaker[key] for key in named} == set(test.speakers[:7])
    assert sum(label == "1" for label, _, _ in lines) >= 250  # every other trial is a target one
    enrolled = {a[:-4] for _, a, _ in lines}
    assert enrolled == {key for key in test.keys if speaker[key] in test.speakers[:7]}
    assert len(train.keys) == len(data.train.list_path.read_text().splitlines()) == 300


def test_check_vox1h_times_after_the_opening_and_the_bootstrap_as_a_difference(monkeypatch, tmp_path: Path):
    """Known timings through the stage: the open stores' seconds are taken off the check's, and the
    bootstrap's share is the check with all resamples less the one with 1, over that."""
    seconds = {
        "open_seconds": 10.0,
        "r1": bench_stages.CheckRun(40.0, 70.0, 100.0),
        "r1000": bench_stages.CheckRun(100.0, 190.0, 900.0),
    }

    def fake_child(work: partial) -> object:
        name = work.func.__name__
        if name == "timed_check":
            argv = work.args[0]
            return seconds[f"r{argv[argv.index('--bootstrap') + 1]}"]
        return seconds.get(name, tmp_path / "model.model")

    monkeypatch.setattr(bench_stages, "in_child", fake_child)
    args = bench.parse_args(["--out", str(tmp_path)])
    args.device = torch.device("cpu")
    record = bench_stages.stage_check_vox1h(args, None, None).record
    assert record[CHECK_KEY] == 90.0
    assert record[SHARE_KEY] == pytest.approx(60 / 90, abs=1e-4)
    assert record["project_per_s"] == pytest.approx(552_536 / 90, rel=1e-3)
    assert record["peak_rss_mb"] == 900.0
    assert [line[:9] for line in bench.verdicts([record], BUDGET)] == ["  met    ", "  NOT met"]


def test_check_goals():
    """check_vox1h: at most 90 s after the stores are open, the bootstrap at most 30 % of it."""
    record = {
        "name": "check_vox1h",
        "project_per_s": 6000.0,
        "baseline_per_s": None,
        "ratio": None,
        "peak_rss_mb": 4000.0,
        CHECK_KEY: 85.0,
        SHARE_KEY: 0.25,
    }
    assert bench.verdicts([record], BUDGET) == [
        "  met      check_vox1h --check 85.0 s after the stores are open <= 90 s",
        "  met      check_vox1h bootstrap 25% of it <= 30%",
    ]
    slow = {**record, CHECK_KEY: 250.0, SHARE_KEY: 0.91}
    assert bench.verdicts([slow], BUDGET) == [
        "  NOT met  check_vox1h --check 250.0 s after the stores are open <= 90 s",
        "  NOT met  check_vox1h bootstrap 91% of it <= 30%",
    ]
    at_limit = {**record, CHECK_KEY: 90.0, SHARE_KEY: 0.30}
    assert [line[:9] for line in bench.verdicts([at_limit], BUDGET)] == ["  met    ", "  met    "]
    on_gpu = {**slow, GPU_KEY: 500.0}  # the same goals on a GPU
    assert [line[:9] for line in bench.verdicts([on_gpu], BUDGET)] == ["  NOT met", "  NOT met"]


def test_vox2_epoch_goal_is_1_15_on_either_device():
    record = {
        "name": "train_vox2_epoch",
        "project_per_s": 100.0,
        "baseline_per_s": None,
        "ratio": None,
        "peak_rss_mb": 10.0,
        COMPUTE_KEY: 112.0,
    }
    line = "train_vox2_epoch epoch at 1.120x its arithmetic limit <= 1.15"
    assert bench.verdicts([record], BUDGET) == [f"  met      {line}"]
    assert bench.verdicts([{**record, GPU_KEY: 10.0}], BUDGET) == [f"  met      {line}"]
    slower = {**record, COMPUTE_KEY: 120.0}
    assert bench.verdicts([slower], BUDGET) == [
        "  NOT met  train_vox2_epoch epoch at 1.200x its arithmetic limit <= 1.15"
    ]


def test_vox_goals():
    """store_open: 100x and peak within 1.2x the matrix; train_vox2_steps: a step within 1.15x the
    small store's, peak under 8 GB."""
    store_open = {
        "name": "store_open",
        "project_per_s": 500_000.0,
        "baseline_per_s": 2_000.0,
        "ratio": 250.0,
        "peak_rss_mb": 1200.0,
    }
    assert bench.verdicts([store_open], BUDGET) == [
        "  met      store_open ratio 250.00 >= 100",
        "  met      store_open peak RSS 1200 MB <= 1280 MB",
    ]
    assert bench.verdicts([{**store_open, "ratio": 99.0, "peak_rss_mb": 1300.0}], BUDGET) == [
        "  NOT met  store_open ratio 99.00 >= 100",
        "  NOT met  store_open peak RSS 1300 MB <= 1280 MB",
    ]
    steps = {
        "name": "train_vox2_steps",
        "project_per_s": 10.0,
        "baseline_per_s": 11.0,
        "ratio": 0.91,
        "peak_rss_mb": 7000.0,
    }
    assert bench.verdicts([steps], BUDGET) == [
        "  met      train_vox2_steps step time 1.100x the small store's <= 1.15",
        "  met      train_vox2_steps peak RSS 7000 MB <= 7629 MB",
    ]
    slower = {**steps, "baseline_per_s": 12.0, "peak_rss_mb": 7700.0}
    assert [line[:9] for line in bench.verdicts([slower], BUDGET)] == ["  NOT met", "  NOT met"]


def test_extraction_goal_depends_on_the_device():
    """1.5x on a GPU; on a CPU, where both extractors are bound by arithmetic, not slower."""
    record = {
        "name": "extract_resnetse34v2",
        "project_per_s": 1.1,
        "baseline_per_s": 1.0,
        "ratio": 1.1,
        "peak_rss_mb": 400.0,
    }
    assert bench.verdicts([record], BUDGET) == ["  met      extract_resnetse34v2 ratio 1.10 >= 1"]
    on_gpu = {**record, GPU_KEY: 500.0}
    assert bench.verdicts([on_gpu], BUDGET) == ["  NOT met  extract_resnetse34v2 ratio 1.10 >= 1.5"]
    slower = {**record, "ratio": 0.9}
    assert bench.verdicts([slower], BUDGET)[0].startswith("  NOT met")


def test_bfloat16_goals_hold_on_a_gpu_only():
    """4x for ResNetSE34V2 and 20x for GE2E in bfloat16 on a GPU; no goal on a CPU. m4a: 0.8 of wav."""
    record = {
        "name": "extract_resnetse34v2_bf16",
        "project_per_s": 3.0,
        "baseline_per_s": 1.0,
        "ratio": 3.0,
        "peak_rss_mb": 400.0,
    }
    assert bench.verdicts([record], BUDGET) == []
    assert bench.verdicts([{**record, GPU_KEY: 500.0}], BUDGET) == [
        "  NOT met  extract_resnetse34v2_bf16 ratio 3.00 >= 4"
    ]
    ge2e = {**record, "name": "extract_ge2e_bf16", "ratio": 21.0, GPU_KEY: 500.0}
    assert bench.verdicts([ge2e], BUDGET) == ["  met      extract_ge2e_bf16 ratio 21.00 >= 20"]
    m4a = {**record, "name": "extract_resnetse34v2_m4a", "ratio": 0.79}
    assert bench.verdicts([m4a], BUDGET) == ["  NOT met  extract_resnetse34v2_m4a ratio 0.79 >= 0.8"]


def test_bfloat16_peak_by_card_name(monkeypatch):
    cuda = torch.device("cuda")
    assert bench_stages.bf16_peak_flops(torch.device("cpu")) is None
    for name, tflops in (
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench_stages.bf16_peak_flops(cuda) == (None if tflops is None else tflops * 1e12), name


def test_training_epoch_goal_is_tighter_on_a_gpu():
    """An epoch within 1.15x its arithmetic limit on a CPU, 1.10x on a GPU."""
    record = {
        "name": "train_mse",
        "project_per_s": 100.0,
        "baseline_per_s": 50.0,
        "ratio": 2.0,
        "peak_rss_mb": 10.0,
        COMPUTE_KEY: 112.0,
    }
    line = "train_mse epoch at 1.120x its arithmetic limit <= "
    assert bench.verdicts([record], BUDGET)[0] == f"  met      {line}1.15"
    on_gpu = {**record, GPU_KEY: 10.0}
    assert bench.verdicts([on_gpu], BUDGET)[0] == f"  NOT met  {line}1.1"
    assert bench.verdicts([{**on_gpu, COMPUTE_KEY: 109.0}], BUDGET)[0].startswith("  met")
