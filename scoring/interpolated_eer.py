"""The EER as WeSpeaker and most papers define it: where the miss and false-alarm rates cross,
interpolated linearly between the two operating points on either side of the crossing. The
project's tables keep voxceleb_trainer's definition (metrics.compute_eer: the operating point of
sklearn's ROC curve where the two rates are closest, the larger of them); this one goes beside it."""

from __future__ import annotations

import numpy as np

from scoring.metrics import error_rates


def interpolated_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """EER in %: the rate where the miss and false-alarm rates are equal on the straight line
    between the last operating point where false alarms exceed misses and the next one."""
    miss, false_alarm, _ = error_rates(scores, labels)
    gap = false_alarm - miss  # 1 when everything is accepted, falling to -1 when nothing is
    after = int(np.flatnonzero(gap <= 0)[0])
    before = after - 1
    share = gap[before] / (gap[before] - gap[after])
    return float((miss[before] + share * (miss[after] - miss[before])) * 100)
