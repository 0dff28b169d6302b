"""`make demo` end to end, at a tiny size, through the Makefile's own steps."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TINY_CORPUS = (
    "--train_speakers 5 --test_speakers 3 --libri_speakers 3 --sessions 2 "
    "--test_sessions 2 --utterances 2 --min_seconds 1.5 --max_seconds 2 --calib_speakers 2"
)
IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "demo_out",
    "bench_out",
    "exp_emb",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "gpu_check_out",
)


# Two seeds, enrolment models of 1 and 2 utterances (vox_test speakers have 2 sessions of 2), one
# short test set (2 s)
TINY_RUNS = ("DEMO_RUNS=demo_MyResidualNet", "DEMO_SEEDS=1 2", "ENROLL_UTTS=1 2", "SHORT_SECONDS=2")
RUNS = ("demo_MyResidualNet_seed1", "demo_MyResidualNet_seed2")


def make_demo(repo: Path, *variables: str, target: str = "demo") -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "make",
            target,
            "INSTALL=",
            f"PY={sys.executable}",
            f"CORPUS_FLAGS={TINY_CORPUS}",
            "TRAIN_FLAGS=--max_epoch 1",
            *(variables or TINY_RUNS),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_tiny_demo_runs_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORED)
    first = make_demo(repo)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    demo = repo / "demo_out"
    assert len(list((demo / "audio" / "vox_train").rglob("*.wav"))) == 5 * 2 * 2
    assert len(list((demo / "audio" / "libri").rglob("*.flac"))) == 3 * 2 * 2
    embeddings = sorted(
        p
        for p in (demo / "embeddings").rglob("*.npy")
        if not any(part.endswith(".store") for part in p.parts)
    )  # packed stores aside
    assert len(list((demo / "audio" / "vox_calib").rglob("*.wav"))) == 2 * 2 * 2
    # utterances (vox_train, vox_test, libri, vox_calib, vox_test at 2 s) + B and C files
    assert len(embeddings) == (20 + 12 + 12 + 8 + 12) + 2 * (5 + 3 + 3 + 2 + 3)
    for seconds in (2,):
        short = demo / "embeddings" / f"vox_test_{seconds}s"
        assert json.loads((short / "manifest.json").read_text())["max_seconds"] == seconds
        assert all(float(line.split()[1]) <= seconds for line in (short / "utt2dur").read_text().splitlines())
    first_seed = demo / "exp" / RUNS[0] / "result"
    for name in (
        "check_2s.json",
        "trials_test_2s.npz",
        *(f"check_enroll{k}{tag}.json" for k in (1, 2) for tag in ("", "_2s")),
    ):
        assert (first_seed / name).is_file(), name
    assert len(list((demo / "exp" / RUNS[0] / "enhanced").rglob("*.npy"))) == 12
    for run in RUNS:
        result = demo / "exp" / run / "result"
        assert (result / "scores.txt").read_text().startswith("Epoch 1, TLOSS")
        assert (result / "det.png").stat().st_size > 10_000
        # validated on the held-out vox_calib speakers; the model scored chosen without the test set
        model = next(r["model"] for r in json.loads((result / "check.json").read_text()) if "sources" in r)
        assert model["options"]["valid_list"] == "demo_out/lists/vox_calib_normal_list.txt"
        assert model["epoch"] == 1 and "without looking at any trial list" in model["chosen"]
    assert "(epoch 1, the newest checkpoint" in first.stdout + first.stderr
    assert not list((demo / "exp" / RUNS[1] / "result").glob("check_*.json"))  # the full check only
    for png in ("dist_hist.png", "eer_duration.png"):
        assert (first_seed / png).stat().st_size > 10_000
    duration_table = (first_seed / "eer_duration.txt").read_text().split("\n\n", 1)[1]
    assert duration_table in first.stdout
    header = duration_table.splitlines()[0]
    assert "EER % at 2 s" in header and "EER % at full (" in header
    # per back-end (none, mean, asnorm, plda, qmf): original, enhanced and their difference; the
    # enrolment checks are not durations of the test list
    assert duration_table.count(f"{RUNS[0]}  test") == 3 * 5
    assert "[testset original EER]" in first.stdout and "[libriset processed EER]" in first.stdout
    table = first.stdout.split("Original vs enhanced")[1]
    assert table.count("demo_MyResidualNet_seed") == 2 * 2 * 5  # two seeds, two trial lists, five back-ends
    assert "test list, qmf" in table and "LibriSpeech list, qmf" in table
    assert "test list, asnorm" in table and "LibriSpeech list, plda" in table

    plots = demo / "plots"
    for png in ("compare_fig.png", "compare_fig2.png"):  # loss and EER per epoch of both seeds
        assert (plots / png).stat().st_size > 10_000
    seeds = (plots / "seeds.txt").read_text()
    assert seeds in first.stdout and (plots / "seeds.md").is_file()
    assert f"group 1: {RUNS[0]} (seed 1), {RUNS[1]} (seed 2)" in seeds
    assert seeds.count("\n1      test ") == 5 and seeds.count("\n1      libri ") == 5
    enrolment = (plots / "enrolment.txt").read_text()
    assert enrolment in first.stdout and (plots / "enrolment.md").is_file()
    assert (plots / "enrolment.png").stat().st_size > 10_000
    rows = enrolment.split("\n\n", 1)[1].splitlines()
    assert "K = 1" in rows[0] and "K = 2" in rows[0]
    for condition in ("full length", "test 2 s, enrolment full length"):
        # four back-ends (none, asnorm, plda, qmf): original, enhanced, enh. 1 - orig. K, gap closed
        assert sum(row.startswith(condition + " ") for row in rows) == 4 * 4, condition

    utterances = [path for path in embeddings if path.parent.parent != demo / "embeddings"]
    stamps = {path: path.stat().st_mtime_ns for path in utterances}
    # the data steps again: nothing is extracted a second time
    second = make_demo(repo, "ENROLL_UTTS=1 2", target="demo-data")
    assert second.returncode == 0, second.stderr[-4000:]
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    assert "0 to extract" in second.stdout + second.stderr
