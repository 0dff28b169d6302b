"""Runs of one config trained with different seeds: the viewer's summary across seeds against the
check.json files it reads; and the `eer` option that picks the EER definition the tables show."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import config, train

import m_trainer
import m_viewer
from m_utils import UserError

SEEDS = (3, 1, 2)


def checked_run(data: Path, root: Path, name: str, seed: int, **options) -> Path:
    """A run trained with `seed` and checked: its save_path."""
    folder = root / f"cfg_{name}"
    folder.mkdir()
    cfg = config(
        data,
        folder,
        trainfunc="MSE_CS",
        multiple_embedding_flag="C",
        backends=["none", "mean"],
        bootstrap=50,
        **options,
    )
    save = root / name
    train(cfg, save, "--seed", str(seed))
    output(["--config", str(cfg), "--save_path", str(save), "--seed", str(seed), "--check"])
    return save


def output(argv: list[str]) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        m_trainer.main(argv)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Three runs of one config with different seeds, and one of another learning rate."""
    root = tmp_path_factory.mktemp("seeds")
    pooled = [checked_run(data, root, f"s{seed}", seed) for seed in SEEDS]
    return pooled, checked_run(data, root, "other_lr", 1, lr=0.01)


def records_of(save: Path) -> list[dict]:
    return json.loads((save / "result" / "check.json").read_text())


def test_seed_summary_against_the_check_files(runs, tmp_path, capsys):
    pooled, other = runs
    m_viewer.main(["--save_path", *map(str, pooled), str(other), "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    text = (tmp_path / "seeds.txt").read_text()
    assert text.strip() in out
    assert "group 1: s1 (seed 1), s2 (seed 2), s3 (seed 3)" in text
    assert "other_lr: no other run of its config: not pooled" in text
    records = [records_of(save) for save in sorted(pooled)]  # s1, s2, s3
    assert [next(r for r in rs if r["trials"] is None)["model"]["seed"] for rs in records] == [1, 2, 3]
    rows = {
        tuple(line.split()[1:3]): line for line in text.splitlines() if re.match(r"1\s+(test|libri)\s", line)
    }
    assert set(rows) == {(t, b) for t in ("test", "libri") for b in ("none", "mean")}
    for (trials, backend), line in rows.items():
        eer = {
            system: np.array(
                [
                    next(
                        r["eer"]
                        for r in rs
                        if r.get("system") == system
                        and "eer" in r
                        and r["trials"] == trials
                        and r["backend"] == backend
                    )
                    for rs in records
                ]
            )
            for system in ("original", "enhanced")
        }
        diffs = [
            next(r for r in rs if "eer_diff" in r and r["trials"] == trials and r["backend"] == backend)
            for rs in records
        ]
        diff = np.array([r["eer_diff"] for r in diffs])
        worst = int(np.argmax(diff))
        expected = [f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" for values in eer.values()]
        expected.append(f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f}")
        lo, hi = diffs[worst]["eer_diff_ci95"]
        expected += [f"{worst + 1}", f"{diff[worst]:+.2f} [{lo:.2f}, {hi:.2f}]"]
        assert re.split(r"\s{2,}", line.strip())[4:] == expected
    markdown = (tmp_path / "seeds.md").read_text()
    assert "| group | trials | back-end |" in markdown and "- group 1: s1 (seed 1)" in markdown


def test_runs_without_distinct_seeds_are_not_pooled(runs, tmp_path, capsys):
    pooled, _ = runs
    m_viewer.main(["--save_path", str(pooled[0]), str(pooled[1]), "--out_dir", str(tmp_path)])
    assert "group 1: s1 (seed 1), s3 (seed 3)" in (tmp_path / "seeds.txt").read_text()
    copy = tmp_path / "again"
    (copy / "result").mkdir(parents=True)
    for name in ("check.json", "scores.txt"):
        (copy / "result" / name).write_text((pooled[0] / "result" / name).read_text())
    m_viewer.main(["--save_path", str(pooled[0]), str(copy), "--out_dir", str(tmp_path / "out")])
    assert "a seed repeats (3, 3): not pooled" in capsys.readouterr().out
    assert not (tmp_path / "out" / "seeds.txt").exists()


def test_the_eer_option_switches_what_the_tables_show(runs):
    pooled, _ = runs
    save = pooled[1]  # seed 1
    cfg = save.parent / "cfg_s1" / "exp.yaml"
    records = records_of(save)
    default = output(
        ["--config", str(cfg), "--save_path", str(save), "--seed", "1", "--check", "--result_tag", "again"]
    )
    switched = output(
        [
            "--config",
            str(cfg),
            "--save_path",
            str(save),
            "--seed",
            "1",
            "--check",
            "--eer",
            "interpolated",
            "--result_tag",
            "interp",
        ]
    )
    none = {
        r["system"]: r for r in records if "eer" in r and r["trials"] == "test" and r["backend"] == "none"
    }
    line = r"\[testset original EER\] ([\d.]+), \[testset processed EER\] ([\d.]+)"
    for out, key in ((default, "eer"), (switched, "eer_interpolated")):
        found = re.search(line, out)
        assert float(found.group(1)) == pytest.approx(none["original"][key], abs=1e-4)
        assert float(found.group(2)) == pytest.approx(none["enhanced"][key], abs=1e-4)
        row = next(row for row in out.splitlines() if re.match(r"test\s+enhanced\s+none\s", row))
        assert row.split()[3] == f"{none['enhanced'][key]:.2f}"
    assert none["original"]["eer"] != pytest.approx(none["original"]["eer_interpolated"], abs=1e-3)
    assert "interpolated where the miss" in switched and "interpolated" not in default
    interp = json.loads((save / "result" / "check_interp.json").read_text())
    assert {r["eer_shown"] for r in interp if "eer" in r} == {"interpolated"}


def test_an_unknown_eer_definition_is_a_user_error(runs):
    save = runs[0][0]
    with pytest.raises(UserError, match="^--eer: unknown eer 'det'; known: interpolated, roc$"):
        m_trainer.main(
            [
                "--config",
                str(save.parent / "cfg_s3" / "exp.yaml"),
                "--save_path",
                str(save),
                "--check",
                "--eer",
                "det",
            ]
        )
