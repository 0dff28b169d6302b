"""The results table (scoring.tables): its Markdown and LaTeX cells against the check.json records
they are read from, LaTeX escaping and booktabs rules, and m_viewer.py writing both files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from conftest import ROOT

import m_viewer
from scoring.report import ListSource, Sources, list_records, write_records
from scoring.tables import COLUMNS, latex, latex_escape, markdown, results_table

BACKENDS = ("none", "mean+asnorm")


def fake_check(path: Path, lists: dict[str, str], seed: int, systems=("original", "enhanced")) -> list[dict]:
    """A check.json of `lists` (record key -> list file) with scores drawn from `seed`; its records."""
    rng = np.random.default_rng(seed)
    records = []
    for trials in lists:
        labels = np.tile([1, 0], 40)
        speakers = np.repeat(np.arange(10), 8)
        scores = {
            (system, backend): labels * (1.0 + k) + rng.standard_normal(labels.size)
            for k, system in enumerate(systems)
            for backend in BACKENDS
        }
        records += list_records(trials, scores, labels, speakers, resamples=50, seed=seed)
    sources = Sources({key: ListSource(str(ROOT / "lists" / name), 80, "emb") for key, name in lists.items()})
    write_records(path, [*records, sources])
    return json.loads(path.read_text())


def record(records: list[dict], trials: str, backend: str, system: str | None = None) -> dict:
    return next(
        r
        for r in records
        if r.get("trials") == trials
        and r.get("backend") == backend
        and (r.get("system") == system if system else "eer_diff" in r)
    )


def expected_cells(records: list[dict], trials: str, backend: str) -> list[str]:
    """The COLUMNS cells computed here from the records, independently of scoring.tables."""
    orig, enh = (record(records, trials, backend, s) for s in ("original", "enhanced"))
    diff = record(records, trials, backend)

    def eer(r: dict) -> str:
        return f"{r['eer']:.2f} [{r['eer_ci95'][0]:.2f}, {r['eer_ci95'][1]:.2f}]"

    lo, hi = diff["eer_diff_ci95"]
    return [
        eer(orig),
        eer(enh),
        f"{diff['eer_diff']:+.2f} [{lo:.2f}, {hi:.2f}]",
        f"{orig['mindcf_p05']:.4f}",
        f"{enh['mindcf_p05']:.4f}",
    ]


def markdown_rows(text: str) -> list[list[str]]:
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows]


def test_markdown_and_latex_hold_the_records(tmp_path):
    result = tmp_path / "run" / "result"
    result.mkdir(parents=True)
    first = fake_check(result / "check_veri_test2.json", {"test": "veri_test2.txt"}, seed=1)
    second = fake_check(
        result / "check_1s.json", {"test": "list_test_all2.txt", "libri": "libri_x.txt"}, seed=2
    )
    table = results_table(
        [("run", result / "check_veri_test2.json", first), ("run", result / "check_1s.json", second)]
    )
    assert table.groups == ["veri_test2", "list_test_all2 (1s)", "libri_x (1s)"]
    header, *rows = markdown_rows(markdown(table))
    assert header[0] == "back-end" and header[1] == "veri_test2 EER orig." and len(header) == 1 + 3 * 5
    assert [row[0] for row in rows] == list(BACKENDS)
    for row, backend in zip(rows, BACKENDS, strict=True):
        expected = [
            *expected_cells(first, "test", backend),
            *expected_cells(second, "test", backend),
            *expected_cells(second, "libri", backend),
        ]
        assert row[1:] == expected

    tex = latex(table)
    lines = tex.splitlines()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert lines.count(rule) == 1
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    assert r"\begin{tabular}{l" + "rrrrr" * 3 + "}" in tex
    assert r"\multicolumn{5}{c}{veri\_test2}" in tex and r"\multicolumn{5}{c}{list\_test\_all2 (1s)}" in tex
    assert r"\cmidrule(lr){2-6} \cmidrule(lr){7-11} \cmidrule(lr){12-16}" in tex
    body = lines[lines.index(r"\midrule") + 1 : lines.index(r"\bottomrule")]
    for line, md_row in zip(body, rows, strict=True):
        cells = line.removesuffix(r" \\").split(" & ")
        assert len(cells) == 16
        assert cells == [latex_escape(cell) for cell in md_row]
        assert [c.replace("$-$", "-").replace(r"\_", "_") for c in cells] == md_row
    assert r"P\_target 0.05" in tex and r"in \% [95 \%" in tex


def test_a_run_without_enhanced_scores_and_several_runs(tmp_path):
    runs = []
    for k, name in enumerate(("base_50%", "a&b")):
        result = tmp_path / name / "result"
        result.mkdir(parents=True)
        systems = ("original",) if k == 0 else ("original", "enhanced")
        records = fake_check(result / "check.json", {"test": "veri_test2.txt"}, k, systems)
        runs.append((name, result / "check.json", records))
    table = results_table(runs)
    header, *rows = markdown_rows(markdown(table))
    assert header[:2] == ["run", "back-end"]
    assert [row[:2] for row in rows] == [[run, b] for run in ("base_50%", "a&b") for b in BACKENDS]
    original = record(runs[0][2], "test", "none", "original")
    assert (
        rows[0][2] == f"{original['eer']:.2f} [{original['eer_ci95'][0]:.2f}, {original['eer_ci95'][1]:.2f}]"
    )
    assert rows[0][3:5] == ["-", "-"] and rows[0][6] == "-"
    tex = latex(table)
    assert r"base\_50\% & none &" in tex and r"a\&b & none &" in tex
    assert "&" * 1 + r" & \multicolumn{5}{c}{veri\_test2} \\" in tex


def test_latex_escape():
    assert latex_escape("a_b 5% x&y #1 $ ~ ^ {z} \\") == (
        r"a\_b 5\% x\&y \#1 \$ \textasciitilde{} \textasciicircum{} \{z\} \textbackslash{}"
    )
    assert latex_escape("-1.20 [-2.00, 0.30] enh. - orig. mean+asnorm") == (
        "$-$1.20 [$-$2.00, 0.30] enh. - orig. mean+asnorm"
    )


def test_viewer_writes_the_tables_beside_check_json(tmp_path, capsys):
    result = tmp_path / "exp" / "result"
    result.mkdir(parents=True)
    first = fake_check(result / "check_list_test_all2.json", {"test": "list_test_all2.txt"}, 3)
    second = fake_check(result / "check_veri_test2.json", {"test": "veri_test2.txt"}, 4)
    (result / "scores.txt").write_text("Epoch 1, TLOSS 0.5, LR 0.001\n")
    order = [result / "check_veri_test2.json", result / "check_list_test_all2.json"]
    m_viewer.main(["--save_path", str(tmp_path / "exp"), "--table_results", *map(str, order)])
    md = (result / "results.md").read_text()
    header, *rows = markdown_rows(md)
    assert [h for h in header if h.endswith("EER orig.")] == [
        "veri_test2 EER orig.",
        "list_test_all2 EER orig.",
    ]
    assert rows[0][1:] == expected_cells(second, "test", "none") + expected_cells(first, "test", "none")
    assert re.search(r"\\begin\{tabular\}", (result / "results.tex").read_text())
    assert f"wrote {result / 'results.tex'}" in capsys.readouterr().out
    assert len(COLUMNS) == 5


def test_records_of_an_earlier_version_leave_what_they_lack_empty(tmp_path):
    records = [
        {"trials": "test", "system": "original", "backend": "none", "eer": 12.5},
        {"trials": "test", "system": "enhanced", "backend": "none", "eer": 6.25, "eer_ci95": [5.0, 7.5]},
        {"trials": "test", "backend": "none", "eer_diff": -6.25, "eer_diff_ci95": [-7.0, -5.0]},
    ]
    table = results_table([("run", tmp_path / "check.json", records)])
    assert table.groups == ["test"]
    assert table.rows == [["none", "12.50", "6.25 [5.00, 7.50]", "-6.25 [-7.00, -5.00]", "-", "-"]]
