"""Bootstrap confidence intervals over test speakers: EERs of many resamples at once."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from m_utils import UserError

RESAMPLE_BLOCK = 1024  # resamples in one block: its (resamples, bins) arrays stay a few MB


def speaker_resamples(speakers: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, speakers) int64: how often each speaker is drawn when `speakers` speakers are
    drawn with replacement, once per resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(speakers, size=(resamples, speakers)) + speakers * np.arange(resamples)[:, None]
    return np.bincount(draws.reshape(-1), minlength=resamples * speakers).reshape(resamples, speakers)


class _RankedTrials:
    """One system's trials ranked by score (highest first), for the EERs of many weighted
    resamples at a cost that does not grow as resamples x trials.

    The ranked trials are cut into bins of about sqrt(trials) trials (whole groups of tied
    scores). Each speaker's cumulative target and non-target counts at every bin's end give, by
    one matrix product with the resamples' speaker weights, every resample's ROC curve at the bin
    ends; only the bins around where the curve crosses FNR = FPR are then walked trial by trial.
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray, speaker: np.ndarray, speakers: int):
        order = np.argsort(-scores)
        ordered = scores[order]
        self.target = labels[order].astype(np.int64)
        self.speaker = speaker[order]
        trials = len(ordered)
        # Trials of one score form one threshold, one point of the curve: [group_start, last trial].
        starts_group = np.append(True, ordered[1:] != ordered[:-1])
        self.group_start = np.maximum.accumulate(np.where(starts_group, np.arange(trials), 0))
        self.ends_group = np.append(starts_group[1:], True)
        edges = np.unique(self.group_start[:: math.isqrt(trials - 1) + 1])
        self.edges = np.append(edges, trials)  # bin b holds the trials edges[b]:edges[b + 1]
        bin_of = np.repeat(np.arange(len(edges)), np.diff(self.edges))
        counts = np.bincount(
            (self.speaker * len(edges) + bin_of) * 2 + self.target, minlength=speakers * len(edges) * 2
        ).reshape(speakers, len(edges), 2)
        self.largest = int(counts.sum(axis=(1, 2)).max())  # one speaker's trials
        self.counts = counts.cumsum(axis=1).reshape(speakers, -1)  # (non-target, target) at each bin end

    def eers(self, draws: np.ndarray) -> np.ndarray:
        """EER (%) of each resample (a row of `draws`: the weight of each speaker's trials), by
        compute_eer's rule applied to the weighted list: as compute_eer of the list in which each
        trial is repeated as often as its weight (NaN where a resample lacks a class)."""
        draws = np.asarray(draws, np.int64)
        # Sums of whole numbers are exact in float32 below 2 ** 24 (and twice as fast as float64).
        exact32 = int(draws.sum(axis=1).max()) * self.largest < 2**24
        weights = draws.astype(np.float32 if exact32 else np.float64)
        at_ends = (weights @ self.counts.astype(weights.dtype)).astype(np.int64).reshape(len(draws), -1, 2)
        # (resamples, 1 + bins, 2): accepted (non-targets, targets) before each bin and after the last
        accepted = np.concatenate([np.zeros_like(at_ends[:, :1]), at_ends], axis=1)
        totals = at_ends[:, -1]
        eers = np.full(len(draws), np.nan)
        rows = np.flatnonzero(totals.min(axis=1) > 0)
        fnr, fpr = _rates(accepted[rows, 1:, 0], accepted[rows, 1:, 1], totals[rows])
        # The first bin at whose end FNR < FPR: the curve crosses inside it.
        lo = hi = np.argmax(fnr - fpr < 0, axis=1)
        while len(rows):
            eer, needs_left, needs_right = self._settle(
                draws[rows], accepted[rows, lo], accepted[rows, hi + 1], totals[rows], lo, hi
            )
            settled = ~(needs_left | needs_right)
            eers[rows[settled]] = eer[settled]
            # The window misses a kept point of the curve on one side: double it that way.
            grow = hi - lo + 1
            lo = np.where(needs_left, np.maximum(lo - grow, 0), lo)[~settled]
            hi = np.where(needs_right, np.minimum(hi + grow, len(self.edges) - 2), hi)[~settled]
            rows = rows[~settled]
        return eers

    def _settle(
        self,
        draws: np.ndarray,
        before: np.ndarray,
        after: np.ndarray,
        totals: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The EERs of resamples whose curve crosses FNR = FPR in bins lo..hi (`before`/`after`:
        the (non-targets, targets) accepted before and after those bins), with whether the window
        must grow left or right to reach the kept curve point on that side (EER NaN there).

        compute_eer takes sklearn's ROC points, which drop a point whose step (targets,
        non-targets accepted) equals the next point's, keeping the first and the last point. A
        threshold whose trials all weigh 0 adds no point. FNR - FPR falls at every point, so the
        EER is at the last kept point before the crossing (or the curve's start: FNR 1, FPR 0) or
        the first kept point after it, whichever is nearer to FNR = FPR (the earlier on a tie)."""
        nontargets, targets, step_n, step_t, moved = self._walk(draws, lo, hi)
        columns = np.arange(moved.shape[1])
        fnr, fpr = _rates(before[:, :1] + nontargets, before[:, 1:] + targets, totals)
        rows = np.arange(len(draws))
        crossed = np.argmax(moved & (fnr - fpr < 0), axis=1)  # the first point past the crossing
        following = _next_moved(moved)
        has_next = following < len(columns)
        following = np.minimum(following, len(columns) - 1)
        differs = (step_t != np.take_along_axis(step_t, following, axis=1)) | (
            step_n != np.take_along_axis(step_n, following, axis=1)
        )
        ends_curve = (after == totals).all(axis=1)[:, None]  # nothing is accepted after the window
        kept = moved & np.where(has_next, differs, ends_curve)
        unknown = moved & ~has_next & ~ends_curve
        starts_curve = before.sum(axis=1) == 0  # nothing is accepted before the window
        first = np.argmax(moved, axis=1)[starts_curve]
        kept[starts_curve, first], unknown[starts_curve, first] = True, False
        past = np.argmax((kept | unknown) & (columns >= crossed[:, None]), axis=1)
        earlier = kept & (columns < crossed[:, None])
        has_earlier = earlier.any(axis=1)
        last_earlier = len(columns) - 1 - np.argmax(earlier[:, ::-1], axis=1)
        fnr_before = np.where(has_earlier, fnr[rows, last_earlier], 1.0)
        fpr_before = np.where(has_earlier, fpr[rows, last_earlier], 0.0)
        fnr_past, fpr_past = fnr[rows, past], fpr[rows, past]
        before_wins = np.abs(fnr_before - fpr_before) <= np.abs(fnr_past - fpr_past)
        eer = np.where(before_wins, np.maximum(fpr_before, fnr_before), np.maximum(fpr_past, fnr_past)) * 100
        return eer, ~has_earlier & ~starts_curve, unknown[rows, past]

    def _walk(self, draws: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
        """Bins lo..hi of each resample trial by trial, a column per trial: the non-targets and
        targets accepted in the window up to it, the step of the curve point it ends (the
        non-targets and targets its group of tied trials adds), and whether that point moved
        (not where the column ends no group or lies past the window)."""
        start, stop = self.edges[lo], self.edges[hi + 1]
        columns = np.arange((stop - start).max())
        inside = columns < (stop - start)[:, None]
        position = np.minimum(start[:, None] + columns, len(self.target) - 1)
        weight = np.take_along_axis(draws, self.speaker[position], axis=1) * inside
        target_weight = weight * self.target[position]
        targets = np.cumsum(target_weight, axis=1)
        nontargets = np.cumsum(weight - target_weight, axis=1)
        del weight, target_weight
        group_first = self.group_start[position] - start[:, None]
        step_n = nontargets - _before(nontargets, group_first)
        step_t = targets - _before(targets, group_first)
        moved = inside & self.ends_group[position] & ((step_t > 0) | (step_n > 0))
        return nontargets, targets, step_n, step_t, moved


def _rates(nontargets: np.ndarray, targets: np.ndarray, totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FNR, FPR) of each row's accepted counts against its (non-target, target) totals, as
    compute_eer divides them."""
    return 1 - targets / totals[:, 1:], nontargets / totals[:, :1]


def _before(cumulative: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Per row, the cumulative sum before each of `columns` (0 before the first column)."""
    padded = np.concatenate([np.zeros_like(cumulative[:, :1]), cumulative], axis=1)
    return np.take_along_axis(padded, columns, axis=1)


def _next_moved(moved: np.ndarray) -> np.ndarray:
    """Per point, the column of the next point that moved along its row (the width: none)."""
    width = moved.shape[1]
    moved_at = np.where(moved, np.arange(width), width)
    following = np.full_like(moved_at, width)
    following[:, :-1] = np.minimum.accumulate(moved_at[:, :0:-1], axis=1)[:, ::-1]
    return following


def bootstrap_eer(
    scores: Sequence[np.ndarray] | np.ndarray,
    labels: np.ndarray,
    trial_speakers: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """(systems, resamples) EERs (%) of a bootstrap over test speakers.

    `scores`: one system's scores, or a sequence of systems' scores of the same trials;
    `trial_speakers`: each trial's speaker (that of its left, enrolment, file). Each resample draws
    the speakers with replacement and keeps all their trials, a speaker drawn k times weighing its
    trials k; every system sees the same resamples, so differences between systems are paired.
    The EER of a resample follows compute_eer's rule exactly (all weights 1 give compute_eer).
    """
    systems = (
        [np.asarray(scores)]
        if isinstance(scores, np.ndarray) and scores.ndim == 1
        else [np.asarray(s) for s in scores]
    )
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
    ranked = [_RankedTrials(s, labels, speaker.reshape(-1), len(speakers)) for s in systems]
    eers = np.empty((len(systems), resamples))
    for start in range(0, resamples, RESAMPLE_BLOCK):
        for system, trials in enumerate(ranked):
            eers[system, start : start + RESAMPLE_BLOCK] = trials.eers(draws[start : start + RESAMPLE_BLOCK])
    return eers


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values (NaNs left out)."""
    finite = np.asarray(values, np.float64)
    finite = finite[~np.isnan(finite)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
