"""Bootstrap confidence intervals over test speakers: EERs of many resamples at once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from m_utils import UserError

BOOTSTRAP_CHUNK = 2 ** 20  # trials x resamples in one chunk: each of its arrays takes 4 to 8 MB


def speaker_resamples(speakers: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, speakers) int64: how often each speaker is drawn when `speakers` speakers are
    drawn with replacement, once per resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(speakers, size=(resamples, speakers)) + speakers * np.arange(resamples)[:, None]
    return np.bincount(draws.reshape(-1), minlength=resamples * speakers).reshape(resamples, speakers)


class _RankedTrials:
    """One system's trials sorted by score (highest first), for weighted EERs of many resamples."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray, speaker: np.ndarray):
        order = np.argsort(-scores, kind="stable")
        ordered = scores[order]
        self.target = labels[order]
        self.speaker = speaker[order]
        # Trials of one score form one threshold: the curve's points are the ends of the groups.
        ends = np.append(np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1)
        self.ends = None if len(ends) == len(ordered) else ends

    def eers(self, draws: np.ndarray) -> np.ndarray:
        """EER (%) of each resample (a row of `draws`: the weight of each speaker's trials), by
        compute_eer's rule applied to the weighted list: as compute_eer of the list in which each
        trial is repeated as often as its weight (NaN where a resample lacks a class).

        compute_eer takes sklearn's ROC points, which drop a point when the next point's step
        (targets, non-targets accepted) equals its own. A threshold whose trials all weigh 0 adds
        no point there, so a point is compared with the next point that moved."""
        weight = draws[:, self.speaker]
        target_weight = weight * self.target
        targets = np.cumsum(target_weight, axis=1, dtype=weight.dtype)
        if self.ends is None:
            # One trial a point: its step is (w, 0) or (0, w), held as one number, +w or -w.
            nontargets = np.cumsum(weight, axis=1, dtype=weight.dtype)
            nontargets -= targets
            moved = weight > 0
            step = target_weight
            step -= weight - target_weight
        else:
            accepted = np.cumsum(weight, axis=1, dtype=weight.dtype)[:, self.ends]
            targets = targets[:, self.ends]
            nontargets = accepted - targets
            target_step = np.diff(targets, axis=1, prepend=0).astype(np.int64)
            nontarget_step = np.diff(nontargets, axis=1, prepend=0)
            moved = (target_step + nontarget_step) > 0
            step = target_step * (int(accepted[:, -1].max()) + 1) + nontarget_step
        del weight, target_weight
        kept = moved & _differs_from_next_moved(moved, step)
        rows = np.arange(len(kept))
        first = np.argmax(moved, axis=1)
        kept[rows, first] = moved[rows, first]
        del step, moved
        with np.errstate(divide="ignore", invalid="ignore"):
            fnr = 1 - targets / targets[:, -1:]
            fpr = nontargets / nontargets[:, -1:]
        gap = np.abs(fnr - fpr)
        gap[~kept] = np.inf
        best = np.argmin(gap, axis=1)
        eer = np.maximum(fpr[rows, best], fnr[rows, best]) * 100
        # The curve's first point (nothing accepted: FNR 1, FPR 0, gap 1) wins ties, as in compute_eer.
        eer[gap[rows, best] >= 1] = 100.0
        eer[(targets[:, -1] == 0) | (nontargets[:, -1] == 0)] = np.nan
        return eer


def _differs_from_next_moved(moved: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Per point: whether the next point that moved (along each row) takes another step, or there
    is none. Steps are non-negative integers."""
    width = moved.shape[1]
    moved_at = np.where(moved, np.arange(width, dtype=np.int32), width)
    next_moved = np.minimum.accumulate(moved_at[:, ::-1], axis=1)[:, ::-1]
    # the next moved point after each point: its own index's successor; `width`: none
    following = np.empty_like(next_moved)
    following[:, :-1] = next_moved[:, 1:]
    following[:, -1] = width
    padded = np.empty((len(step), width + 1), step.dtype)
    padded[:, :width] = step
    padded[:, width] = np.iinfo(step.dtype).min  # "no next point" differs from every step
    following += (np.arange(len(step), dtype=following.dtype) * (width + 1))[:, None]
    return padded.reshape(-1)[following] != step


def bootstrap_eer(scores: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray, trial_speakers: np.ndarray,
                  resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(systems, resamples) EERs (%) of a bootstrap over test speakers.

    `scores`: one system's scores, or a sequence of systems' scores of the same trials;
    `trial_speakers`: each trial's speaker (that of its left, enrolment, file). Each resample draws
    the speakers with replacement and keeps all their trials, a speaker drawn k times weighing its
    trials k; every system sees the same resamples, so differences between systems are paired.
    The EER of a resample follows compute_eer's rule exactly (all weights 1 give compute_eer).
    """
    systems = [np.asarray(scores)] if isinstance(scores, np.ndarray) and scores.ndim == 1 else \
        [np.asarray(s) for s in scores]
    labels = np.asarray(labels).astype(bool)
    trial_speakers = np.asarray(trial_speakers)
    if any(s.shape != labels.shape for s in systems) or trial_speakers.shape != labels.shape:
        raise UserError("bootstrap: scores, labels and trial speakers must have one value per trial")
    if not all(np.isfinite(s).all() for s in systems):
        raise UserError("bootstrap: scores must be finite")
    if resamples < 1 or len(labels) == 0:
        raise UserError("bootstrap: needs trials and at least one resample")
    speakers, speaker = np.unique(trial_speakers, return_inverse=True)
    draws = speaker_resamples(len(speakers), resamples, seed)
    # Weighted counts as int32 where no sum can overflow it (halves the memory traffic).
    if len(speakers) * np.bincount(speaker.reshape(-1)).max() < 2 ** 31:
        draws = draws.astype(np.int32)
    ranked = [_RankedTrials(s, labels, speaker.reshape(-1)) for s in systems]
    eers = np.empty((len(systems), resamples))
    step = max(1, BOOTSTRAP_CHUNK // len(labels))
    for start in range(0, resamples, step):
        for system, trials in enumerate(ranked):
            eers[system, start:start + step] = trials.eers(draws[start:start + step])
    return eers


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values (NaNs left out)."""
    finite = np.asarray(values, np.float64)
    finite = finite[~np.isnan(finite)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)

