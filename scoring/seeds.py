"""Across training seeds: runs of one config trained with different seeds (`--seed`), pooled per
trial list and back-end from their check.json records. Runs are pooled when their options (the
model record's `options`) agree apart from IGNORED_OPTIONS; each pool gives the mean and sample
standard deviation across seeds of the original and enhanced EER and of their difference, and the
worst seed (the largest difference enhanced - original) with its bootstrap interval."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m_utils import write_text_atomic
from scoring.report import SYSTEMS, text_columns

SEEDS_NAME = "seeds"  # seeds.txt and seeds.md
# Options that do not change what a run trains and scores: where it is, how it runs, which mode.
IGNORED_OPTIONS = frozenset(
    {
        "seed",
        "save_path",
        "config",
        "initial_model",
        "check",
        "eval",
        "generate",
        "result_tag",
        "device",
        "mixedprec",
        "distributed",
        "nprocs",
        "port",
        "nDataLoaderThread",
        "gen_list",
        "gen_path",
        "gen_target_dir",
        "gen_format",
    }
)


@dataclass
class SeedRun:
    """One run's check.json: its name, seed, config (its options apart from IGNORED_OPTIONS, as
    JSON; None where the records hold no options) and records."""

    name: str
    seed: int | None
    config: str | None
    records: list[dict]


def seed_run(name: str, records: list[dict]) -> SeedRun:
    model = next((r.get("model") for r in records if "sources" in r), None) or {}
    options = model.get("options")
    config = (
        None
        if options is None
        else json.dumps(
            {key: value for key, value in options.items() if key not in IGNORED_OPTIONS}, sort_keys=True
        )
    )
    return SeedRun(name, model.get("seed"), config, records)


def seed_groups(runs: Sequence[SeedRun]) -> tuple[list[list[SeedRun]], list[str]]:
    """The runs grouped by config where a group holds two or more runs of distinct seeds; with
    notes on the runs left out."""
    notes = [
        f"{run.name}: its check.json records no seed and options (written before they were "
        "recorded): not pooled"
        for run in runs
        if run.seed is None or run.config is None
    ]
    by_config: dict[str, list[SeedRun]] = {}
    for run in runs:
        if run.seed is not None and run.config is not None:
            by_config.setdefault(run.config, []).append(run)
    groups = []
    for group in by_config.values():
        seeds = [run.seed for run in group]
        if len(group) < 2:
            notes.append(f"{group[0].name}: no other run of its config: not pooled")
        elif len(set(seeds)) < len(seeds):
            notes.append(
                f"{', '.join(run.name for run in group)}: one config, but a seed repeats "
                f"({', '.join(map(str, seeds))}): not pooled"
            )
        else:
            groups.append(sorted(group, key=lambda run: run.seed or 0))  # every seed is set here
    return groups, notes


def _shown(record: dict, key: str) -> float:
    """A record's EER value (`key`: eer or eer_diff) of the definition its tables show."""
    return record[f"{key}_interpolated"] if record.get("eer_shown") == "interpolated" else record[key]


@dataclass
class SeedSummary:
    """One trial list and back-end over a group's seeds (in the order of `seeds`)."""

    group: int
    trials: str
    backend: str
    seeds: list[int]
    original: np.ndarray
    enhanced: np.ndarray
    difference: np.ndarray
    difference_ci95: list[list[float]]

    def worst(self) -> int:
        """The index of the seed whose difference enhanced - original is largest (least gain)."""
        return int(np.argmax(self.difference))


def summaries(group: Sequence[SeedRun], number: int) -> list[SeedSummary]:
    """Per trial list and back-end that every run of the group scored with both systems."""
    found = []
    for run in group:
        eers = {(r["trials"], r["system"], r["backend"]): _shown(r, "eer") for r in run.records if "eer" in r}
        diffs = {(r["trials"], r["backend"]): r for r in run.records if "eer_diff" in r}
        found.append((eers, diffs))
    keys = [key for key in found[0][1] if all(key in diffs for _, diffs in found)]
    result = []
    for trials, backend in keys:
        eer = {system: np.array([eers[(trials, system, backend)] for eers, _ in found]) for system in SYSTEMS}
        records = [diffs[(trials, backend)] for _, diffs in found]
        result.append(
            SeedSummary(
                number,
                trials,
                backend,
                [run.seed or 0 for run in group],
                eer[SYSTEMS[0]],
                eer[SYSTEMS[1]],
                np.array([_shown(r, "eer_diff") for r in records]),
                [r["eer_diff_ci95"] for r in records],
            )
        )
    return result


def _spread(values: np.ndarray) -> str:
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def summary_rows(found: Sequence[SeedSummary]) -> list[list[str]]:
    rows = [
        [
            "group",
            "trials",
            "back-end",
            "seeds",
            "EER original",
            "EER enhanced",
            "enhanced - original",
            "worst seed",
            "its difference [95 % CI]",
        ]
    ]
    for s in found:
        worst = s.worst()
        lo, hi = s.difference_ci95[worst]
        rows.append(
            [
                str(s.group),
                s.trials,
                s.backend,
                str(len(s.seeds)),
                _spread(s.original),
                _spread(s.enhanced),
                f"{s.difference.mean():+.2f} ± {s.difference.std(ddof=1):.2f}",
                str(s.seeds[worst]),
                f"{s.difference[worst]:+.2f} [{lo:.2f}, {hi:.2f}]",
            ]
        )
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([lines[0], "|" + "---|" * len(rows[0]), *lines[1:]])


HEADING = (
    "EER in % across training seeds: mean ± sample standard deviation over the seeds of one "
    "config; the worst seed is the one whose difference enhanced - original is largest, with "
    "its bootstrap interval over the test speakers."
)


def seed_report(runs: Sequence[SeedRun]) -> tuple[list[SeedSummary], list[str]]:
    """Every group's summaries, and lines saying which runs were grouped and which were not."""
    groups, notes = seed_groups(runs)
    found: list[SeedSummary] = []
    lines = []
    for number, group in enumerate(groups, start=1):
        found += summaries(group, number)
        lines.append(f"group {number}: " + ", ".join(f"{run.name} (seed {run.seed})" for run in group))
    return found, lines + notes


def write_seed_summary(runs: Sequence[SeedRun], out_dir: Path) -> list[Path]:
    """Print the seed summary of these runs and write it to out_dir/seeds.txt and seeds.md; none
    (with the reason printed) where no two runs of one config differ in their seed alone."""
    found, lines = seed_report(runs)
    if not found:
        print(
            "skipped seeds.txt: no two runs of one config trained with different seeds"
            + "".join(f"\n  {line}" for line in lines)
        )
        return []
    rows = summary_rows(found)
    text = "\n".join([HEADING, *lines, "", *text_columns(rows)]) + "\n"
    print(f"\n{text}", end="")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{SEEDS_NAME}.txt", out_dir / f"{SEEDS_NAME}.md"]
    write_text_atomic(written[0], text)
    write_text_atomic(
        written[1],
        "\n".join([HEADING, "", *(f"- {line}" for line in lines), "", markdown_table(rows)]) + "\n",
    )
    return written
