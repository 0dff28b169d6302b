"""The interpolated EER (issue 26, item 8) against a direct computation and beside the project's."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.metrics import compute_eer, interpolated_eer


def direct_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """By hand: the rates at each distinct threshold (a trial is accepted when its score is at
    least the threshold), and the crossing of the two rates on the segment where their order turns."""
    points = [(0.0, 1.0)]
    for threshold in sorted(set(scores.tolist())):
        accepted = scores > threshold
        points.append((float(np.mean(~accepted[labels == 1])), float(np.mean(accepted[labels == 0]))))
    for (miss0, fa0), (miss1, fa1) in zip(points, points[1:], strict=False):
        if fa0 > miss0 and fa1 <= miss1:
            share = (fa0 - miss0) / ((fa0 - miss0) - (fa1 - miss1))
            return 100 * (miss0 + share * (miss1 - miss0))
    raise AssertionError("the rates never cross")


def test_a_hand_example_differs_from_the_default_eer():
    # points (miss, false alarm): (0, 1), (0, .5), (1/3, .5), (1/3, 0), ...: they cross at 1/3,
    # where voxceleb_trainer's EER takes the closer point's larger rate, 50 %
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2], np.float32)
    labels = np.array([1, 1, 1, 0, 0])
    assert interpolated_eer(scores, labels) == pytest.approx(100 / 3)
    assert compute_eer(scores, labels)[0] == pytest.approx(50.0)


@pytest.mark.parametrize("seed", range(5))
def test_random_scores_equal_the_direct_computation(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.standard_normal(300) + labels, 1).astype(np.float32)  # ties included
    assert interpolated_eer(scores, labels) == pytest.approx(direct_eer(scores, labels))
    assert abs(interpolated_eer(scores, labels) - compute_eer(scores, labels)[0]) < 5
