"""Does the enhanced single utterance verify like an enrolment of several? The table of one run's
--check results over enrolment lists (`enroll_list`) of K = 1, 3, 5, ... utterances per model on
the same test utterances: per condition (the test and enrolment durations) and back-end, the EER
[95 % interval] of each system and K, and the share of the single-to-multi-utterance gap the
enhancer closes, (EER_orig_1 - EER_enh_1) / (EER_orig_1 - EER_orig_K).

The share's interval comes from a joint bootstrap: the K lists share their test utterances and
speakers, so each resample draws the same speakers for every K (the draws of scoring.bootstrap,
one seed for all lists) and the share is computed per resample."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m_DataLoader import read_trials
from m_utils import UserError, atomic_write, write_text_atomic
from scoring.bootstrap import bootstrap_eer, interval
from scoring.enrollment import read_spk2utt
from scoring.report import SYSTEMS, result_name, text_columns
from scoring.seeds import markdown_table
from stores.open import open_embeddings

ENROLMENT_NAME = "enrolment"  # enrolment.txt, .md and .png
FULL = "full length"
# EERs closer than this (in %) are equal (a difference of rounding): no gap to close
NO_GAP = 1e-9
Interval = tuple[float, float, float]  # value, low, high


@dataclass
class EnrolmentCheck:
    """One --check over an enrolment list: its models' size K, its condition, the EER [interval]
    per (system, back-end) from its check.json, and every trial's scores, label and speaker (of
    its model) from its trials npz."""

    source: Path
    k: int
    condition: str
    eers: dict[tuple[str, str], Interval]
    scores: dict[tuple[str, str], np.ndarray]
    labels: np.ndarray
    speakers: np.ndarray


def _shown(record: dict) -> float:
    return record["eer_interpolated"] if record.get("eer_shown") == "interpolated" else record["eer"]


def _crop(root: str) -> float | None:
    """The max_seconds of an embedding root's manifest (None: full length)."""
    return (open_embeddings(root).manifest or {}).get("max_seconds")


def condition_of(test_root: str, enroll_root: str) -> str:
    """`full length`, or the test and enrolment durations where either is cropped."""
    test, enrol = (_crop(root) for root in (test_root, enroll_root))
    if test is None and enrol is None:
        return FULL
    test_text, enrol_text = (FULL if crop is None else f"{crop:g} s" for crop in (test, enrol))
    return f"test {test_text}, enrolment {enrol_text}"


def model_size(spk2utt: Mapping[str, list[str]], path: str) -> int:
    """The K of an enrolment list: every model's number of utterances (a UserError if they differ)."""
    sizes = {len(utterances) for utterances in spk2utt.values()}
    if len(sizes) != 1:
        raise UserError(f"{path}: models of {sorted(sizes)} utterances: the table needs one K per list")
    return sizes.pop()


def _enrolment_options(records: list[dict]) -> dict | None:
    """The options of the run behind a check's records where it scored an enrolment list."""
    model = next((r.get("model") for r in records if "sources" in r), None) or {}
    options = model.get("options") or {}
    return options if options.get("enroll_list") else None


def scored_enrolment(path: Path) -> bool:
    """Whether a check*.json holds the results of an enrolment list (not a duration of the test list)."""
    try:
        return _enrolment_options(json.loads(path.read_text())) is not None
    except (OSError, ValueError):
        return False


def read_enrolment_check(path: Path) -> EnrolmentCheck | None:
    """The EnrolmentCheck of a check*.json; None where its run scored no enrolment list."""
    records = json.loads(path.read_text())
    options = _enrolment_options(records)
    if options is None:
        return None
    spk2utt = read_spk2utt(options["enroll_list"])
    test_root = options["test_path"]
    enroll_root = options.get("enroll_path") or test_root
    npz = path.parent / result_name("trials_test.npz", options.get("result_tag"))
    with np.load(npz, allow_pickle=False) as data:
        scores = {tuple(key.split("/", 1)): np.asarray(data[key]) for key in data.files if "/" in key}
        labels = np.asarray(data["labels"])
    trial_labels, left, _, names = read_trials(options["test_list"])
    if not np.array_equal(trial_labels, labels):
        raise UserError(f"{npz}: its trials are not those of {options['test_list']} (run --check again)")
    firsts = [spk2utt[names[row]][0] for row in left]
    speakers = np.asarray(open_embeddings(enroll_root).speaker_of(firsts))
    eers = {
        (r["system"], r["backend"]): (_shown(r), *r["eer_ci95"])
        for r in records
        if r.get("trials") == "test" and "eer" in r
    }
    return EnrolmentCheck(
        path,
        model_size(spk2utt, options["enroll_list"]),
        condition_of(test_root, enroll_root),
        eers,
        scores,
        labels,
        speakers,
    )


def gap_share(
    single: EnrolmentCheck, several: EnrolmentCheck, backend: str, resamples: int, seed: int
) -> tuple[Interval, Interval]:
    """The share of the gap between single-utterance (K = 1) and K-utterance original EER that the
    enhanced single utterance closes, and the EER difference enhanced K=1 - original K, each with
    its 95 % interval from resamples of the speakers drawn alike for both lists (NaN where a list
    lacks the scores)."""
    original, enhanced = (single.scores.get((system, backend)) for system in SYSTEMS)
    enrolled = several.scores.get((SYSTEMS[0], backend))
    if original is None or enhanced is None or enrolled is None:
        return (np.nan, np.nan, np.nan), (np.nan, np.nan, np.nan)
    if set(np.unique(single.speakers)) != set(np.unique(several.speakers)):
        raise UserError(
            f"{single.source} and {several.source}: their models' speakers differ: the share of "
            "the gap needs lists of the same speakers (m_gen_list.py --lists enroll writes them)"
        )
    one = bootstrap_eer([original, enhanced], single.labels, single.speakers, resamples, seed)
    (many,) = bootstrap_eer([enrolled], several.labels, several.speakers, resamples, seed)
    gaps = one[0] - many
    no_gap = np.abs(gaps) < NO_GAP
    shares = np.where(no_gap, np.nan, (one[0] - one[1]) / np.where(no_gap, 1.0, gaps))
    original_1, enhanced_1, original_k = (
        single.eers[(SYSTEMS[0], backend)][0],
        single.eers[(SYSTEMS[1], backend)][0],
        several.eers[(SYSTEMS[0], backend)][0],
    )
    share = (share_of(original_1, enhanced_1, original_k), *interval(shares))
    return share, (enhanced_1 - original_k, *interval(one[1] - many))


def share_of(original_1: float, enhanced_1: float, original_k: float) -> float:
    """(EER_orig_1 - EER_enh_1) / (EER_orig_1 - EER_orig_K); NaN where there is no gap."""
    gap = original_1 - original_k
    return (original_1 - enhanced_1) / gap if abs(gap) >= NO_GAP else float("nan")


@dataclass
class EnrolmentTable:
    """The rows of the table and the values the figure draws, per condition and back-end."""

    sizes: list[int]
    eers: dict[tuple[str, str, str], dict[int, Interval]]  # (condition, back-end, system) -> K -> EER
    shares: dict[tuple[str, str], dict[int, Interval]]  # (condition, back-end) -> K -> share
    against: dict[tuple[str, str], dict[int, Interval]]  # ... -> K -> EER enhanced K=1 - original K


def enrolment_table(checks: Sequence[EnrolmentCheck], resamples: int = 1000, seed: int = 0) -> EnrolmentTable:
    """The table of a run's enrolment checks; shares need a K = 1 check of the same condition."""
    sizes = sorted({c.k for c in checks})
    by_key = {(c.condition, c.k): c for c in checks}
    if len(by_key) < len(checks):
        raise UserError(
            "two enrolment checks of one K and condition: "
            + ", ".join(str(c.source) for c in checks)
            + " (give each its own result_tag and remove the other)"
        )
    eers: dict[tuple[str, str, str], dict[int, Interval]] = {}
    shares: dict[tuple[str, str], dict[int, Interval]] = {}
    against: dict[tuple[str, str], dict[int, Interval]] = {}
    for check in checks:
        for (system, backend), value in check.eers.items():
            eers.setdefault((check.condition, backend, system), {})[check.k] = value
    for (condition, k), check in sorted(by_key.items()):
        single = by_key.get((condition, 1))
        if single is None or k == 1:
            continue
        for backend in dict.fromkeys(b for _, b in single.eers):
            share, difference = gap_share(single, check, backend, resamples, seed)
            shares.setdefault((condition, backend), {})[k] = share
            against.setdefault((condition, backend), {})[k] = difference
    return EnrolmentTable(sizes, eers, shares, against)


def _cell(value: Interval | None, digits: int = 2) -> str:
    if value is None or np.isnan(value[0]):
        return "-"
    return f"{value[0]:.{digits}f} [{value[1]:.{digits}f}, {value[2]:.{digits}f}]"


def table_rows(table: EnrolmentTable, seed_spread: Mapping[str, str] | None = None) -> list[list[str]]:
    """Per condition and back-end: a row per system (EER [95 % interval] per K), then the share of
    the gap closed per K > 1; `seed_spread` (back-end -> text) fills the last column of the
    full-length enhanced rows."""
    spread = seed_spread or {}
    rows = [["condition", "back-end", "row", *(f"K = {k}" for k in table.sizes), "across seeds"]]
    conditions = dict.fromkeys(c for c, _, _ in table.eers)
    for condition in sorted(conditions, key=lambda c: (c != FULL, c)):
        for backend in dict.fromkeys(b for c, b, _ in table.eers if c == condition):
            for system in SYSTEMS:
                found = table.eers.get((condition, backend, system), {})
                extra = spread.get(backend, "-") if condition == FULL and system == SYSTEMS[1] else "-"
                rows.append(
                    [condition, backend, f"EER {system}", *(_cell(found.get(k)) for k in table.sizes), extra]
                )
            for label, joint in (("enh. 1 - orig. K", table.against), ("gap closed", table.shares)):
                if (condition, backend) in joint:
                    values = joint[(condition, backend)]
                    rows.append(
                        [condition, backend, label, *(_cell(values.get(k)) for k in table.sizes), "-"]
                    )
    return rows


HEADING = """\
Enrolment: EER in % [95 % interval over resamples of the test speakers] of models of K utterances
against the same test utterances (K = 1: single utterances).
enh. 1 - orig. K: EER enhanced K=1 - EER original K, its interval from resamples that draw the
  same speakers for both lists (below 0: one enhanced utterance beats K original ones).
gap closed: (EER original K=1 - EER enhanced K=1) / (EER original K=1 - EER original K), the share
  of the single-to-multi-utterance gap the enhancer closes (1: an enhanced single utterance
  verifies like K original ones; above 1, better), with its interval from resamples that draw the
  same speakers for both lists.
across seeds: enhanced - original EER on the full single-utterance test list, mean ± sd over the
  training seeds (seeds.txt)."""


def draw_enrolment(table: EnrolmentTable, path: Path, title: str) -> Path:
    """EER [interval] against K per system and back-end, one panel per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = sorted(dict.fromkeys(c for c, _, _ in table.eers), key=lambda c: (c != FULL, c))
    fig, axes = plt.subplots(1, len(conditions), figsize=(6 * len(conditions), 4.5), squeeze=False)
    backends = list(dict.fromkeys(b for _, b, _ in table.eers))
    for ax, condition in zip(axes[0], conditions, strict=True):
        for (c, backend, system), found in table.eers.items():
            if c != condition:
                continue
            ks = sorted(found)
            values = np.array([found[k] for k in ks])
            ax.errorbar(
                np.array(ks) + 0.06 * (SYSTEMS.index(system) - 0.5),
                values[:, 0],
                yerr=[values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]],
                color=f"C{backends.index(backend)}",
                linestyle="-" if system == SYSTEMS[0] else "--",
                marker="o" if system == SYSTEMS[0] else "s",
                capsize=3,
                label=f"{system}, {backend}",
            )
        ax.set_xticks(table.sizes)
        ax.set_xlabel("enrolment utterances per model (K)")
        ax.set_ylabel("EER % (95 % interval)")
        ax.set_title(condition)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
    return path


def write_enrolment_table(
    checks: Sequence[EnrolmentCheck],
    out_dir: Path,
    title: str,
    seed_spread: Mapping[str, str] | None = None,
    resamples: int = 1000,
) -> list[Path]:
    """Print the table of these checks and write enrolment.txt, .md and .png in out_dir."""
    table = enrolment_table(checks, resamples)
    rows = table_rows(table, seed_spread)
    text = "\n".join([HEADING, f"run: {title}", "", *text_columns(rows)]) + "\n"
    print(f"\n{text}", end="")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{ENROLMENT_NAME}.txt", out_dir / f"{ENROLMENT_NAME}.md"]
    write_text_atomic(written[0], text)
    write_text_atomic(written[1], "\n".join([HEADING, "", f"run: {title}", "", markdown_table(rows)]) + "\n")
    written.append(
        draw_enrolment(table, out_dir / f"{ENROLMENT_NAME}.png", f"{title}: EER against enrolment size")
    )
    return written
