"""The results of scoring trial lists as typed records, their table, and the files they are
saved in: result/check.json or eval.json (the records), trials_<list>.npz (every trial's score,
for the viewer) and eval_scores_<list>[_<back-end>].txt (`score label path1 path2`). With a
result tag T (m_trainer.py --result_tag, e.g. one per test duration) each name gains `_T` before
its suffix: check_T.json, trials_<list>_T.npz, eval_scores_<list>[_<back-end>]_T.txt."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m_utils import UserError, atomic_write, write_text_atomic
from scoring.bootstrap import bootstrap_eer, interval
from scoring.calibration import Calibration, cllr, min_cllr
from scoring.metrics import P_TARGETS, evaluate_scores, mindcf_key

SYSTEMS = ("original", "enhanced")
# Names in a trials_<list>.npz of each system's none back-end scores: all that files of earlier
# versions hold, still written beside `<system>/<back-end>` for readers of those files.
NONE_ALIASES = {"original": "original", "processed": "enhanced"}
THRESHOLD_NAMES = {"eer": "equal error", "far": "false accepts 1 %"}
# The EER definitions a table may show (option `eer`): voxceleb_trainer's on the ROC points
# (compute_eer, the default) or interpolated where the miss and false-alarm rates cross.
EER_DEFINITIONS = ("roc", "interpolated")

Key = tuple[str, str]  # (system, back-end)


@dataclass(frozen=True)
class TrialListName:
    """A trial list the trainer scores, named once: its key in records and file names
    (trials_<key>.npz), its options, its name in the --check lines and scores.txt, and its
    title in the viewer's table."""

    key: str
    list_option: str
    path_option: str
    check_label: str
    scorefile_suffix: str
    title: str


TRIAL_LISTS = (
    TrialListName("test", "test_list", "test_path", "testset", "", "test list"),
    TrialListName("libri", "test_list_libri", "test_path_libri", "libriset", "_LIBRI", "LibriSpeech list"),
)


@dataclass
class Record:
    """A record of check.json / eval.json; its JSON is its fields unless a subclass says otherwise."""

    def as_json(self) -> dict:
        return asdict(self)


@dataclass
class SystemResult(Record):
    """One (trial list, system, back-end): EER % with its 95 % bootstrap interval, minDCF at each
    of P_TARGETS, and with a calibration Cllr and min Cllr. `eer` is compute_eer's; beside it the
    interpolated EER, and which of the two (EER_DEFINITIONS) the tables show."""

    trials: str
    system: str
    backend: str
    eer: float
    eer_ci95: list[float]
    mindcf: dict[float, float]
    cllr: float | None = None
    min_cllr: float | None = None
    eer_interpolated: float = math.nan  # nan: not recorded (a check.json from before it was)
    eer_shown: str = "roc"

    def shown_eer(self) -> float:
        return self.eer_interpolated if self.eer_shown == "interpolated" else self.eer

    def as_json(self) -> dict:
        record = {
            "trials": self.trials,
            "system": self.system,
            "backend": self.backend,
            "eer": self.eer,
            "eer_ci95": self.eer_ci95,
            "eer_interpolated": self.eer_interpolated,
            "eer_shown": self.eer_shown,
            **{mindcf_key(p): self.mindcf[p] for p in P_TARGETS},
        }
        if self.cllr is not None:
            record.update(cllr=self.cllr, min_cllr=self.min_cllr)
        return record


@dataclass
class Difference(Record):
    """The paired EER difference enhanced - original of one back-end on one trial list (its
    interval from the bootstrap of compute_eer's EER), of both EER definitions."""

    trials: str
    backend: str
    eer_diff: float
    eer_diff_ci95: list[float]
    eer_diff_interpolated: float = math.nan
    eer_shown: str = "roc"

    def shown_diff(self) -> float:
        return self.eer_diff_interpolated if self.eer_shown == "interpolated" else self.eer_diff


@dataclass
class Decision(Record):
    """How a threshold chosen on calib_list (`eer` or `far`) decides on a trial list."""

    trials: str
    system: str
    backend: str
    threshold: str
    raw_threshold: float
    llr_threshold: float
    far: float
    miss: float


@dataclass
class CalibrationResult(Record):
    """The calibration of one (system, back-end), fitted on calib_list."""

    system: str
    backend: str
    calibration: Calibration

    def as_json(self) -> dict:
        return {
            "trials": "calib",
            "system": self.system,
            "backend": self.backend,
            **self.calibration.as_dict(),
        }


@dataclass
class ListSource:
    """Where a list's embeddings came from: the list file, its entries (trials, or utterances
    of a training list), the embedding root and its manifest.json (None where there is none)."""

    path: str
    count: int
    embeddings: str
    manifest: dict | None = None


@dataclass
class Sources(Record):
    """The provenance of a run's results: every list scored or fitted on (test, libri, calib,
    train) and the model. Written as one record whose `trials` is null."""

    lists: dict[str, ListSource] = field(default_factory=dict)
    model: dict[str, Any] | None = None

    def as_json(self) -> dict:
        return {
            "trials": None,
            "sources": {name: asdict(source) for name, source in self.lists.items()},
            "model": self.model,
        }


def list_records(
    trials: str,
    scores: Mapping[Key, np.ndarray],
    labels: np.ndarray,
    trial_speakers: np.ndarray,
    calibrations: Mapping[Key, Calibration] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    eer_shown: str = "roc",
) -> list[SystemResult | Difference]:
    """The records of one trial list: per (system, back-end) of `scores` a SystemResult (Cllr
    where a calibration of it is given); then per back-end scored by both SYSTEMS the paired
    Difference enhanced - original (the same resamples for both). `eer_shown`: the EER
    definition the tables show."""
    records, differences = [], []
    for backend in dict.fromkeys(backend for _, backend in scores):
        systems = [system for system, name in scores if name == backend]
        eers = bootstrap_eer(
            [scores[(system, backend)] for system in systems], labels, trial_speakers, resamples, seed
        )
        point = {}
        for system, sample in zip(systems, eers, strict=True):
            records.append(
                system_result(
                    trials,
                    system,
                    backend,
                    scores[(system, backend)],
                    labels,
                    sample,
                    (calibrations or {}).get((system, backend)),
                )
            )
            records[-1].eer_shown = eer_shown
            point[system] = records[-1]
        if all(system in systems for system in SYSTEMS):
            original, enhanced = (systems.index(system) for system in SYSTEMS)
            before, after = point[SYSTEMS[0]], point[SYSTEMS[1]]
            differences.append(
                Difference(
                    trials,
                    backend,
                    after.eer - before.eer,
                    list(interval(eers[enhanced] - eers[original])),
                    after.eer_interpolated - before.eer_interpolated,
                    eer_shown,
                )
            )
    return records + differences


def system_result(
    trials: str,
    system: str,
    backend: str,
    scores: np.ndarray,
    labels: np.ndarray,
    resampled_eers: np.ndarray,
    calibration: Calibration | None,
) -> SystemResult:
    metrics = evaluate_scores(scores, labels)
    result = SystemResult(
        trials,
        system,
        backend,
        metrics["eer"],
        list(interval(resampled_eers)),
        {p: metrics[mindcf_key(p)] for p in P_TARGETS},
        eer_interpolated=metrics["eer_interpolated"],
    )
    if calibration is not None:
        result.cllr, result.min_cllr = cllr(calibration.llr(scores), labels), min_cllr(scores, labels)
    return result


def decision_records(
    trials: str, scores: Mapping[Key, np.ndarray], labels: np.ndarray, calibrations: Mapping[Key, Calibration]
) -> list[Decision]:
    """How the thresholds chosen on the calibration list decide on this trial list: per calibrated
    (system, back-end) and per threshold (`eer`, `far`), the raw and calibrated (LLR) thresholds
    with the false-accept and miss rates they give here."""
    records = []
    targets = np.asarray(labels).astype(bool)
    for (system, backend), calibration in calibrations.items():
        if (system, backend) not in scores:
            continue
        for kind in ("eer", "far"):
            raw = calibration.thresholds["raw"][kind]
            # compared in float64, as the thresholds are (one may lie between two float32 values)
            accepted = np.asarray(scores[(system, backend)]) >= np.float64(raw)
            records.append(
                Decision(
                    trials,
                    system,
                    backend,
                    kind,
                    raw,
                    calibration.thresholds["llr"][kind],
                    float(accepted[~targets].mean()),
                    float(1 - accepted[targets].mean()),
                )
            )
    return records


# ----------------------------------------------------------------------------------------------
# The table


def text_columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines of left-aligned columns, with a rule under the first (the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return [lines[0], "-" * max(len(line) for line in lines), *lines[1:]]


def _ci(values: Sequence[float]) -> str:
    return f"[{values[0]:.2f}, {values[1]:.2f}]"


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _system_rows(results: list[SystemResult]) -> list[list[str]]:
    calibrated = any(r.cllr is not None for r in results)
    rows = [
        ["trials", "system", "back-end", "EER %", "[95 % CI]", *(f"minDCF {p:g}" for p in P_TARGETS)]
        + (["Cllr", "min Cllr"] if calibrated else [])
    ]
    for r in results:
        rows.append(
            [
                r.trials,
                r.system,
                r.backend,
                f"{r.shown_eer():.2f}",
                _ci(r.eer_ci95),
                *(f"{r.mindcf[p]:.4f}" for p in P_TARGETS),
            ]
            + ([_optional(r.cllr), _optional(r.min_cllr)] if calibrated else [])
        )
    return rows


def _difference_rows(differences: list[Difference]) -> list[list[str]]:
    rows = [["trials", "back-end", "EER enhanced - original", "[95 % CI]", "excludes 0"]]
    for r in differences:
        lo, hi = r.eer_diff_ci95
        rows.append(
            [
                r.trials,
                r.backend,
                f"{r.shown_diff():+.2f}",
                _ci(r.eer_diff_ci95),
                "yes" if lo > 0 or hi < 0 else "no",
            ]
        )
    return rows


def _decision_rows(decisions: list[Decision]) -> list[list[str]]:
    rows = [
        [
            "trials",
            "system",
            "back-end",
            "threshold (chosen on calib_list)",
            "raw score",
            "LLR",
            "false accepts %",
            "misses %",
        ]
    ]
    for r in decisions:
        rows.append(
            [
                r.trials,
                r.system,
                r.backend,
                THRESHOLD_NAMES[r.threshold],
                f"{r.raw_threshold:.4f}",
                f"{r.llr_threshold:.3f}",
                f"{100 * r.far:.2f}",
                f"{100 * r.miss:.2f}",
            ]
        )
    return rows


def records_table(records: Sequence[Record]) -> str:
    """Plain-text table of the records: one row per SystemResult with EER % [95 % CI], minDCF at
    P_TARGETS (and Cllr, min Cllr where calibrated); then the paired EER differences enhanced -
    original, their intervals and whether those exclude 0; then the calibration list's decisions."""
    lines: list[str] = []
    for kind, rows_of in (
        (SystemResult, _system_rows),
        (Difference, _difference_rows),
        (Decision, _decision_rows),
    ):
        chosen: list[Any] = [r for r in records if isinstance(r, kind)]
        if chosen:
            lines += ([""] if lines else []) + text_columns(rows_of(chosen))
    return "\n".join(lines)


def table_heading(resamples: int, eer_shown: str = "roc") -> str:
    targets = " and ".join(f"{p:g}" for p in P_TARGETS)
    which = (
        "EER in % (interpolated where the miss and false-alarm rates cross; the interval is that of "
        "voxceleb_trainer's EER)"
        if eer_shown == "interpolated"
        else "EER in %"
    )
    return (
        f"{which} with its 95 % interval over {resamples} resamples of the test speakers; "
        f"minDCF at P_target {targets}:"
    )


# ----------------------------------------------------------------------------------------------
# Files

TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_result_tag(tag: str | None) -> None:
    """A result tag goes into file names: letters, digits, dots, underscores and dashes."""
    if tag is not None and not TAG_PATTERN.fullmatch(tag):
        raise UserError(
            f"option 'result_tag' must be letters, digits, '.', '_' or '-' (starting with "
            f"a letter or digit), found {tag!r}"
        )


def result_name(name: str, tag: str | None = None) -> str:
    """A result file's name with the result tag before its suffix: check.json -> check_1s.json;
    the name itself without a tag."""
    if not tag:
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}_{tag}{dot}{suffix}" if dot else f"{name}_{tag}"


def write_records(path: Path, records: Sequence[Record]) -> None:
    """The records as a JSON list (check.json, eval.json), written atomically."""
    write_text_atomic(path, json.dumps([r.as_json() for r in records], indent=1) + "\n")


def save_trial_scores(
    path: Path, labels: np.ndarray, embedding_type: str, scores: Mapping[Key, np.ndarray], source: str = ""
) -> Path:
    """trials_<list>.npz: labels, embedding type, the trial list's `source` (its list and
    embeddings), and the scores of every (system, back-end) as `<system>/<back-end>`; `original` and
    `processed` (NONE_ALIASES) are the none back-end's. The scores of the systems this run did not
    score are kept from the file it replaces when that one holds the same trials (--eval scores the
    enhanced system alone, and keeps the original scores of a --check before it)."""
    systems = {system for system, _ in scores}
    kept = {
        key: values
        for key, values in earlier_scores(path, labels, embedding_type, source).items()
        if key[0] not in systems
    }
    every = {**kept, **scores}
    arrays: dict[str, Any] = {f"{system}/{backend}": values for (system, backend), values in every.items()}
    arrays.update(
        {
            alias: every[(system, "none")]
            for alias, system in NONE_ALIASES.items()
            if (system, "none") in every
        }
    )
    atomic_write(
        path,
        lambda handle: np.savez(
            handle, labels=labels, embedding_type=np.array(embedding_type), source=np.array(source), **arrays
        ),
    )
    return path


def earlier_scores(path: Path, labels: np.ndarray, embedding_type: str, source: str) -> dict[Key, np.ndarray]:
    """The (system, back-end) scores of an earlier trials_<list>.npz of the same trials (same
    source, labels and embedding type); none where it is missing, unreadable or of other trials."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError):
        return {}
    same = (
        str(arrays.get("source", "")) == source
        and str(arrays.get("embedding_type", "")) == embedding_type
        and np.array_equal(arrays.get("labels", np.empty(0)), labels)
    )
    if not same:
        return {}
    return {
        tuple(key.split("/", 1)): values
        for key, values in arrays.items()
        if "/" in key and len(values) == len(labels)
    }


def write_score_file(
    path: Path,
    scores: np.ndarray,
    labels: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    files: Sequence[str],
) -> None:
    """One `score label path1 path2` line per trial (the original repository's eval format)."""
    lines = [
        f"{score:.6f} {target} {files[i]} {files[j]}"
        for score, target, i, j in zip(scores, labels, left, right, strict=True)
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")
