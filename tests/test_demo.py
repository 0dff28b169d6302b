"""`make demo` end to end, at a tiny size, through the Makefile's own steps."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TINY_CORPUS = ("--train_speakers 5 --test_speakers 3 --libri_speakers 3 --sessions 2 "
               "--test_sessions 2 --utterances 2 --min_seconds 1.5 --max_seconds 2")
IGNORED = shutil.ignore_patterns(".git", ".venv", "demo_out", "bench_out", "exp_emb", "__pycache__",
                                 ".pytest_cache", ".ruff_cache", "gpu_check_out")


def make_demo(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "demo", "INSTALL=", f"PY={sys.executable}",
                           f"CORPUS_FLAGS={TINY_CORPUS}", "TRAIN_FLAGS=--max_epoch 1",
                           "DEMO_RUNS=demo_MyResidualNet"],
                          cwd=repo, capture_output=True, text=True, timeout=600)


def test_tiny_demo_runs_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORED)
    first = make_demo(repo)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    demo = repo / "demo_out"
    assert len(list((demo / "audio" / "vox_train").rglob("*.wav"))) == 5 * 2 * 2
    assert len(list((demo / "audio" / "libri").rglob("*.flac"))) == 3 * 2 * 2
    embeddings = sorted(p for p in (demo / "embeddings").rglob("*.npy")
                        if not any(part.endswith(".store") for part in p.parts))  # packed stores aside
    assert len(embeddings) == (20 + 12 + 12) + 2 * (5 + 3 + 3)  # utterances + B and C files
    for run in ("demo_MyResidualNet",):
        result = demo / "exp" / run / "result"
        assert (result / "scores.txt").read_text().startswith("Epoch 1, TLOSS")
        for png in ("fig.png", "fig2.png", "det.png", "dist_hist.png"):
            assert (result / png).stat().st_size > 10_000
        assert len(list((demo / "exp" / run / "enhanced").rglob("*.npy"))) == 12
    assert "[testset original EER]" in first.stdout and "[libriset processed EER]" in first.stdout
    table = first.stdout.split("Original vs enhanced")[1]
    assert table.count("demo_MyResidualNet") == 2 * 4  # two trial lists, four back-ends
    assert "test list, asnorm" in table and "LibriSpeech list, plda" in table

    utterances = [path for path in embeddings if path.parent.parent != demo / "embeddings"]
    stamps = {path: path.stat().st_mtime_ns for path in utterances}
    second = make_demo(repo)
    assert second.returncode == 0, second.stderr[-4000:]
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    assert "0 to extract" in second.stdout + second.stderr
