"""The speaker bootstrap against its definition: every resample's EER is voxceleb_trainer's EER
(sklearn's ROC curve) of the trial list in which each speaker's trials are repeated as often as
the resample draws that speaker, on lists long enough to span many bins of ranked scores."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from scoring.bootstrap import _RankedTrials, bootstrap_eer, interval, speaker_resamples


def sklearn_eer(scores, labels):
    """voxceleb_trainer's tuneThresholdfromScore, reduced to its EER; NaN without both classes."""
    if labels.all() or not labels.any():
        return np.nan
    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
    best = int(np.nanargmin(np.abs((1 - tpr) - fpr)))
    return float(max(fpr[best], 1 - tpr[best]) * 100)


def resampled_eers(scores, labels, trial_speakers, resamples, seed):
    """The definition: per resample, the EER of the list with each trial repeated by its speaker's draws."""
    speakers, speaker = np.unique(trial_speakers, return_inverse=True)
    draws = speaker_resamples(len(speakers), resamples, seed)
    return np.array(
        [
            sklearn_eer(np.repeat(scores, weights[speaker]), np.repeat(labels, weights[speaker]))
            for weights in draws
        ]
    )


def trial_list(kind, rng):
    """(scores, labels, trial speakers) of 1,500-3,000 trials, float32 scores as scoring gives."""
    n = int(rng.integers(1500, 3000))
    labels = rng.random(n) < 0.4
    speaker = rng.integers(0, 30, n)
    if kind == "distinct":
        scores = rng.normal(size=n) + 2 * labels
    elif kind == "tied":
        scores = rng.integers(0, 12, n) + 3 * labels
    elif kind == "runs":
        # Long runs of one label and one speaker: steps repeat across many bins, and speakers not
        # drawn leave whole stretches of the ranking with no weight.
        blocks = n // 150 + 1
        labels = (rng.random(blocks) < np.linspace(0.9, 0.1, blocks))[np.arange(n) // 150]
        speaker = np.arange(n) // 100
        scores = np.linspace(1, 0, n)
    else:  # few speakers, many drawn 0 times
        speaker = rng.integers(0, 4, n)
        scores = np.round(rng.normal(size=n) + labels, 1)
    return scores.astype(np.float32), labels, speaker


@pytest.mark.parametrize("kind", ["distinct", "tied", "runs", "few_speakers"])
def test_every_resample_is_the_eer_of_its_repeated_list(kind):
    rng = np.random.default_rng(["distinct", "tied", "runs", "few_speakers"].index(kind))
    scores, labels, speaker = trial_list(kind, rng)
    other = (scores + rng.normal(size=len(scores)).astype(np.float32)).astype(np.float32)
    # `-scores`: an EER above 50 %, where the curve crosses FNR = FPR among its first points.
    eers = bootstrap_eer([scores, other, -scores], labels, speaker, resamples=40, seed=5)
    for system, expected in zip(eers, (scores, other, -scores), strict=True):
        np.testing.assert_array_equal(system, resampled_eers(expected, labels, speaker, 40, 5))
    assert np.ptp(eers[0][~np.isnan(eers[0])]) > 0


def test_paired_difference_interval_is_that_of_the_definition():
    rng = np.random.default_rng(4)
    scores, labels, speaker = trial_list("distinct", rng)
    other = (scores + rng.normal(size=len(scores))).astype(np.float32)
    eers = bootstrap_eer([scores, other], labels, speaker, resamples=60, seed=2)
    expected = resampled_eers(other, labels, speaker, 60, 2) - resampled_eers(scores, labels, speaker, 60, 2)
    assert interval(eers[1] - eers[0]) == interval(expected)
    assert interval(eers[1] - eers[0])[0] > 0  # the noisier system is worse in nearly every resample


def test_one_resample_of_every_speaker_once_is_the_eer():
    """Draws of all 1 (a resample equal to the list) give the EER of the list itself."""
    rng = np.random.default_rng(6)
    scores, labels, speaker = trial_list("tied", rng)
    ones = np.ones((1, len(np.unique(speaker))), np.int64)
    ranked = _RankedTrials(scores, labels, np.unique(speaker, return_inverse=True)[1], ones.shape[1])
    assert ranked.eers(ones)[0] == sklearn_eer(scores, labels)


def test_weights_too_large_for_float32_sums_give_the_same_eers():
    """Scaling every weight by 2 ** 20 leaves each EER as it is (the same ratios), and takes the
    float64 matrix product where float32 sums would no longer be exact."""
    rng = np.random.default_rng(7)
    scores, labels, speaker = trial_list("tied", rng)
    speakers, speaker = np.unique(speaker, return_inverse=True)
    ranked = _RankedTrials(scores, labels, speaker, len(speakers))
    draws = speaker_resamples(len(speakers), 30, 1)
    np.testing.assert_array_equal(ranked.eers(draws * 2**20), ranked.eers(draws))
