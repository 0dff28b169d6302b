"""Calibration of scores to log-likelihood ratios, Cllr, and decision thresholds."""

from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from m_utils import UserError
from scoring.metrics import compute_eer, score_curve


def _two_classes(scores: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or labels.all() or not labels.any():
        raise UserError(f"{what} needs target (1) and non-target (0) trials, one score each")
    return scores, labels


def cllr(llr: np.ndarray, labels: np.ndarray) -> float:
    """Log-likelihood-ratio cost in bits: the mean of log2(1 + e^-llr) over target trials and of
    log2(1 + e^llr) over non-target trials, averaged over the two classes."""
    llr, labels = _two_classes(llr, labels, "Cllr")
    return float(
        (np.logaddexp(0, -llr[labels]).mean() + np.logaddexp(0, llr[~labels]).mean()) / (2 * np.log(2))
    )


def min_cllr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Cllr after the best monotone calibration of these very scores: pool-adjacent-violators
    (isotonic regression) gives the posterior of a target at each score under the list's own
    prior; less that prior's log-odds it is the optimal LLR."""
    scores, labels = _two_classes(scores, labels, "min Cllr")
    posterior = IsotonicRegression(y_min=0, y_max=1).fit_transform(scores, labels.astype(np.float64))
    with np.errstate(divide="ignore"):
        llr = np.log(posterior) - np.log1p(-posterior) - np.log(labels.sum() / (~labels).sum())
    return cllr(llr, labels)


def decision_thresholds(scores: np.ndarray, labels: np.ndarray, far: float = 0.01) -> dict[str, float]:
    """Thresholds (accept score >= threshold) chosen on these trials: `eer` compute_eer's, `far`
    the lowest one whose false-accept rate is at most `far`."""
    scores, labels = _two_classes(scores, labels, "decision thresholds")
    thresholds, _, nontargets = score_curve(scores, labels)
    allowed = np.floor(far * nontargets[-1] + 1e-9)
    within = np.flatnonzero(nontargets <= allowed)
    # None within: the highest score is a non-target's; a threshold above it accepts nothing.
    lowest = thresholds[within[-1]] if len(within) else np.nextafter(thresholds[0], np.inf)
    return {"eer": compute_eer(scores, labels)[1], "far": float(lowest)}


class Calibration:
    """Affine calibration of a system's scores to log-likelihood ratios, llr = slope x score + offset,
    fitted by logistic regression on a calibration trial list (held-out embeddings).

    The regression weighs both classes equally (class_weight="balanced"): its log-odds are then
    those of a target prior of 0.5, i.e. the LLR itself, whatever share of target trials the
    calibration list holds; that fit minimises Cllr on the calibration list. `thresholds` are chosen
    on the calibration list: "raw" on the scores, "llr" on the calibrated ones (decision_thresholds).
    """

    def __init__(self, slope: float, offset: float, thresholds: dict[str, dict[str, float]] | None = None):
        self.slope, self.offset = float(slope), float(offset)
        self.thresholds = thresholds or {}

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, far: float = 0.01) -> Calibration:
        scores, labels = _two_classes(scores, labels, "calibration")
        # Fitted on standardised scores, then mapped back: the solver converges alike at any scale.
        centre, scale = scores.mean(), scores.std() or 1.0
        model = LogisticRegression(C=np.inf, class_weight="balanced")
        model.fit(((scores - centre) / scale)[:, None], labels)
        slope = model.coef_[0, 0] / scale
        calibration = cls(slope, model.intercept_[0] - slope * centre)
        calibration.thresholds = {
            "raw": decision_thresholds(scores, labels, far),
            "llr": decision_thresholds(calibration.llr(scores), labels, far),
        }
        return calibration

    def llr(self, scores: np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(scores, np.float64) + self.offset

    def as_dict(self) -> dict:
        return {"slope": self.slope, "offset": self.offset, "thresholds": self.thresholds}
