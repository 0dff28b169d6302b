"""The benchmark at a toy size: it runs, and its JSON records keep their agreed names and keys."""

from __future__ import annotations

import json
from pathlib import Path

import bench
from conftest import run_script

TOY = ["--utterances", "240", "--speakers", "12", "--sessions", "3", "--crops", "3", "--dim", "32",
       "--trials", "3000", "--baseline_trials", "500", "--baseline_batches", "3", "--workers", "2",
       "--audio_utterances", "2", "--audio_seconds", "1.5", "--eval_frames", "60", "--num_eval", "2",
       "--extract_batch", "2", "--baseline_utterances", "1", "--min_seconds", "0.05",
       "--vox1e_trials", "2000", "--vox1e_utterances", "400", "--cohort_speakers", "30"]
NAMES = ["load", "data_path", "train_mse", "train_da_mse", "score", "score_vox1e", "backend_asnorm",
         "extract_ge2e", "extract_resnetse34v2"]
NO_BASELINE = ("load", "backend_asnorm")
KEYS = {"name", "project_per_s", "baseline_per_s", "ratio", "peak_rss_mb"}


def test_bench_writes_every_record(tmp_path: Path):
    result = run_script("tests/bench.py", "--out", str(tmp_path), *TOY, timeout=600)
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "bench.json"
    records = json.loads(path.read_text())
    assert [r["name"] for r in records] == NAMES
    for record in records:
        extra = {"compute_only_per_s"} if record["name"].startswith("train_") else set()
        assert set(record) == KEYS | extra, record["name"]
        assert record["project_per_s"] > 0 and record["peak_rss_mb"] is not None
        for key in extra:
            assert record[key] > 0
        if record["name"] in NO_BASELINE:
            assert record["baseline_per_s"] is None and record["ratio"] is None
        else:
            assert record["baseline_per_s"] > 0
            assert abs(record["ratio"] - record["project_per_s"] / record["baseline_per_s"]) \
                <= 0.01 * record["ratio"] + 0.01
    assert "goals:" in result.stdout


def test_bench_reuses_its_tree(tmp_path: Path):
    args = ["tests/bench.py", "--out", str(tmp_path), *TOY, "--stages", "load"]
    first = run_script(*args, timeout=300)
    second = run_script(*args, timeout=300)
    assert "writing a synthetic tree" in first.stdout
    assert "reusing the synthetic tree" in second.stdout
    assert [r["name"] for r in json.loads((tmp_path / "bench.json").read_text())] == ["load"]


def test_extraction_goal_depends_on_the_device():
    """1.5x on a GPU; on a CPU, where both extractors are bound by arithmetic, not slower."""
    budget = bench.MemoryBudget(matrix_mb=100.0, parameters_mb=10.0, vox1e_mb=300.0, cohort_mb=12.0)
    record = {"name": "extract_resnetse34v2", "project_per_s": 1.1, "baseline_per_s": 1.0,
              "ratio": 1.1, "peak_rss_mb": 400.0}
    assert bench.verdicts([record], budget) == ["  met      extract_resnetse34v2 ratio 1.10 >= 1"]
    on_gpu = {**record, bench.GPU_KEY: 500.0}
    assert bench.verdicts([on_gpu], budget) == ["  NOT met  extract_resnetse34v2 ratio 1.10 >= 1.5"]
    slower = {**record, "ratio": 0.9}
    assert bench.verdicts([slower], budget)[0].startswith("  NOT met")
