"""m_viewer: scores.txt parsing, the curve / DET / histogram figures, the distance study."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import m_viewer
from m_utils import UserError

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

NEW_FORMAT = """\
Epoch 1, TLOSS 0.900000, LR 0.001000
Epoch 2, TLOSS 0.700000, LR 0.001000

Epoch 3, TLOSS 0.600000, LR 0.000950
--Val-- Epoch 3, VLoss 0.650000, VEER 12.3456, VEER_LIBRI nan, Vacc 0.0000, VMINDCF 0.4321, VMINDCF_LIBRI nan
Epoch 4, TLOSS 0.500000, LR 0.000950
Epoch 5, TLOSS 0.450000, LR 0.000950
--Val-- Epoch 5, VLoss nan, VEER 10.5000, VEER_LIBRI nan, Vacc nan, VMINDCF 0.4000, VMINDCF_LIBRI nan
"""

OLD_FORMAT = """\
Epoch 1, TLOSS 1.250000, LR 0.001000
Epoch 2, TLOSS 1.000000, LR 0.001000
--Val-- Epoch 2, VLoss 1.100000, VEER 20.0000, VEER_LIBRI 25.5000, Vacc 0.1000
"""


def write_scores(run: Path, text: str) -> Path:
    path = run / "result" / "scores.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def long_scores(epochs: int = 40, interval: int = 5, offset: float = 0.0) -> str:
    """A plausible training log: falling losses, EER falling on both lists."""
    lines = []
    for e in range(1, epochs + 1):
        lr = 0.001 * 0.95 ** (e // interval)
        lines.append(f"Epoch {e}, TLOSS {1 / (1 + 0.2 * e) + offset:f}, LR {lr:f}")
        if e % interval == 0:
            lines.append(
                f"--Val-- Epoch {e}, VLoss {1.1 / (1 + 0.2 * e) + offset:f}, "
                f"VEER {8 + 10 / (1 + 0.3 * e) + offset:2.4f}, "
                f"VEER_LIBRI {12 + 12 / (1 + 0.2 * e) + offset:2.4f}, Vacc 0.0000, "
                f"VMINDCF 0.5000, VMINDCF_LIBRI 0.6000"
            )
    return "\n".join(lines) + "\n"


def assert_png(path: Path, min_kb: int = 15) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_kb * 1024, f"{path} is only {len(data)} bytes"


# ----------------------------------------------------------------------------------------------
# scores.txt


def test_parse_new_format_with_nan(tmp_path):
    scores = m_viewer.parse_scores(write_scores(tmp_path / "runA", NEW_FORMAT))
    assert scores.name == "runA"
    np.testing.assert_array_equal(scores.epoch, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(scores.tloss, [0.9, 0.7, 0.6, 0.5, 0.45])
    np.testing.assert_allclose(scores.lr, [0.001, 0.001, 0.00095, 0.00095, 0.00095])
    np.testing.assert_array_equal(scores.val_epoch, [3, 5])
    np.testing.assert_allclose(scores.veer, [12.3456, 10.5])
    np.testing.assert_allclose(scores.vmindcf, [0.4321, 0.4])
    assert np.isnan(scores.veer_libri).all() and np.isnan(scores.vmindcf_libri).all()
    assert scores.vloss[0] == pytest.approx(0.65) and np.isnan(scores.vloss[1])
    assert scores.vacc[0] == 0.0 and np.isnan(scores.vacc[1])


def test_parse_old_format_has_no_mindcf(tmp_path):
    scores = m_viewer.parse_scores(write_scores(tmp_path / "runB", OLD_FORMAT))
    np.testing.assert_array_equal(scores.epoch, [1, 2])
    np.testing.assert_allclose(scores.tloss, [1.25, 1.0])
    np.testing.assert_array_equal(scores.val_epoch, [2])
    np.testing.assert_allclose(
        [scores.vloss[0], scores.veer[0], scores.veer_libri[0], scores.vacc[0]], [1.1, 20.0, 25.5, 0.1]
    )
    assert np.isnan(scores.vmindcf).all() and np.isnan(scores.vmindcf_libri).all()


@pytest.mark.parametrize(
    "bad_line, hint",
    [
        ("Epoch 3, TLOSS 0.1", "Epoch N, TLOSS x, LR x"),
        ("Epoch three, TLOSS 0.1, LR 0.001", "Epoch must be an integer"),
        ("--Val-- Epoch 3, VLoss 0.1, VEER abc, VEER_LIBRI 1, Vacc 0", "VEER must be a number"),
        ("--Val-- Epoch 3, VLoss 0.1, VEER 1, VEER_LIBRI 1, Vacc 0, VMINDCF 0.4", "VMINDCF_LIBRI x"),
        ("some text", "Epoch N"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, hint):
    text = NEW_FORMAT.replace("Epoch 4, TLOSS 0.500000, LR 0.000950", bad_line)
    path = write_scores(tmp_path / "run", text)
    with pytest.raises(UserError) as caught:
        m_viewer.parse_scores(path)
    message = str(caught.value)
    assert f"{path}:6:" in message
    assert hint in message


def test_missing_and_empty_scores_file(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "nope.txt"))):
        m_viewer.parse_scores(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="no epoch lines"):
        m_viewer.parse_scores(write_scores(tmp_path / "empty", "\n\n"))


def test_script_exits_2_with_error_on_malformed_line(tmp_path):
    run = tmp_path / "run"
    write_scores(run, "Epoch 1, TLOSS 0.5, LR 0.001\nEpoch 2, TLOSS oops, LR 0.001\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "m_viewer.py"), "--save_path", str(run)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert "scores.txt:2:" in done.stderr and "TLOSS must be a number" in done.stderr


def test_missing_scores_file_is_an_error_naming_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match=re.escape(str(run / "result" / "scores.txt"))):
        m_viewer.make_figures(["--save_path", str(run)])


# ----------------------------------------------------------------------------------------------
# Curve figures


def test_curve_figures_of_one_run(tmp_path, capsys):
    run = tmp_path / "MyRun"
    write_scores(run, long_scores() + "--Val-- Epoch 41, VLoss nan, VEER 9.0, VEER_LIBRI nan, Vacc 0\n")
    written = m_viewer.make_figures(["--save_path", str(run)])
    assert run / "result" / "fig.png" in written and run / "result" / "fig2.png" in written
    for name in ("fig.png", "fig2.png"):
        assert_png(run / "result" / name)
    out = capsys.readouterr().out
    assert f"wrote {run / 'result' / 'fig.png'}" in out
    assert "skipped MyRun det.png" in out and "skipped dist_hist.png: no --dist_list" in out


def test_nan_only_curve_is_left_out(tmp_path):
    scores = m_viewer.parse_scores(write_scores(tmp_path / "run", NEW_FORMAT))
    fig, notes = m_viewer.curve_figure([scores], m_viewer.CURVES, "t")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert notes == ["run: no finite EER, LibriSpeech list values, not drawn"]
    assert labels == ["train loss", "validation loss", "EER, test list (best 10.50 % at epoch 5)"]
    loss_ax, eer_ax = fig.axes
    np.testing.assert_array_equal(loss_ax.lines[1].get_xdata(), [3])  # VLoss nan at epoch 5 skipped
    np.testing.assert_allclose(eer_ax.lines[0].get_ydata(), [12.3456, 10.5])


def test_comparison_of_several_runs(tmp_path):
    runs = [tmp_path / "exp_emb" / name for name in ("alpha", "beta", "gamma")]
    for i, run in enumerate(runs):
        write_scores(run, long_scores(offset=0.1 * i))
    out_dir = tmp_path / "figures"
    written = m_viewer.make_figures(["--save_path", *map(str, runs), "--out_dir", str(out_dir)])
    assert written == [out_dir / "compare_fig.png", out_dir / "compare_fig2.png"]
    for path in written:
        assert_png(path)
    assert not (runs[0] / "result" / "fig.png").exists()
    parsed = [m_viewer.parse_scores(run / "result" / "scores.txt", run.name) for run in runs]
    fig, _ = m_viewer.curve_figure(parsed, m_viewer.CURVES, "t")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 12 and all(label.split(":")[0] in ("alpha", "beta", "gamma") for label in labels)


def test_comparison_defaults_to_first_run_result(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        write_scores(run, long_scores())
    m_viewer.make_figures(["--save_path", *map(str, runs)])
    assert_png(runs[0] / "result" / "compare_fig.png")
    assert_png(runs[0] / "result" / "compare_fig2.png", min_kb=10)


# ----------------------------------------------------------------------------------------------
# DET curves


def write_trials(
    path: Path, embedding_type: str = "C", n: int = 2000, seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Labels, overlapping original scores and separable processed scores, saved as the trainer does."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int8)
    original = rng.normal(labels * 1.5, 1.0).astype(np.float32)  # overlapping classes
    processed = (labels * 10.0 + rng.uniform(0, 1, n)).astype(np.float32)  # separable
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path, labels=labels, original=original, processed=processed, embedding_type=np.array(embedding_type)
    )
    return labels, original, processed


def test_det_figure_from_saved_trial_scores(tmp_path, capsys):
    run = tmp_path / "detrun"
    write_trials(run / "result" / "trials_test.npz")
    write_trials(run / "result" / "trials_libri.npz", seed=1)
    written = m_viewer.make_figures(["--save_path", str(run)])
    assert written == [run / "result" / "det.png"]
    assert_png(run / "result" / "det.png", min_kb=30)
    assert "skipped fig.png and fig2.png" in capsys.readouterr().out


def test_det_titles_say_what_each_back_ends_scores_are():
    assert m_viewer.score_meanings(["none", "asnorm", "plda", "qmf"], "C") == [
        "none: -(cosine distance)",
        "asnorm: AS-Norm of -(cosine distance)",
        "plda: PLDA log-likelihood ratio (after LDA and length norm)",
        "qmf: QMF log-odds (base back-end's score and durations)",
    ]
    assert m_viewer.score_meanings(["none", "mean"], "B") == [
        "none: -(L2 distance)",
        "mean: -(cosine distance) after subtracting the training mean",
    ]


def test_results_table_of_original_and_enhanced(tmp_path, capsys):
    run = tmp_path / "tablerun"
    labels, original, _ = write_trials(run / "result" / "trials_test.npz")
    m_viewer.main(["--save_path", str(run)])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tablerun"))
    eer = m_viewer.compute_eer(original.astype(np.float64), labels)[0]
    assert row.split()[2:5] == ["list", f"{eer:.2f}", "0.00"] and row.endswith("EER better, minDCF better")
    assert "libri" not in out.split("Original vs enhanced")[1]


def test_det_legend_and_eer_point(tmp_path):
    labels_in, original, _ = write_trials(tmp_path / "t.npz")
    trials = m_viewer.load_trial_scores(tmp_path / "t.npz")
    assert trials.embedding_type == "C"
    fig = m_viewer.Figure()
    ax = fig.add_subplot()
    m_viewer.setup_det_axes(ax)
    m_viewer.draw_det(ax, trials.enhanced, trials.labels, "enhanced", "C3")
    m_viewer.draw_det(ax, trials.original, trials.labels, "original", "C0")
    labels = [t.get_text() for t in ax.legend().get_texts()]
    assert labels[1] == "enhanced: EER 0.00 %, minDCF 0.000 (curve below the plotted range)"
    eer = m_viewer.compute_eer(original, labels_in)[0]
    assert 15 < eer < 35 and labels[2].startswith(f"original: EER {eer:.2f} %")
    eer_point = ax.lines[-1]
    np.testing.assert_allclose(eer_point.get_xdata(), m_viewer.probit([eer]))
    assert [t.get_text() for t in ax.get_xticklabels()][:4] == ["0.1", "0.2", "0.5", "1"]


def test_probit_axis():
    np.testing.assert_allclose(
        m_viewer.probit([50, 15.865525393145708, 97.72498680518208]), [0, -1, 2], atol=1e-9
    )
    assert np.isfinite(m_viewer.probit([0, 100])).all()


def test_bad_trial_file(tmp_path):
    np.savez(
        tmp_path / "t.npz",
        labels=np.ones(3, np.int8),
        original=np.zeros(3),
        processed=np.zeros(3),
        metric=np.array("C"),
    )
    with pytest.raises(UserError, match="non-target"):
        m_viewer.load_trial_scores(tmp_path / "t.npz")
    np.savez(tmp_path / "u.npz", labels=np.ones(3, np.int8))
    with pytest.raises(UserError, match="lack the array\\(s\\) original, processed, embedding_type"):
        m_viewer.load_trial_scores(tmp_path / "u.npz")


# ----------------------------------------------------------------------------------------------
# Distance histograms

D = 8
SPEAKERS = ("id001", "id002", "id003")
CATEGORIES = ("catA", "catB")


@pytest.fixture
def embedding_tree(tmp_path):
    """Original (3, D) files, a distribution list and an enhanced tree of (1, D) files."""
    rng = np.random.default_rng(5)
    embed, run = tmp_path / "emb", tmp_path / "exp_emb" / "distrun"
    lines = []
    for s, spk in enumerate(SPEAKERS):
        centre = rng.normal(size=D)
        files = {}
        for cat in CATEGORIES:
            shift = rng.normal(size=D)
            files[cat] = [f"{spk}/{cat}/{n:05d}.wav" for n in range(4 + s)]
            for rel in files[cat]:
                array = centre + shift + 0.3 * rng.normal(size=(3, D))
                path = (embed / rel).with_suffix(".npy")
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, array.astype(np.float32))
                enhanced = (run / "enhanced" / rel).with_suffix(".npy")
                enhanced.parent.mkdir(parents=True, exist_ok=True)
                np.save(enhanced, (centre + 0.2 * shift + 0.1 * rng.normal(size=(1, D))).astype(np.float32))
            pairs = zip(files[cat][0::2], files[cat][1::2], strict=False)
            lines += [f"{spk} {a} {b} 1" for a, b in pairs]
        lines += [f"{spk} {a} {b} 0" for a, b in zip(files["catA"], files["catB"], strict=True)]
    dist_list = tmp_path / "demo_distribution_list.txt"
    dist_list.write_text("\n".join(lines) + "\n")
    return {"embed": embed, "run": run, "list": dist_list, "lines": lines}


def unit_mean(path: Path) -> np.ndarray:
    mean = np.load(path).astype(np.float64).mean(axis=0)
    return mean / np.linalg.norm(mean)


def direct_distance(root: Path, a: str, b: str) -> float:
    return 1 - float(unit_mean((root / a).with_suffix(".npy")) @ unit_mean((root / b).with_suffix(".npy")))


def pair_groups(t: dict, seed: int = m_viewer.SEED) -> dict:
    """The viewer's pair groups of the tree `t`, with distances before and after enhancement."""
    return m_viewer.enhanced_groups(m_viewer.pair_study(t["list"], t["embed"], seed), t["run"] / "enhanced")


def test_pair_distances_match_numpy(embedding_tree):
    t = embedding_tree
    groups = pair_groups(t, seed=3)
    records = [line.split() for line in t["lines"]]
    assert groups["same"].pairs == [(r[1], r[2]) for r in records if r[3] == "1"]
    assert groups["category"].pairs == [(r[1], r[2]) for r in records if r[3] == "0"]
    path1 = sorted({r[1] for r in records})
    speaker_pairs = groups["speaker"].pairs
    assert sorted(a for a, _ in speaker_pairs) == path1
    assert all(a.split("/")[0] != b.split("/")[0] and b in path1 for a, b in speaker_pairs)
    for group in groups.values():
        before = [direct_distance(t["embed"], a, b) for a, b in group.pairs]
        after = [direct_distance(t["run"] / "enhanced", a, b) for a, b in group.pairs]
        np.testing.assert_allclose(group.before, before, atol=1e-6)
        np.testing.assert_allclose(group.after, after, atol=1e-6)
    assert groups["same"].before.mean() < groups["category"].before.mean() < groups["speaker"].before.mean()
    again = pair_groups(t, seed=3)
    assert again["speaker"].pairs == speaker_pairs
    other = pair_groups(t, seed=4)
    assert other["speaker"].pairs != speaker_pairs


def test_histogram_script_prints_the_means(embedding_tree, capsys):
    t = embedding_tree
    written = m_viewer.make_figures(
        [
            "--save_path",
            str(t["run"]),
            "--dist_list",
            str(t["list"]),
            "--embed_dir",
            str(t["embed"]),
            "--seed",
            "3",
        ]
    )
    result = t["run"] / "result"
    assert written == [result / "dist_hist.png", result / "dist_hist.txt"]
    assert_png(result / "dist_hist.png", min_kb=30)
    out = capsys.readouterr().out
    groups = pair_groups(t, seed=3)
    for group in groups.values():
        before = np.mean([direct_distance(t["embed"], a, b) for a, b in group.pairs])
        after = np.mean([direct_distance(t["run"] / "enhanced", a, b) for a, b in group.pairs])
        row = re.search(rf"^{re.escape(group.label)}\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)
        assert row, f"no table row for {group.label} in:\n{out}"
        assert int(row[1]) == len(group.pairs)
        assert float(row[2]) == pytest.approx(before, abs=5e-5)
        assert float(row[3]) == pytest.approx(after, abs=5e-5)
        assert float(row[4]) == pytest.approx(after - before, abs=1e-4)
    assert "gap: different - same category" in out
    assert (result / "dist_hist.txt").read_text().count("different speakers") == 1


def test_histograms_skipped_without_enhanced_tree(embedding_tree, capsys, tmp_path):
    t = embedding_tree
    run = tmp_path / "bare"
    write_scores(run, long_scores())
    m_viewer.make_figures(
        ["--save_path", str(run), "--dist_list", str(t["list"]), "--embed_dir", str(t["embed"])]
    )
    assert "skipped bare dist_hist.png" in capsys.readouterr().out
    assert not (run / "result" / "dist_hist.png").exists()


def test_incomplete_enhanced_tree_is_a_clear_error(embedding_tree):
    t = embedding_tree
    (t["run"] / "enhanced" / "id002" / "catB" / "00001.npy").unlink()
    with pytest.raises(UserError, match="m_trainer.py --generate"):
        pair_groups(t)


def test_dist_list_needs_embed_dir(embedding_tree):
    with pytest.raises(UserError, match="--embed_dir"):
        m_viewer.make_figures(
            ["--save_path", str(embedding_tree["run"]), "--dist_list", str(embedding_tree["list"])]
        )


# ----------------------------------------------------------------------------------------------
# Results never lost: --eval keeps what --check saved; two results at one duration


def test_eval_after_check_keeps_the_original_scores(data, tmp_path, capsys):
    """--check then --eval (the README's order): trials_test.npz holds the original system's scores
    of --check and the enhanced ones of --eval, and the viewer's table shows both."""
    from conftest import config, train

    import m_trainer

    cfg = config(data, tmp_path, trainfunc="MSE", max_epoch=1, backends=["none"], bootstrap=10)
    save = tmp_path / "exp"
    train(cfg, save)
    m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--check"])
    checked = m_viewer.load_trial_scores(save / "result" / "trials_test.npz")
    m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--eval"])
    saved = m_viewer.load_trial_scores(save / "result" / "trials_test.npz")
    assert set(saved.scores) == {("original", "none"), ("enhanced", "none")}
    np.testing.assert_array_equal(saved.original, checked.original)
    evaluated = np.loadtxt(save / "result" / "eval_scores_test.txt", usecols=0)
    np.testing.assert_allclose(saved.enhanced, evaluated, atol=1e-6)
    capsys.readouterr()
    m_viewer.main(["--save_path", str(save)])
    row = next(
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("exp ") and "test list" in line
    )
    eer = m_viewer.compute_eer(checked.original, checked.labels)[0]
    assert f"{eer:.2f}" in row.split() and row.endswith("better")


def write_check(path: Path, seconds: dict[str, float | None], eer: float) -> None:
    """A check*.json with the test and libri lists' none-back-end EERs, their durations
    (a manifest's max_seconds, or none: full length) in its sources record."""
    sources = {
        trials: {"manifest": {"max_seconds": value} if value else None} for trials, value in seconds.items()
    }
    records = [{"trials": None, "sources": sources}]
    records += [
        {
            "trials": trials,
            "system": system,
            "backend": "none",
            "eer": eer + k,
            "eer_ci95": [eer + k - 1, eer + k + 1],
        }
        for trials in seconds
        for k, system in enumerate(("original", "enhanced"))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def test_two_results_at_one_duration_keep_the_more_recent_and_draw_the_rest(tmp_path, capsys):
    """--check, then --check --result_tag 2s on a 2 s test set that scored the full-length libri
    list again: the viewer draws every figure, the libri list from the more recent file, and says
    which it left out."""
    run = tmp_path / "run"
    write_scores(run, long_scores())
    write_check(run / "result" / "check.json", {"test": None, "libri": None}, eer=10.0)
    write_check(run / "result" / "check_2s.json", {"test": 2.0, "libri": None}, eer=20.0)
    os.utime(run / "result" / "check.json", ns=(1_000_000_000, 1_000_000_000))
    written = m_viewer.make_figures(["--save_path", str(run)])
    assert run / "result" / "eer_duration.png" in written and run / "result" / "fig.png" in written
    out = capsys.readouterr().out
    assert (
        f"warning: {run / 'result' / 'check.json'} and {run / 'result' / 'check_2s.json'} both hold "
        f"libri results at test duration full: drawn from {run / 'result' / 'check_2s.json'} (written "
        f"last), not from {run / 'result' / 'check.json'}"
    ) in out
    table = (run / "result" / "eer_duration.txt").read_text()
    assert "test" in table and "libri" not in table.split("\n\n", 1)[1]  # one duration: not a series
