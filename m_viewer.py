"""Plot what a run left behind: loss and EER curves, DET curves, distance histograms.

    python ./m_viewer.py --save_path exp_emb/X
    python ./m_viewer.py --save_path exp_emb/A exp_emb/B exp_emb/C --out_dir figures
    python ./m_viewer.py --save_path exp_emb/X --dist_list lists/X_distribution_list.txt --embed_dir emb
    python ./m_viewer.py --duration_results exp_emb/X/result/check.json exp_emb/X/result/check_1s.json \
        --out_dir figures

Under <save_path>/result it writes fig.png (train loss, validation loss and EER per epoch),
fig2.png (the EER curves alone), det.png (DET curves of the original and enhanced trial scores
saved by m_trainer.py --check / --eval) and dist_hist.png with dist_hist.txt (cosine distances of
same-category, different-category and different-speaker pairs, before and after enhancement).
With several runs the curves of all of them go to compare_fig.png and compare_fig2.png in
--out_dir. A figure whose inputs are missing is skipped, and the script says so.

EER against test duration: check one trained model on test sets of several durations, each with
its own result tag (m_trainer.py --check --test_path emb/vox_test_1s --result_tag 1s writes
result/check_1s.json beside check.json). When a run's result folder holds two or more check*.json
whose trial list was seen at different durations, the viewer writes eer_duration.png (EER with its
95 % interval against duration, one line per system and back-end, a panel per trial list) and
eer_duration.txt (the table, also printed: EER [95 % interval] per duration, then the paired
difference enhanced - original per back-end). --duration_results takes such files from anywhere
(one figure in --out_dir, default the first file's folder). A result's duration is the crop of its
embeddings (their manifest.json's max_seconds: "1 s"); at full length it is the mean of the list's
durations from utt2dur ("full (3.8 s mean)"), or "full" when those are unknown.

The results table (scoring.tables): results.md and results.tex (a LaTeX booktabs table) beside
check.json (in --out_dir with several runs), one row per back-end (and run), per trial list the
original and enhanced EER with their intervals, the paired difference and minDCF; from every
result/check*.json, or from --table_results in the order given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.stats import norm

from m_DataLoader import load_embeddings, read_list, read_trials
from m_network import TRAIN_FIELDS, VAL_FIELDS, parse_score_line
from m_utils import (
    Option,
    Options,
    UserError,
    add_options,
    atomic_write,
    read_user_text,
    run_main,
    write_text_atomic,
)
from scoring.backends import BACKENDS, step_names
from scoring.enrolment_table import read_enrolment_check, scored_enrolment, write_enrolment_table
from scoring.metrics import (
    P_TARGETS,
    compute_eer,
    error_rates,
    evaluate_scores,
    min_dcf_of_rates,
    mindcf_key,
    score_trials,
)
from scoring.report import NONE_ALIASES, SYSTEMS, TRIAL_LISTS, text_columns
from scoring.seeds import seed_groups, seed_run, summaries, write_seed_summary
from scoring.tables import results_table as check_table
from scoring.tables import write_tables
from stores.arrays import EMBEDDING_TYPES
from stores.keys import embedding_file
from stores.open import open_embeddings

matplotlib.use("Agg")  # headless: figures are only ever written to files

SAVE_PATH = "exp_emb/MyLinearNetv2_Exp6-4"
SEED = 10
DPI = 120
DET_TICKS_PERCENT = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 40, 60)
DET_RANGE_PERCENT = (0.05, 70.0)
MIN_DCF_P_TARGET = P_TARGETS[0]  # the minDCF of the DET legends
# A trials_*.npz holds labels, embedding_type and the scores of each (system, back-end) as
# `<system>/<back-end>`, and the none back-end's under scoring.report.NONE_ALIASES (files of earlier
# versions hold those alone, with the embedding type as `metric`).
OLD_TYPE_KEY = "metric"
SYSTEM_STYLE = dict(zip(SYSTEMS, (":", "-"), strict=True))  # DET line style of each system


@dataclass
class Scores:
    """The curves of one scores.txt: one row per training line, one per --Val-- line.

    Validation values written as `nan`, and the minDCF columns of the old format, are NaN.
    """

    name: str
    epoch: np.ndarray
    tloss: np.ndarray
    lr: np.ndarray
    val_epoch: np.ndarray
    vloss: np.ndarray
    veer: np.ndarray
    veer_libri: np.ndarray
    vacc: np.ndarray
    vmindcf: np.ndarray
    vmindcf_libri: np.ndarray


def parse_scores(path: str | Path, name: str | None = None) -> Scores:
    """Read a scores.txt (training and validation lines, old or new format; blank lines skipped).

    A missing file or a malformed line is a UserError naming the file (and line).
    """
    path = Path(path)
    text = read_user_text(path, "scores file", "m_trainer.py while training")
    rows: dict[bool, list[list[float]]] = {False: [], True: []}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            is_val, values = parse_score_line(line)
        except ValueError as err:
            raise UserError(f"{path}:{lineno}: {err}; found {line.strip()!r}") from None
        rows[is_val].append(list(values.values()))
    if not rows[False] and not rows[True]:
        raise UserError(f"{path}: the scores file holds no epoch lines yet")
    train = np.array(rows[False], np.float64).reshape(-1, len(TRAIN_FIELDS))
    val = np.array(rows[True], np.float64).reshape(-1, len(VAL_FIELDS))
    return Scores(
        name or path.parent.parent.name,
        train[:, 0].astype(int),
        train[:, 1],
        train[:, 2],
        val[:, 0].astype(int),
        *val[:, 1:].T,
    )


# ----------------------------------------------------------------------------------------------
# Loss and EER curves


@dataclass(frozen=True)
class Curve:
    """One quantity of Scores: x and y attribute names, label, y axis ('loss' or 'eer'), colour
    (used when a single run is drawn; with several, the colour tells the run) and line style."""

    x: str
    y: str
    label: str
    axis: str
    color: str
    style: dict


CURVES = (
    Curve("epoch", "tloss", "train loss", "loss", "C0", {"linestyle": "-"}),
    Curve("val_epoch", "vloss", "validation loss", "loss", "C1", {"linestyle": "--", "marker": "o"}),
    Curve("val_epoch", "veer", "EER, test list", "eer", "C2", {"linestyle": "-", "marker": "s"}),
    Curve("val_epoch", "veer_libri", "EER, LibriSpeech list", "eer", "C3", {"linestyle": ":", "marker": "^"}),
)
AXIS_LABELS = {"loss": "loss", "eer": "EER (%)"}


def curve_label(run: Scores, curve: Curve, x: np.ndarray, y: np.ndarray, several: bool) -> str:
    """Legend text: the quantity (prefixed by the run when comparing), EER curves with their best."""
    label = f"{run.name}: {curve.label}" if several else curve.label
    if curve.axis == "eer":
        best = int(np.argmin(y))
        label += f" (best {y[best]:.2f} % at epoch {x[best]})"
    return label


def draw_curves(axes: dict[str, Axes], runs: Sequence[Scores], curves: Sequence[Curve]) -> list[str]:
    """Plot the finite points of every curve of every run; returns notes on curves left out."""
    several = len(runs) > 1
    notes = []
    for r, run in enumerate(runs):
        for curve in curves:
            x, y = getattr(run, curve.x), getattr(run, curve.y)
            finite = np.isfinite(y)
            if not finite.any():
                notes.append(f"{run.name}: no finite {curve.label} values, not drawn")
                continue
            x, y = x[finite], y[finite]
            axes[curve.axis].plot(
                x,
                y,
                color=f"C{r}" if several else curve.color,
                markersize=4,
                label=curve_label(run, curve, x, y, several),
                **curve.style,
            )
    for key, ax in axes.items():
        ax.set_ylabel(AXIS_LABELS[key])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return notes


def curve_figure(runs: Sequence[Scores], curves: Sequence[Curve], title: str) -> tuple[Figure, list[str]]:
    """A figure of `curves`: losses on the left axis, EER (%) on a right axis when both appear."""
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax = fig.add_subplot()
    kinds = {curve.axis for curve in curves}
    axes = {"loss": ax, "eer": ax.twinx()} if kinds == {"loss", "eer"} else {kinds.pop(): ax}
    notes = draw_curves(axes, runs, curves)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    handles, labels = [], []
    for one in axes.values():
        h, lab = one.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    return fig, notes


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG, atomically."""
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=DPI))
    return path


def write_curve_figures(runs: Sequence[Scores], out_dir: Path, prefix: str = "") -> list[Path]:
    """fig.png (losses and EER) and fig2.png (EER alone), named `<prefix>fig*.png`."""
    names = ", ".join(run.name for run in runs)
    title = f"Comparison of {names}" if len(runs) > 1 else names
    written = []
    for filename, curves, what in (
        (f"{prefix}fig.png", CURVES, "loss and EER per epoch"),
        (f"{prefix}fig2.png", [c for c in CURVES if c.axis == "eer"], "EER per epoch"),
    ):
        fig, notes = curve_figure(runs, curves, f"{title}: {what}")
        for note in notes:
            print(f"{filename}: {note}")
        written.append(save_figure(fig, out_dir / filename))
    return written


# ----------------------------------------------------------------------------------------------
# DET curves


@dataclass
class TrialScores:
    """Per-trial scores of one trial list, as m_trainer.py saves them: `scores` by (system,
    back-end), systems original and enhanced, back-ends none, mean, asnorm, plda."""

    labels: np.ndarray
    scores: dict[tuple[str, str], np.ndarray]
    embedding_type: str

    @property
    def original(self) -> np.ndarray | None:
        return self.scores.get(("original", "none"))

    @property
    def enhanced(self) -> np.ndarray | None:
        return self.scores.get(("enhanced", "none"))

    def backends(self) -> list[str]:
        """The back-ends scored, in the order they were saved (none first)."""
        return list(dict.fromkeys(backend for _, backend in self.scores))


def load_trial_scores(path: str | Path) -> TrialScores:
    """Read a trials_*.npz (labels, embedding_type, scores); errors name the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays: dict[str, Any] = {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable trial scores file ({err})") from None
    arrays.setdefault("embedding_type", arrays.get(OLD_TYPE_KEY))
    scores: dict[Any, np.ndarray] = {
        tuple(key.split("/")): values.astype(np.float64) for key, values in arrays.items() if "/" in key
    }
    for alias, system in NONE_ALIASES.items():
        if alias in arrays and (system, "none") not in scores:
            scores[(system, "none")] = arrays[alias].astype(np.float64)
    missing = ([] if scores else list(NONE_ALIASES)) + [
        key for key in ("labels", "embedding_type") if arrays.get(key) is None
    ]
    if missing:
        raise UserError(
            f"{path}: trial scores lack the array(s) {', '.join(missing)} (expected labels, "
            "embedding_type and scores as <system>/<back-end>, or original and processed)"
        )
    labels = arrays["labels"].astype(np.int8)
    if any(len(values) != len(labels) for values in scores.values()):
        raise UserError(f"{path}: labels and scores have different lengths")
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise UserError(f"{path}: a DET curve needs both target (1) and non-target (0) trials")
    return TrialScores(labels, dict(sorted(scores.items(), key=score_order)), str(arrays["embedding_type"]))


def score_order(item: tuple[tuple[str, str], Any]) -> tuple[int, int]:
    """Sort key of (system, back-end) scores: by back-end (none first), original before enhanced."""
    (system, backend), _ = item
    known = list(BACKENDS)
    return (
        known.index(backend) if backend in known else len(known),
        SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS),
    )


def scoring_name(embedding_type: str) -> str:
    """How trials of an embedding type (multiple_embedding_flag) are scored, in words."""
    known = EMBEDDING_TYPES.get(embedding_type)
    if known is None:
        return f"type {embedding_type}"
    return "cosine distance" if known.cosine else "L2 distance"


#: What each back-end's scores are, in words; {raw} is the embedding type's own score.
SCORE_MEANINGS = {
    "none": "{raw}",
    "mean": "-(cosine distance) after subtracting the training mean",
    "asnorm": "AS-Norm of {raw}",
    "plda": "PLDA log-likelihood ratio (after LDA and length norm)",
    "qmf": "QMF log-odds (base back-end's score and durations)",
}


def score_meanings(backends: Sequence[str], embedding_type: str) -> list[str]:
    """One line per back-end saying what its scores are (the DET plot's panel titles)."""
    raw = f"-({scoring_name(embedding_type)})"
    return [f"{backend}: " + score_meaning(step_names(backend), raw) for backend in backends]


def score_meaning(steps: Sequence[str], raw: str) -> str:
    """What the scores of a back-end's steps are: the last step's over those before it."""
    if len(steps) > 1:
        raw = score_meaning(steps[:-1], raw)
    return SCORE_MEANINGS.get(steps[-1], "scores of the {name} back-end").format(raw=raw, name=steps[-1])


def probit(rate_percent: np.ndarray | Sequence[float]) -> np.ndarray:
    """Normal-deviate coordinate of a rate given in %."""
    return norm.ppf(np.clip(np.asarray(rate_percent, np.float64) / 100, 1e-9, 1 - 1e-9))


def setup_det_axes(ax: Axes) -> None:
    """Normal-deviate axes with ticks labelled in %, and the miss = false-alarm diagonal."""
    ticks = probit(DET_TICKS_PERCENT)
    labels = [f"{t:g}" for t in DET_TICKS_PERCENT]
    low, high = probit(DET_RANGE_PERCENT)
    for axis, lim in ((ax.xaxis, ax.set_xlim), (ax.yaxis, ax.set_ylim)):
        axis.set_ticks(ticks, labels)
        lim(low, high)
    ax.plot([low, high], [low, high], color="0.6", linestyle=":", linewidth=1, label="miss = false alarm")
    ax.set_xlabel("false-alarm probability (%)")
    ax.set_ylabel("miss probability (%)")
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)


def draw_det(
    ax: Axes, scores: np.ndarray, labels: np.ndarray, name: str, color: str, linestyle: str = "-"
) -> None:
    """One DET curve with its EER point; EER and minDCF in the legend."""
    miss, false_alarm, _ = error_rates(scores, labels)
    eer = compute_eer(scores, labels)[0]
    min_dcf = min_dcf_of_rates(miss, false_alarm, MIN_DCF_P_TARGET)
    hidden = " (curve below the plotted range)" if eer < DET_RANGE_PERCENT[0] else ""
    ax.plot(
        probit(false_alarm * 100),
        probit(miss * 100),
        color=color,
        linewidth=1.5,
        linestyle=linestyle,
        label=f"{name}: EER {eer:.2f} %, minDCF {min_dcf:.3f}{hidden}",
    )
    ax.plot(probit([eer]), probit([eer]), "o", color=color, markersize=7, markeredgecolor="black")


def write_det_figure(run_dir: Path, name: str) -> Path | None:
    """det.png from the trials_*.npz present in <run>/result, or None when there is none."""
    result = run_dir / "result"
    found = [
        (t.title, load_trial_scores(result / f"trials_{t.key}.npz"))
        for t in TRIAL_LISTS
        if (result / f"trials_{t.key}.npz").is_file()
    ]
    if not found:
        return None
    fig = Figure(figsize=(6.5 * len(found), 7), layout="constrained")
    for i, (label, trials) in enumerate(found):
        ax = fig.add_subplot(1, len(found), i + 1)
        setup_det_axes(ax)
        backends = trials.backends()
        for (system, backend), scores in trials.scores.items():
            curve = system if backend == "none" else f"{system} + {backend}"
            draw_det(
                ax, scores, trials.labels, curve, f"C{backends.index(backend)}", SYSTEM_STYLE.get(system, "-")
            )
        ax.set_title(
            "\n".join(
                [
                    f"{label}: {len(trials.labels)} trials; the scores of each back-end:",
                    *score_meanings(backends, trials.embedding_type),
                ]
            ),
            fontsize="medium",
        )
        ax.legend(loc="lower left", fontsize="small")
    fig.suptitle(
        f"{name}: DET curves (dotted: original, solid: enhanced; colour: back-end; dots: EER; "
        f"minDCF at P_target = {MIN_DCF_P_TARGET})"
    )
    return save_figure(fig, result / "det.png")


# ----------------------------------------------------------------------------------------------
# Distance histograms


PAIR_KINDS = (
    ("same", "same category"),
    ("category", "different category, same speaker"),
    ("speaker", "different speakers"),
)


@dataclass
class PairGroup:
    """Pairs of one kind with their cosine distances (1 - cos) before and after enhancement."""

    label: str
    pairs: list[tuple[str, str]]
    before: np.ndarray
    after: np.ndarray


def other_speaker_pairs(records: Sequence[tuple], seed: int) -> list[tuple[str, str]]:
    """Each distinct path1 paired with the path1 of another speaker, drawn uniformly (seeded)."""
    files = sorted({(r[0], r[1]) for r in records})
    speakers = np.array([spk for spk, _ in files])
    if len(set(speakers.tolist())) < 2:
        return []
    _, start, count = np.unique(speakers, return_index=True, return_counts=True)
    first = np.repeat(start, count)
    size = np.repeat(count, count)
    draw = np.random.default_rng(seed).integers(0, len(files) - size)
    partner = np.where(draw < first, draw, draw + size)
    return [(files[i][1], files[j][1]) for i, j in enumerate(partner)]


def cosine_distances(
    embeddings: np.ndarray, row_of: dict[str, int], pairs: Sequence[tuple[str, str]]
) -> np.ndarray:
    """1 - cos of each pair of files, by scoring.metrics.score_trials with cosine scoring."""
    left = np.array([row_of[a] for a, _ in pairs], np.int64)
    right = np.array([row_of[b] for _, b in pairs], np.int64)
    return -score_trials(embeddings, left, right, cosine=True).astype(np.float64)


def check_enhanced_tree(root: Path, files: Sequence[str]) -> None:
    """A clear error when the enhanced tree lacks files of the distribution list."""
    missing = [rel for rel in files if not embedding_file(root, rel).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(files)} embeddings of the distribution list are missing "
            f"under {root} (first: {embedding_file(root, missing[0])}); run m_trainer.py "
            "--generate with a gen_list that covers the distribution list"
        )


@dataclass
class PairStudy:
    """The pairs of a distribution list and their distances on the original embeddings: the same
    for every run compared, so read once."""

    dist_list: Path
    embed_dir: Path
    seed: int
    pairs: dict[str, list[tuple[str, str]]]
    files: list[str]
    row_of: dict[str, int]
    before: dict[str, np.ndarray]


def pair_study(dist_list: str | Path, embed_dir: str | Path, seed: int = SEED) -> PairStudy:
    records = read_list(dist_list, "distribution")
    pairs = {
        "same": [(r[1], r[2]) for r in records if r[3] == 1],
        "category": [(r[1], r[2]) for r in records if r[3] == 0],
        "speaker": other_speaker_pairs(records, seed),
    }
    files = sorted({rel for group in pairs.values() for pair in group for rel in pair})
    row_of = {rel: i for i, rel in enumerate(files)}
    original = load_embeddings(embed_dir, files, desc="loading original embeddings")
    return PairStudy(
        Path(dist_list),
        Path(embed_dir),
        seed,
        pairs,
        files,
        row_of,
        {key: cosine_distances(original, row_of, pairs[key]) for key, _ in PAIR_KINDS},
    )


def enhanced_groups(study: PairStudy, enhanced_dir: str | Path) -> dict[str, PairGroup]:
    """The study's pair groups with their distances on one run's enhanced embeddings."""
    check_enhanced_tree(Path(enhanced_dir), study.files)
    enhanced = load_embeddings(enhanced_dir, study.files, desc="loading enhanced embeddings")
    return {
        key: PairGroup(
            label,
            study.pairs[key],
            study.before[key],
            cosine_distances(enhanced, study.row_of, study.pairs[key]),
        )
        for key, label in PAIR_KINDS
    }


def mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def distance_table(groups: dict[str, PairGroup]) -> str:
    """Mean cosine distances per pair kind, before and after, and the category gap."""
    rows = [
        (g.label, str(len(g.pairs)), mean_or_nan(g.before), mean_or_nan(g.after)) for g in groups.values()
    ]
    same, category = groups["same"], groups["category"]
    rows.append(
        (
            "gap: different - same category",
            "",
            mean_or_nan(category.before) - mean_or_nan(same.before),
            mean_or_nan(category.after) - mean_or_nan(same.after),
        )
    )
    width = max(len(row[0]) for row in rows)
    lines = [
        f"{'mean cosine distance (1 - cos)':<{width}}  {'pairs':>6}  {'before':>8}  "
        f"{'after':>8}  {'change':>8}"
    ]
    lines += [
        f"{label:<{width}}  {n:>6}  {before:8.4f}  {after:8.4f}  {after - before:+8.4f}"
        for label, n, before, after in rows
    ]
    return "\n".join(lines)


def histogram_figure(groups: dict[str, PairGroup], title: str) -> Figure:
    """Two panels (before / after), a density histogram per pair kind, means in the legends."""
    values = [v for g in groups.values() for v in (g.before, g.after) if len(v)]
    edges = np.histogram_bin_edges(np.concatenate(values), bins=50)
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, when, attr in zip(
        axes, ("before enhancement (original)", "after enhancement"), ("before", "after"), strict=True
    ):
        for i, group in enumerate(groups.values()):
            distances = getattr(group, attr)
            if not len(distances):
                continue
            mean = distances.mean()
            ax.hist(
                distances,
                bins=edges,
                density=True,
                histtype="stepfilled",
                alpha=0.35,
                color=f"C{i}",
                edgecolor=f"C{i}",
                linewidth=1.2,
                label=f"{group.label}: mean {mean:.3f} (n={len(distances)})",
            )
            ax.axvline(mean, color=f"C{i}", linestyle="--", linewidth=1)
        ax.set_title(when)
        ax.set_xlabel("cosine distance (1 - cos)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("density")
    fig.suptitle(title)
    return fig


def write_distance_figure(
    run_dir: Path, name: str, study: PairStudy, enhanced_dir: Path
) -> tuple[Path, Path]:
    """dist_hist.png and dist_hist.txt (the table, also printed) of one run."""
    groups = enhanced_groups(study, enhanced_dir)
    table = distance_table(groups)
    print(f"{name}: {study.dist_list.name}, enhanced embeddings from {enhanced_dir}\n{table}")
    result = run_dir / "result"
    log_path = result / "dist_hist.txt"
    write_text_atomic(
        log_path,
        f"run {name}\ndistribution list {study.dist_list}\noriginal embeddings "
        f"{study.embed_dir}\nenhanced embeddings {enhanced_dir}\nseed {study.seed}\n"
        f"{table}\n",
    )
    fig = histogram_figure(groups, f"{name}: pair distances of {study.dist_list.name}")
    return save_figure(fig, result / "dist_hist.png"), log_path


# ----------------------------------------------------------------------------------------------
# EER against test duration


DURATION_NAME = "eer_duration"  # <name>.png and <name>.txt
CHECK_GLOB = "check*.json"  # the --check results of a run: check.json, check_<result_tag>.json
Key = tuple[str, str]  # (system, back-end)
Interval = tuple[float, float, float]  # value, low, high


@dataclass(frozen=True)
class DurationPoint:
    """One trial list of one --check result file: its test duration and EER [95 % interval] per
    (system, back-end), and the paired EER difference enhanced - original per back-end.

    `seconds` is the embeddings' crop (their manifest's max_seconds; `cropped`), else the mean
    duration of the list's files (utt2dur), else None (full length, duration unknown)."""

    source: Path
    run: str
    trials: str
    seconds: float | None
    cropped: bool
    eers: dict[Key, Interval]
    differences: dict[str, Interval]
    list_path: str = ""  # the trial list's file: other lists of one key are other series

    @property
    def label(self) -> str:
        if self.cropped:
            return f"{self.seconds:g} s"
        return "full" if self.seconds is None else f"full ({self.seconds:.1f} s mean)"

    def order(self) -> tuple[bool, float]:
        return (not self.cropped, self.seconds if self.seconds is not None else np.inf)


def read_records(path: Path) -> list[dict]:
    """The records of a check.json / eval.json; errors name the file."""
    try:
        records = json.loads(read_user_text(path, "results file", "m_trainer.py --check"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path}: expected a list of records as m_trainer.py --check writes")
    return records


@cache
def mean_duration(list_path: str, embeddings: str) -> float | None:
    """Mean seconds of the files a trial list names, from its embeddings' utt2dur; None when
    the list, the embeddings or their durations are not there."""
    try:
        durations = open_embeddings(embeddings).durations(read_trials(list_path)[3])
    except (UserError, OSError):
        return None
    return None if durations is None else float(durations.mean())


def list_duration(source: dict | None) -> tuple[float | None, bool]:
    """(seconds, cropped) of a trial list from its sources record (see DurationPoint)."""
    source = source or {}
    max_seconds = (source.get("manifest") or {}).get("max_seconds")
    if max_seconds is not None:
        return float(max_seconds), True
    if source.get("path") and source.get("embeddings"):
        return mean_duration(str(source["path"]), str(source["embeddings"])), False
    return None, False


def read_duration_points(path: Path, run: str) -> list[DurationPoint]:
    """One DurationPoint per trial list of a --check result file (which must name its sources)."""
    records = read_records(path)
    sources = next((r["sources"] for r in records if r.get("trials") is None and "sources" in r), None)
    if sources is None:
        raise UserError(
            f"{path}: no sources record (written before m_trainer.py recorded them): the "
            "test duration of its results is unknown; run --check again"
        )
    points = []
    for trials in dict.fromkeys(r["trials"] for r in records if "eer" in r):
        eers = {
            (r["system"], r["backend"]): (r["eer"], *r["eer_ci95"])
            for r in records
            if r.get("trials") == trials and "eer" in r
        }
        differences = {
            r["backend"]: (r["eer_diff"], *r["eer_diff_ci95"])
            for r in records
            if r.get("trials") == trials and "eer_diff" in r
        }
        points.append(
            DurationPoint(
                path,
                run,
                trials,
                *list_duration(sources.get(trials)),
                eers,
                differences,
                str((sources.get(trials) or {}).get("path") or ""),
            )
        )
    return points


def duration_series(points: Sequence[DurationPoint]) -> dict[tuple[str, str], list[DurationPoint]]:
    """The points by (run, trial list), ordered by duration (full length last); only the lists
    seen at two durations or more (two list files of one key, the recipe's VoxCeleb1-O and -E, are
    two series named by their files). Of two results of one list at one duration (a --check with a
    result tag that scored an untagged list again, say) the more recent file's is drawn, with a
    warning; the others are drawn all the same."""
    series: dict[tuple[str, str], list[DurationPoint]] = {}
    lists = {(p.run, p.trials, Path(p.list_path).name) for p in points}
    for point in points:
        several = sum(key[:2] == (point.run, point.trials) for key in lists) > 1
        trials = f"{point.trials} {Path(point.list_path).name}" if several else point.trials
        series.setdefault((point.run, trials), []).append(point)
    kept = {}
    for key, found in series.items():
        by_label: dict[str, DurationPoint] = {}
        for point in found:
            earlier = by_label.get(point.label)
            by_label[point.label] = point if earlier is None else more_recent(earlier, point)
        if len(by_label) > 1:
            kept[key] = sorted(by_label.values(), key=DurationPoint.order)
    return kept


def more_recent(first: DurationPoint, second: DurationPoint) -> DurationPoint:
    """Of two results of one trial list at one test duration, the one of the file written last
    (the second on a tie), said in a warning."""
    if first.source == second.source:
        return second
    times = [point.source.stat().st_mtime_ns if point.source.exists() else 0 for point in (first, second)]
    kept, left = (first, second) if times[0] > times[1] else (second, first)
    print(
        f"warning: {first.source} and {second.source} both hold {first.trials} results at test duration "
        f"{first.label}: drawn from {kept.source} (written last), not from {left.source}"
    )
    return kept


def duration_keys(points: Sequence[DurationPoint]) -> list[Key]:
    """The (system, back-end) pairs of a series, back-end by back-end (none first)."""
    keys = dict.fromkeys(key for point in points for key in point.eers)
    return [key for key, _ in sorted(((key, None) for key in keys), key=score_order)]


def draw_duration(ax: Axes, points: Sequence[DurationPoint], title: str) -> None:
    """EER with its 95 % interval per (system, back-end) against the points' durations."""
    keys = duration_keys(points)
    backends = list(dict.fromkeys(backend for _, backend in keys))
    spread = 0.25 / max(len(keys) - 1, 1)
    for i, (system, backend) in enumerate(keys):
        x = np.arange(len(points)) + (i - (len(keys) - 1) / 2) * spread
        found = [
            (xi, p.eers[(system, backend)])
            for xi, p in zip(x, points, strict=True)
            if (system, backend) in p.eers
        ]
        eer = np.array([value for _, value in found])
        ax.errorbar(
            [xi for xi, _ in found],
            eer[:, 0],
            yerr=[eer[:, 0] - eer[:, 1], eer[:, 2] - eer[:, 0]],
            color=f"C{backends.index(backend)}",
            linestyle=SYSTEM_STYLE.get(system, "-"),
            marker="o",
            markersize=4,
            capsize=3,
            label=system if backend == "none" else f"{system} + {backend}",
        )
    ax.set_xticks(range(len(points)), [p.label for p in points])
    ax.set_xlabel("test duration")
    ax.set_ylabel("EER (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def cell(value: Interval | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value[0]:{'+' if signed else ''}.2f} [{value[1]:.2f}, {value[2]:.2f}]"


def duration_rows(series: dict[tuple[str, str], list[DurationPoint]]) -> list[list[str]]:
    """The table's header and rows: per (run, list, system, back-end) the EER [95 % CI] at each
    duration, then per back-end the paired difference enhanced - original."""
    labels = list(dict.fromkeys(p.label for points in series.values() for p in points))
    rows = [["run", "trials", "system", "back-end", *(f"EER % at {label}" for label in labels)]]
    for (run, trials), points in series.items():
        at = {p.label: p for p in points}
        for system, backend in duration_keys(points):
            rows.append(
                [
                    run,
                    trials,
                    system,
                    backend,
                    *(
                        cell(at[label].eers.get((system, backend))) if label in at else "-"
                        for label in labels
                    ),
                ]
            )
        for backend in dict.fromkeys(b for p in points for b in p.differences):
            rows.append(
                [
                    run,
                    trials,
                    "enhanced - original",
                    backend,
                    *(
                        cell(at[label].differences.get(backend), signed=True) if label in at else "-"
                        for label in labels
                    ),
                ]
            )
    return rows


def duration_table(series: dict[tuple[str, str], list[DurationPoint]]) -> str:
    return "\n".join(text_columns(duration_rows(series)))


def write_duration_figure(points: Sequence[DurationPoint], out_dir: Path) -> tuple[Path, Path] | None:
    """eer_duration.png (a panel per run and trial list seen at two durations or more) and
    eer_duration.txt (the table, also printed); None when no list has two durations."""
    series = duration_series(points)
    if not series:
        return None
    fig = Figure(figsize=(8 * len(series), 5.5), layout="constrained")
    titles = {t.key: t.title for t in TRIAL_LISTS}
    for i, ((run, trials), found) in enumerate(series.items()):
        draw_duration(fig.add_subplot(1, len(series), i + 1), found, f"{run}: {titles.get(trials, trials)}")
    fig.suptitle(
        "EER against test duration, 95 % intervals\n(dotted: original, solid: enhanced; colour: back-end)"
    )
    table = duration_table(series)
    sources = "\n".join(f"{p.source}: {p.trials} at {p.label}" for found in series.values() for p in found)
    print(
        f"\nEER against test duration (EER in % [95 % interval]; enhanced - original: the paired "
        f"difference):\n{table}"
    )
    text_path = out_dir / f"{DURATION_NAME}.txt"
    write_text_atomic(text_path, f"results\n{sources}\n\n{table}\n")
    return save_figure(fig, out_dir / f"{DURATION_NAME}.png"), text_path


# ----------------------------------------------------------------------------------------------
# Command line


OPTIONS: Options = {
    "save_path": Option(
        None,
        list,
        f"run folder(s) holding result/scores.txt; several are compared (default "
        f"{SAVE_PATH}, none with --duration_results)",
    ),
    "out_dir": Option(None, str, "folder of the comparison figures (default: the first run's result folder)"),
    "dist_list": Option(None, str, "distribution list for the distance histograms"),
    "embed_dir": Option(None, str, "root of the original embeddings of --dist_list"),
    "enhanced_dir": Option(
        None,
        str,
        "root of the enhanced embeddings (default <save_path>/enhanced, written by m_trainer.py --generate)",
    ),
    "seed": Option(SEED, int, "seed of the different-speaker pairs"),
    "duration_results": Option(
        None,
        list,
        "--check results (check*.json) of one model on test sets of several "
        "durations: EER against duration in --out_dir (default: the first file's folder)",
    ),
    "table_results": Option(
        None,
        list,
        "--check results (check*.json) of the results table (results.md, results.tex in --out_dir), "
        "in the order of its columns (default: every result/check*.json of each run)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, OPTIONS)
    return parser


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's folder name; the path as given where two folders share a name."""
    names = [path.resolve().name for path in run_dirs]
    pairs = zip(names, run_dirs, strict=True)
    return [name if names.count(name) == 1 else str(path) for name, path in pairs]


def check_args(args: argparse.Namespace) -> list[Path]:
    """The run folders, after checking the options that go together."""
    if args.save_path is None:
        args.save_path = [] if args.duration_results else [SAVE_PATH]
    for option in ("duration_results", "table_results"):
        for path in getattr(args, option) or []:
            if not Path(path).is_file():
                raise UserError(f"--{option}: {path} not found (m_trainer.py --check writes it)")
    run_dirs = [Path(p) for p in args.save_path]
    for path in run_dirs:
        if not path.is_dir():
            raise UserError(f"save_path {path} does not exist")
    if args.dist_list and not args.embed_dir:
        raise UserError("--dist_list needs --embed_dir (the root of the original embeddings)")
    if args.embed_dir and not Path(args.embed_dir).is_dir():
        raise UserError(f"--embed_dir {args.embed_dir} does not exist")
    if args.enhanced_dir:
        if len(run_dirs) > 1:
            raise UserError("--enhanced_dir names one run's tree: give a single --save_path with it")
        if not Path(args.enhanced_dir).is_dir():
            raise UserError(f"--enhanced_dir {args.enhanced_dir} does not exist")
    return run_dirs


def curve_outputs(
    args: argparse.Namespace, run_dirs: Sequence[Path], names: Sequence[str], other_inputs: bool
) -> list[Path]:
    """fig/fig2 of one run, or the comparison figures of several runs."""
    score_files = [path / "result" / "scores.txt" for path in run_dirs]
    if len(run_dirs) == 1 and not score_files[0].exists() and other_inputs:
        print(f"skipped fig.png and fig2.png: {score_files[0]} not found")
        return []
    runs = [parse_scores(path, name) for path, name in zip(score_files, names, strict=True)]
    if len(runs) == 1:
        return write_curve_figures(runs, run_dirs[0] / "result")
    out_dir = Path(args.out_dir) if args.out_dir else run_dirs[0] / "result"
    return write_curve_figures(runs, out_dir, prefix="compare_")


def distance_outputs(args: argparse.Namespace, run_dirs: Sequence[Path], names: Sequence[str]) -> list[Path]:
    """dist_hist.png and its table for each run whose enhanced tree is there; the original
    embeddings are read once for all of them."""
    written: list[Path] = []
    study = None
    for run_dir, name in zip(run_dirs, names, strict=True):
        enhanced = Path(args.enhanced_dir) if args.enhanced_dir else run_dir / "enhanced"
        if not enhanced.is_dir():
            print(
                f"skipped {name} dist_hist.png: {enhanced} not found (m_trainer.py --generate "
                "writes it; or pass --enhanced_dir)"
            )
            continue
        study = study or pair_study(args.dist_list, args.embed_dir, args.seed)
        written += write_distance_figure(run_dir, name, study, enhanced)
    return written


def readable_points(path: Path, run: str) -> list[DurationPoint]:
    """read_duration_points, or none with a notice where the file cannot say its duration (a
    check.json of an earlier version, say) so that a run's other figures are still drawn."""
    try:
        return read_duration_points(path, run)
    except UserError as err:
        print(f"left out of {DURATION_NAME}.png: {err}")
        return []


def duration_outputs(args: argparse.Namespace, run_dirs: Sequence[Path], names: Sequence[str]) -> list[Path]:
    """EER against test duration: per run from its result/check*.json, and from the files of
    --duration_results (their run: the folder above result/)."""
    written: list[Path] = []
    for run_dir, name in zip(run_dirs, names, strict=True):
        found = [p for p in sorted((run_dir / "result").glob(CHECK_GLOB)) if not scored_enrolment(p)]
        points = [p for path in found for p in readable_points(path, name)] if len(found) > 1 else []
        outputs = write_duration_figure(points, run_dir / "result") if points else None
        if outputs is None:
            print(
                f"skipped {name} {DURATION_NAME}.png: {len(found)} --check result(s) in "
                f"{run_dir / 'result'}, no trial list at two test durations "
                "(run --check per duration with --result_tag)"
            )
        written += outputs or []
    if args.duration_results:
        paths = [Path(p) for p in args.duration_results]
        points = [p for path in paths for p in read_duration_points(path, path.resolve().parent.parent.name)]
        outputs = write_duration_figure(points, Path(args.out_dir) if args.out_dir else paths[0].parent)
        if outputs is None:
            raise UserError(
                f"--duration_results: no trial list of one run at two test durations or more in "
                f"{', '.join(map(str, paths))}"
            )
        written += outputs
    return written


def seed_outputs(args: argparse.Namespace, run_dirs: Sequence[Path], names: Sequence[str]) -> list[Path]:
    """With several runs, the across-seed summary (scoring.seeds) of those with a result/check.json,
    in --out_dir (default the first run's result folder)."""
    if len(run_dirs) < 2:
        return []
    found = [(name, path / "result" / "check.json") for path, name in zip(run_dirs, names, strict=True)]
    runs = [seed_run(name, read_records(path)) for name, path in found if path.is_file()]
    return write_seed_summary(runs, Path(args.out_dir) if args.out_dir else run_dirs[0] / "result")


def table_outputs(args: argparse.Namespace, run_dirs: Sequence[Path], names: Sequence[str]) -> list[Path]:
    """results.md and results.tex (scoring.tables) of the --check results of --table_results (their
    run: the folder above result/), else of every run's result/check.json (its full-length check;
    the tagged ones are in the duration, enrolment and seed tables), in --out_dir (default the
    first run's result folder, or the first file's)."""
    if args.table_results:
        files = [(Path(p).resolve().parent.parent.name, Path(p)) for p in args.table_results]
    else:
        files = [
            (name, path)
            for run_dir, name in zip(run_dirs, names, strict=True)
            if (path := run_dir / "result" / "check.json").is_file()
        ]
    if not files:
        print("skipped results.md and results.tex: no --check results (result/check.json)")
        return []
    default = run_dirs[0] / "result" if run_dirs else files[0][1].parent
    table = check_table([(name, path, read_records(path)) for name, path in files])
    return write_tables(table, Path(args.out_dir) if args.out_dir else default)


def seed_spread(run_dirs: Sequence[Path], names: Sequence[str], run: str) -> dict[str, str]:
    """Per back-end, the across-seed mean ± sd of enhanced - original EER on the test list of the
    runs pooled with `run` (scoring.seeds; none where it is pooled with no other run)."""
    found = [(name, path / "result" / "check.json") for path, name in zip(run_dirs, names, strict=True)]
    groups, _ = seed_groups([seed_run(name, read_records(path)) for name, path in found if path.is_file()])
    group = next((g for g in groups if any(r.name == run for r in g)), None)
    return {
        s.backend: f"{s.difference.mean():+.2f} ± {s.difference.std(ddof=1):.2f} ({len(s.seeds)} seeds)"
        for s in (summaries(group, 1) if group else [])
        if s.trials == "test"
    }


def enrolment_outputs(args: argparse.Namespace, run_dirs: Sequence[Path], names: Sequence[str]) -> list[Path]:
    """The enrolment table and figure (scoring.enrolment_table) of each run whose result/ holds
    --check results over enrolment lists: in --out_dir where one run has them, else in each
    run's result folder."""
    runs = []
    for run_dir, name in zip(run_dirs, names, strict=True):
        read = [read_enrolment_check(p) for p in sorted((run_dir / "result").glob(CHECK_GLOB))]
        checks = [c for c in read if c is not None]
        if checks:
            runs.append((run_dir, name, checks))
    written: list[Path] = []
    for run_dir, name, checks in runs:
        out_dir = Path(args.out_dir) if args.out_dir and len(runs) == 1 else run_dir / "result"
        written += write_enrolment_table(checks, out_dir, name, seed_spread(run_dirs, names, name))
    return written


def make_figures(argv: Sequence[str] | None = None) -> list[Path]:
    """Every figure whose inputs exist; returns the paths written."""
    args = build_parser().parse_args(argv)
    run_dirs = check_args(args)
    names = run_names(run_dirs)
    if not run_dirs:
        return report_written(duration_outputs(args, run_dirs, names))
    has_trials = any((run_dirs[0] / "result" / f"trials_{t.key}.npz").is_file() for t in TRIAL_LISTS)
    written = curve_outputs(args, run_dirs, names, other_inputs=has_trials or bool(args.dist_list))
    for run_dir, name in zip(run_dirs, names, strict=True):
        det = write_det_figure(run_dir, name)
        if det is None:
            print(
                f"skipped {name} det.png: no {run_dir / 'result'}/trials_*.npz "
                "(m_trainer.py --check or --eval writes them)"
            )
        written += [det] if det else []
    if args.dist_list:
        written += distance_outputs(args, run_dirs, names)
    else:
        print("skipped dist_hist.png: no --dist_list (with --embed_dir)")
    written += duration_outputs(args, run_dirs, names)
    written += seed_outputs(args, run_dirs, names)
    written += enrolment_outputs(args, run_dirs, names)
    written += table_outputs(args, run_dirs, names)
    report_written(written)
    table = results_table(run_dirs, names)
    if table:
        print(
            f"\nOriginal vs enhanced (EER in %; DCF: minDCF at P_target {P_TARGETS[0]:g}, DCF01 at "
            f"{P_TARGETS[1]:g}; "
            f"a back-end after the list's name):\n{table}"
        )
    return written


def report_written(written: list[Path]) -> list[Path]:
    for path in written:
        print(f"wrote {path}")
    return written


def results_table(run_dirs: Sequence[Path], names: Sequence[str]) -> str:
    """Original vs enhanced EER and minDCF (at P_TARGETS) of every saved trial list, one row per
    run, list and back-end; a system that was not scored shows '-'."""
    rows = []
    for run_dir, name in zip(run_dirs, names, strict=True):
        for t in TRIAL_LISTS:
            path = run_dir / "result" / f"trials_{t.key}.npz"
            if not path.is_file():
                continue
            trials = load_trial_scores(path)
            for backend in trials.backends():
                original, enhanced = (trials.scores.get((system, backend)) for system in SYSTEMS)
                rows.append(
                    comparison_row(
                        name,
                        t.title if backend == "none" else f"{t.title}, {backend}",
                        original,
                        enhanced,
                        trials.labels,
                    )
                )
    if not rows:
        return ""
    header = (
        f"{'run':<28} {'trials':<26} {'EER orig':>8} {'EER enh':>8} {'DCF orig':>9} {'DCF enh':>9} "
        f"{'DCF01 orig':>10} {'DCF01 enh':>10}"
    )
    return "\n".join([header, "-" * len(header), *rows])


def comparison_row(
    run: str, label: str, original: np.ndarray | None, enhanced: np.ndarray | None, labels: np.ndarray
) -> str:
    """One row of results_table, and whether the enhanced system lowers EER and minDCF."""
    before, after = (
        evaluate_scores(scores, labels) if scores is not None else None for scores in (original, enhanced)
    )
    cells = [f"{run:<28} {label:<26}"]
    columns = (("eer", 8, 2), (mindcf_key(P_TARGETS[0]), 9, 4), (mindcf_key(P_TARGETS[1]), 10, 4))
    for key, width, digits in columns:
        cells += [
            f"{metrics[key]:>{width}.{digits}f}" if metrics else f"{'-':>{width}}"
            for metrics in (before, after)
        ]
    verdict = (
        ""
        if before is None or after is None
        else "  "
        + ", ".join(
            f"{what} {'better' if after[key] < before[key] else 'not better'}"
            for what, key in (("EER", "eer"), ("minDCF", mindcf_key(P_TARGETS[0])))
        )
    )
    return " ".join(cells) + verdict


def main(argv: Sequence[str] | None = None) -> None:
    make_figures(argv)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
