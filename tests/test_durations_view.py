"""EER against test duration: one trained model checked on a full-length test tree and on a
"1 s" one (--result_tag), the viewer's figure and table built from those --check results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import config, make_embedding_tree, run_script, train

import m_trainer
import m_viewer
from m_comb_embs import combine
from m_utils import UserError
from scoring.report import check_result_tag, result_name

BACKENDS = ["none", "asnorm", "qmf"]


def write_utt2dur(tree: Path, seconds: float | None = None, seed: int = 0) -> None:
    """utt2dur of every .npy of a tree: `seconds` each, or drawn in 1-5 s."""
    rng = np.random.default_rng(seed)
    keys = sorted(p.relative_to(tree).with_suffix("").as_posix() for p in tree.rglob("*/*/*.npy"))
    lines = [f"{key} {seconds if seconds is not None else rng.uniform(1, 5):.3f}" for key in keys]
    (tree / "utt2dur").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def checked(data, tmp_path_factory):
    """A run checked on data/test (full length, durations 1-5 s) and on a noisier copy cut to 1 s
    (manifest max_seconds 1): (run folder, stdout of the short check)."""
    tmp = tmp_path_factory.mktemp("durations")
    write_utt2dur(data / "test", seed=1)
    write_utt2dur(data / "train", seed=2)
    short = make_embedding_tree(tmp / "test_1s", speakers=16, seed=1, noise=0.8)
    write_utt2dur(short, seconds=1.0)
    (short / "manifest.json").write_text(json.dumps({"extractor": "test", "max_seconds": 1.0}))
    combine(short)
    lists = data / "lists"
    cfg = config(
        data,
        tmp,
        trainfunc="MSE_CS",
        multiple_embedding_flag="C",
        max_epoch=1,
        backends=BACKENDS,
        bootstrap=50,
        asnorm_topk=10,
        calib_list=str(lists / "train_test_list.txt"),
        calib_path=str(data / "train"),
    )
    save = tmp / "exp"
    train(cfg, save)
    run_script("m_trainer.py", "--config", str(cfg), "--save_path", str(save), "--check")
    out = run_script(
        "m_trainer.py",
        "--config",
        str(cfg),
        "--save_path",
        str(save),
        "--check",
        "--test_path",
        str(short),
        "--result_tag",
        "1s",
        "--test_list_libri",
        "",
    ).stdout
    return save, out, cfg


def records(path: Path) -> dict[tuple[str, str], list[float]]:
    """(system, back-end) -> [eer, low, high] of the test list's records of a check*.json."""
    return {
        (r["system"], r["backend"]): [r["eer"], *r["eer_ci95"]]
        for r in json.loads(path.read_text())
        if r.get("trials") == "test" and "eer" in r
    }


def test_result_tag_keeps_both_results(checked):
    save, *_ = checked
    result = save / "result"
    for name in ("check.json", "check_1s.json", "trials_test.npz", "trials_test_1s.npz", "trials_libri.npz"):
        assert (result / name).is_file(), name
    assert not (result / "trials_libri_1s.npz").exists()  # libri unset for the short check
    full, short = records(result / "check.json"), records(result / "check_1s.json")
    assert set(full) == set(short) == {(s, b) for s in ("original", "enhanced") for b in BACKENDS}
    assert full[("original", "none")] != short[("original", "none")]
    sources = json.loads((result / "check_1s.json").read_text())[-1]["sources"]
    assert sources["test"]["manifest"]["max_seconds"] == 1.0


def test_duration_rows_equal_the_check_results(checked, capsys):
    save, *_ = checked
    written = m_viewer.make_figures(["--save_path", str(save)])
    result = save / "result"
    assert result / "eer_duration.png" in written and (result / "eer_duration.png").stat().st_size > 10_000
    points = [
        p
        for name in ("check.json", "check_1s.json")
        for p in m_viewer.read_duration_points(result / name, "exp")
    ]
    series = m_viewer.duration_series(points)
    assert list(series) == [("exp", "test")]  # libri was checked at one duration only
    short, full = series[("exp", "test")]
    assert short.label == "1 s" and short.cropped
    assert not full.cropped and full.seconds is not None and full.label.startswith("full (")
    for point, name in ((short, "check_1s.json"), (full, "check.json")):
        assert {key: list(value) for key, value in point.eers.items()} == records(result / name)
    rows = m_viewer.duration_rows(series)
    assert rows[0] == ["run", "trials", "system", "back-end", "EER % at 1 s", f"EER % at {full.label}"]
    table = m_viewer.duration_table(series)
    assert table in capsys.readouterr().out and table in (result / "eer_duration.txt").read_text()
    for system, backend, *cells in (row[2:] for row in rows[1:] if row[2] != "enhanced - original"):
        expected = [records(result / name)[(system, backend)] for name in ("check_1s.json", "check.json")]
        assert cells == [f"{e:.2f} [{lo:.2f}, {hi:.2f}]" for e, lo, hi in expected]
    assert len(rows) == 1 + 2 * len(BACKENDS) + len(BACKENDS)  # systems x back-ends, then differences


def test_full_duration_is_the_mean_of_the_list_durations(checked, data):
    save, *_ = checked
    point = m_viewer.read_duration_points(save / "result" / "check.json", "exp")[0]
    files = m_viewer.read_trials(data / "lists" / "test_test_list.txt")[3]
    seconds = dict(line.split() for line in (data / "test" / "utt2dur").read_text().splitlines())
    expected = np.mean([float(seconds[f.removesuffix(".npy")]) for f in files])
    assert point.seconds == pytest.approx(expected, abs=1e-9)
    assert point.label == f"full ({expected:.1f} s mean)"


def test_duration_results_option_and_errors(checked, tmp_path, capsys):
    save, *_ = checked
    result = save / "result"
    written = m_viewer.make_figures(
        [
            "--duration_results",
            str(result / "check_1s.json"),
            str(result / "check.json"),
            "--out_dir",
            str(tmp_path),
        ]
    )
    assert written == [tmp_path / "eer_duration.png", tmp_path / "eer_duration.txt"]
    assert (tmp_path / "eer_duration.txt").read_text().split("\n\n", 1)[1] == (
        result / "eer_duration.txt"
    ).read_text().split("\n\n", 1)[1]
    with pytest.raises(UserError, match="no trial list of one run at two test durations"):  # one file twice
        m_viewer.make_figures(
            [
                "--duration_results",
                str(result / "check_1s.json"),
                str(result / "check_1s.json"),
                "--out_dir",
                str(tmp_path),
            ]
        )
    with pytest.raises(UserError, match="no trial list of one run at two test durations"):
        m_viewer.make_figures(["--duration_results", str(result / "check.json"), "--out_dir", str(tmp_path)])
    old = tmp_path / "old.json"
    old.write_text(
        json.dumps(
            [r for r in json.loads((result / "check.json").read_text()) if r.get("trials") is not None]
        )
    )
    with pytest.raises(UserError, match="old.json: no sources record"):
        m_viewer.read_duration_points(old, "exp")
    run = tmp_path / "run"
    (run / "result").mkdir(parents=True)
    (run / "result" / "check.json").write_text(old.read_text())  # an earlier version's, beside a new one
    (run / "result" / "check_1s.json").write_text((result / "check_1s.json").read_text())
    assert m_viewer.duration_outputs(m_viewer.build_parser().parse_args([]), [run], ["run"]) == []
    assert "left out of eer_duration.png: " in capsys.readouterr().out


def test_eval_with_a_result_tag_keeps_the_untagged_files(checked, tmp_path):
    save, _, cfg = checked
    result = save / "result"
    before = {path.name: path.stat().st_mtime_ns for path in result.iterdir()}
    run_script(
        "m_trainer.py",
        "--config",
        str(cfg),
        "--save_path",
        str(save),
        "--eval",
        "--backends",
        "none",
        "--result_tag",
        "v2",
        "--test_list_libri",
        "",
    )
    new = sorted(path.name for path in result.iterdir() if path.name not in before)
    assert new == ["eval_scores_test_v2.txt", "eval_v2.json", "trials_test_v2.npz"]
    assert all(
        path.stat().st_mtime_ns == before[path.name] for path in result.iterdir() if path.name in before
    )


def test_result_names():
    assert result_name("check.json") == "check.json" and result_name("check.json", None) == "check.json"
    assert result_name("check.json", "1s") == "check_1s.json"
    assert result_name("eval_scores_test_asnorm.txt", "vox1_2s") == "eval_scores_test_asnorm_vox1_2s.txt"
    for bad in ("../x", "a/b", "", "_x", "a b"):
        with pytest.raises(UserError, match="result_tag"):
            check_result_tag(bad)


def test_result_tag_must_fit_a_file_name(data, tmp_path):
    cfg = config(data, tmp_path)
    with pytest.raises(UserError, match="result_tag"):
        m_trainer.main(
            ["--config", str(cfg), "--save_path", str(tmp_path / "exp"), "--check", "--result_tag", "../x"]
        )


def test_points_are_ordered_by_duration_with_full_length_last(tmp_path):
    def point(seconds: float | None, cropped: bool) -> m_viewer.DurationPoint:
        return m_viewer.DurationPoint(
            tmp_path / f"{seconds}.json",
            "exp",
            "test",
            seconds,
            cropped,
            {("original", "none"): (10.0, 8.0, 12.0)},
            {},
        )

    points = [point(None, False), point(2.0, True), point(3.5, False), point(1.0, True)]
    assert m_viewer.duration_series(points + [point(None, False)]) == m_viewer.duration_series(points)
    found = m_viewer.duration_series(points)[("exp", "test")]
    assert [p.label for p in found] == ["1 s", "2 s", "full (3.5 s mean)", "full"]
    assert m_viewer.duration_rows({("exp", "test"): found})[1] == [
        "exp",
        "test",
        "original",
        "none",
        *["10.00 [8.00, 12.00]"] * 4,
    ]
