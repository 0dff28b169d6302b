"""The results table of --check records (check.json, check_<tag>.json) as Markdown and as a LaTeX
`booktabs` table: one row per back-end (per run and back-end where several runs are given), and
for each trial list the original and enhanced EER with their 95 % intervals, the paired
difference enhanced - original with its interval, and the original and enhanced minDCF.

A trial list is named by its file's stem (`veri_test2`), followed by the result tag of the file
that holds it where the tag is not that stem (`vox_test_test_list (1s)`). The EER shown is the one
the records say their tables show (`eer_shown`); its interval is that of voxceleb_trainer's EER."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from m_utils import write_text_atomic
from scoring.metrics import P_TARGETS, mindcf_key
from scoring.report import SYSTEMS

TABLE_NAME = "results"  # results.md and results.tex
COLUMNS = ("EER orig.", "EER enh.", "enh. - orig.", "minDCF orig.", "minDCF enh.")
MISSING = "-"
LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


@dataclass
class ResultsTable:
    """Cells as plain text: `groups` the trial lists (each spanning COLUMNS), `rows` each a row's
    leading cells (run, back-end) then len(groups) * len(COLUMNS) cells; `heading` says what the
    numbers are."""

    leading: list[str]
    groups: list[str]
    rows: list[list[str]] = field(default_factory=list)
    heading: str = ""


def list_label(records: Sequence[dict], trials: str, tag: str | None) -> str:
    """A trial list's name in the table: its file's stem, with the result tag where it differs."""
    sources = next((r.get("sources") or {} for r in records if r.get("trials") is None), {})
    path = (sources.get(trials) or {}).get("path")
    stem = Path(path).stem if path else trials
    return stem if tag in (None, stem) else f"{stem} ({tag})"


def result_tag(path: Path) -> str | None:
    """The result tag in a --check file's name: check_1s.json -> 1s; check.json -> None."""
    stem = path.stem
    return stem.split("_", 1)[1] if "_" in stem else None


def _interval(value: float, bounds: Sequence[float] | None, sign: str = "") -> str:
    """A value with its interval (none where a record of an earlier version lacks it)."""
    return f"{value:{sign}.2f}" + (f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else "")


def _number(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def shown_eer(record: dict) -> float:
    interpolated = record.get("eer_shown") == "interpolated" and "eer_interpolated" in record
    return float(record["eer_interpolated"] if interpolated else record["eer"])


def list_cells(records: Sequence[dict], trials: str, backend: str, p_target: float) -> list[str]:
    """The COLUMNS cells of one back-end on one trial list of a --check file's records."""
    found = {
        r["system"]: r
        for r in records
        if r.get("trials") == trials and r.get("backend") == backend and "eer" in r and "system" in r
    }
    difference = next(
        (r for r in records if r.get("trials") == trials and r.get("backend") == backend and "eer_diff" in r),
        None,
    )
    cells = [
        _interval(shown_eer(found[s]), found[s].get("eer_ci95")) if s in found else MISSING for s in SYSTEMS
    ]
    if difference is None:
        cells.append(MISSING)
    else:
        interpolated = difference.get("eer_shown") == "interpolated"
        value = difference.get("eer_diff_interpolated") if interpolated else None
        value = difference["eer_diff"] if value is None else value
        cells.append(_interval(value, difference.get("eer_diff_ci95"), "+"))
    key = mindcf_key(p_target)
    cells += [_number(found[s].get(key)) if s in found else MISSING for s in SYSTEMS]
    return cells


def results_table(
    results: Sequence[tuple[str, Path, Sequence[dict]]], p_target: float = P_TARGETS[0]
) -> ResultsTable:
    """The table of --check records: `results` holds (run name, file, its records) in the order
    the columns and rows should follow. A run column only where there are several runs."""
    runs = list(dict.fromkeys(run for run, _, _ in results))
    cells: dict[tuple[str, str], dict[str, list[str]]] = {}  # (run, back-end) -> list -> cells
    groups: list[str] = []
    eer_shown = set()
    for run, path, records in results:
        scored = [r for r in records if "eer" in r and "system" in r]
        for trials in dict.fromkeys(r["trials"] for r in scored):
            label = list_label(records, trials, result_tag(path))
            groups += [label] if label not in groups else []
            for backend in dict.fromkeys(r["backend"] for r in scored if r["trials"] == trials):
                row = cells.setdefault((run, backend), {})
                row[label] = list_cells(records, trials, backend, p_target)
        eer_shown |= {r.get("eer_shown", "roc") for r in scored}
    table = ResultsTable(["run", "back-end"] if len(runs) > 1 else ["back-end"], groups)
    for (run, backend), by_list in cells.items():
        leading = [run, backend] if len(runs) > 1 else [backend]
        table.rows.append(
            leading + [cell for label in groups for cell in by_list.get(label, [MISSING] * len(COLUMNS))]
        )
    which = "interpolated EER" if eer_shown == {"interpolated"} else "EER"
    table.heading = (
        f"{which} in % [95 % interval over resamples of the test speakers]; enh. - orig.: the paired "
        f"difference of the enhanced and original EER [its interval]; minDCF at P_target {p_target:g}."
    )
    return table


def markdown(table: ResultsTable) -> str:
    """The table in Markdown (GitHub's pipe tables), its heading above it."""
    header = table.leading + [f"{group} {column}" for group in table.groups for column in COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(table.leading) + "---:|" * (len(header) - len(table.leading)),
        *("| " + " | ".join(row) + " |" for row in table.rows),
    ]
    return f"{table.heading}\n\n" + "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    """Text as LaTeX typesets it literally; a minus sign before a number set as one."""
    escaped = "".join(LATEX_SPECIAL.get(char, char) for char in text)
    return re.sub(r"(?<![\w.])-(?=\d)", "$-$", escaped)


def latex(table: ResultsTable) -> str:
    """The table as a LaTeX `table` with a booktabs `tabular` (\\usepackage{booktabs})."""
    lead, width = len(table.leading), len(COLUMNS)
    spec = "l" * lead + ("r" * width) * len(table.groups)
    spans = " & ".join(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(group)}}}" for group in table.groups)
    rules = " ".join(
        rf"\cmidrule(lr){{{lead + 1 + k * width}-{lead + (k + 1) * width}}}" for k in range(len(table.groups))
    )
    header = [*table.leading, *(column for _ in table.groups for column in COLUMNS)]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(table.heading)}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        "&" * (lead - 1) + f" & {spans} \\\\",
        rules,
        " & ".join(latex_escape(cell) for cell in header) + r" \\",
        r"\midrule",
        *(" & ".join(latex_escape(cell) for cell in row) + r" \\" for row in table.rows),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def write_tables(table: ResultsTable, out_dir: Path) -> list[Path]:
    """results.md and results.tex in out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{TABLE_NAME}.md", out_dir / f"{TABLE_NAME}.tex"]
    write_text_atomic(written[0], markdown(table))
    write_text_atomic(written[1], latex(table))
    return written
