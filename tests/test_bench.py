"""The benchmark at a toy size: it runs, and its JSON records keep their agreed names and keys."""

from __future__ import annotations

import json
from pathlib import Path

import bench
import numpy as np
import torch
from conftest import run_script

from m_utils import bf16_is_native
from stores.open import open_store

TOY = ["--utterances", "240", "--speakers", "12", "--sessions", "3", "--crops", "3", "--dim", "32",
       "--trials", "3000", "--baseline_trials", "500", "--baseline_batches", "3", "--workers", "2",
       "--audio_utterances", "2", "--audio_seconds", "1.5", "--eval_frames", "60", "--num_eval", "2",
       "--extract_batch", "2", "--baseline_utterances", "1", "--min_seconds", "0.05", "--audio_files", "2",
       "--vox1e_trials", "2000", "--vox1e_utterances", "400", "--cohort_speakers", "30",
       "--vox2_utterances", "600", "--vox2_speakers", "12", "--vox2_videos", "60", "--vox2_crops", "2",
       "--vox2_dim", "16", "--file_part", "200", "--blink_rows", "5000", "--blink_speakers", "50",
       "--blink_small_rows", "1000", "--steps", "20", "--step_batch", "50"]
NAMES = ["load", "data_path", "train_mse", "train_da_mse", "score", "score_vox1e", "backend_asnorm",
         "extract_ge2e", "extract_resnetse34v2", "extract_ge2e_bf16", "extract_resnetse34v2_bf16",
         "decode_wav", "decode_m4a", "extract_resnetse34v2_m4a", "pack_vox2", "store_open",
         "train_vox2_steps"]
KEYS = {"name", "project_per_s", "baseline_per_s", "ratio", "peak_rss_mb"}
NO_BASELINE = {"load", "backend_asnorm", "decode_wav", "decode_m4a", "pack_vox2"}
BUDGET = bench.MemoryBudget(matrix_mb=100.0, parameters_mb=10.0, vox1e_mb=300.0, cohort_mb=12.0,
                            vox2_matrix_mb=1066.4)


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
        extra = {"compute_only_per_s"} if record["name"] in ("train_mse", "train_da_mse") else set()
        if record["name"] in ("extract_resnetse34v2", "extract_resnetse34v2_bf16"):
            assert record.pop(bench.PEAK_KEY) is None  # no peak known for a CPU
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
    goals = result.stdout.split("\ngoals:\n")[1].splitlines()[:-1]  # the JSON path last
    budget = bench.memory_budget(bench.parse_args(["--out", str(tmp_path), *TOY]))
    expected = bench.verdicts(json.loads(path.read_text()), budget)
    assert goals == expected
    judged_memory = {line.split()[-8] for line in goals if " peak " in line}  # NAME peak RSS x MB <= y MB
    assert judged_memory == {"load", "data_path", "train_mse", "train_da_mse", "score", "score_vox1e",
                             "backend_asnorm", "store_open", "train_vox2_steps"}
    vox2 = next((tmp_path / "data").glob("vox2_*"))
    assert len(list(vox2.glob("embeddings/*/*/*.npy"))) == 600  # the VoxCeleb2-shaped tree
    assert len(list(vox2.glob("embeddings/*.npy"))) == 2 * 12  # B and C files (pack_vox2)
    assert (vox2 / "embeddings" / "embeddings.store" / "header.json").is_file()
    assert len((vox2 / "part_normal_list.txt").read_text().splitlines()) >= 200
    store = open_store(next((tmp_path / "data").glob("blink_*")) / "big.store")
    assert store.matrix.shape == (5000, 16) and store.matrix.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(store.matrix[:100].astype(np.float32), axis=1), 1, atol=2e-3)


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


def test_vox_goals():
    """store_open: 100x and peak within 1.2x the matrix; train_vox2_steps: a step within 1.15x the
    small store's, peak under 8 GB."""
    store_open = {"name": "store_open", "project_per_s": 500_000.0, "baseline_per_s": 2_000.0,
                  "ratio": 250.0, "peak_rss_mb": 1200.0}
    assert bench.verdicts([store_open], BUDGET) == [
        "  met      store_open ratio 250.00 >= 100", "  met      store_open peak RSS 1200 MB <= 1280 MB"]
    assert bench.verdicts([{**store_open, "ratio": 99.0, "peak_rss_mb": 1300.0}], BUDGET) == [
        "  NOT met  store_open ratio 99.00 >= 100", "  NOT met  store_open peak RSS 1300 MB <= 1280 MB"]
    steps = {"name": "train_vox2_steps", "project_per_s": 10.0, "baseline_per_s": 11.0, "ratio": 0.91,
             "peak_rss_mb": 7000.0}
    assert bench.verdicts([steps], BUDGET) == [
        "  met      train_vox2_steps step time 1.100x the small store's <= 1.15",
        "  met      train_vox2_steps peak RSS 7000 MB <= 7629 MB"]
    slower = {**steps, "baseline_per_s": 12.0, "peak_rss_mb": 7700.0}
    assert [line[:9] for line in bench.verdicts([slower], BUDGET)] == ["  NOT met", "  NOT met"]


def test_extraction_goal_depends_on_the_device():
    """1.5x on a GPU; on a CPU, where both extractors are bound by arithmetic, not slower."""
    budget = BUDGET
    record = {"name": "extract_resnetse34v2", "project_per_s": 1.1, "baseline_per_s": 1.0,
              "ratio": 1.1, "peak_rss_mb": 400.0}
    assert bench.verdicts([record], budget) == ["  met      extract_resnetse34v2 ratio 1.10 >= 1"]
    on_gpu = {**record, bench.GPU_KEY: 500.0}
    assert bench.verdicts([on_gpu], budget) == ["  NOT met  extract_resnetse34v2 ratio 1.10 >= 1.5"]
    slower = {**record, "ratio": 0.9}
    assert bench.verdicts([slower], budget)[0].startswith("  NOT met")


def test_bfloat16_goals_hold_on_a_gpu_only():
    """4x for ResNetSE34V2 and 20x for GE2E in bfloat16 on a GPU; no goal on a CPU. m4a: 0.8 of wav."""
    budget = BUDGET
    record = {"name": "extract_resnetse34v2_bf16", "project_per_s": 3.0, "baseline_per_s": 1.0,
              "ratio": 3.0, "peak_rss_mb": 400.0}
    assert bench.verdicts([record], budget) == []
    assert bench.verdicts([{**record, bench.GPU_KEY: 500.0}], budget) == [
        "  NOT met  extract_resnetse34v2_bf16 ratio 3.00 >= 4"]
    ge2e = {**record, "name": "extract_ge2e_bf16", "ratio": 21.0, bench.GPU_KEY: 500.0}
    assert bench.verdicts([ge2e], budget) == ["  met      extract_ge2e_bf16 ratio 21.00 >= 20"]
    m4a = {**record, "name": "extract_resnetse34v2_m4a", "ratio": 0.79}
    assert bench.verdicts([m4a], budget) == ["  NOT met  extract_resnetse34v2_m4a ratio 0.79 >= 0.8"]


def test_bfloat16_peak_by_card_name(monkeypatch):
    cuda = torch.device("cuda")
    assert bench.bf16_peak_flops(torch.device("cpu")) is None
    for name, tflops in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                         ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench.bf16_peak_flops(cuda) == (None if tflops is None else tflops * 1e12), name


def test_training_epoch_goal_is_tighter_on_a_gpu():
    """An epoch within 1.15x its arithmetic limit on a CPU, 1.10x on a GPU."""
    record = {"name": "train_mse", "project_per_s": 100.0, "baseline_per_s": 50.0, "ratio": 2.0,
              "peak_rss_mb": 10.0, bench.COMPUTE_KEY: 112.0}
    line = "train_mse epoch at 1.120x its arithmetic limit <= "
    assert bench.verdicts([record], BUDGET)[0] == f"  met      {line}1.15"
    on_gpu = {**record, bench.GPU_KEY: 10.0}
    assert bench.verdicts([on_gpu], BUDGET)[0] == f"  NOT met  {line}1.1"
    assert bench.verdicts([{**on_gpu, bench.COMPUTE_KEY: 109.0}], BUDGET)[0].startswith("  met")
