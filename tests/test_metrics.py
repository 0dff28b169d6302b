import numpy as np
import pytest
import torch

from m_network import SpeakerNet, compute_eer, compute_min_dcf, score_trials
from m_utils import UserError


def brute_rates(scores, labels):
    """Miss and false-alarm rates at each candidate threshold, by explicit counting."""
    thresholds = np.concatenate([np.unique(scores), [np.inf]])
    miss = np.array([(scores[labels == 1] < t).mean() for t in thresholds])
    false_alarm = np.array([(scores[labels == 0] >= t).mean() for t in thresholds])
    return miss, false_alarm


def test_eer_known_cases():
    labels = np.array([0, 0, 1, 1])
    assert compute_eer(np.array([0.1, 0.2, 0.8, 0.9]), labels)[0] == 0.0
    assert compute_eer(np.array([0.9, 0.8, 0.2, 0.1]), labels)[0] == 100.0
    assert compute_eer(np.array([0.1, 0.3, 0.2, 0.4]), labels)[0] == 50.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eer_against_counting(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(3000) < 0.3).astype(int)
    scores = rng.normal(size=3000) + 1.2 * labels
    miss, false_alarm = brute_rates(scores, labels)
    best = np.argmin(np.abs(miss - false_alarm))
    expected = 100 * max(miss[best], false_alarm[best])
    step = 100 / min(labels.sum(), (1 - labels).sum())
    eer, _ = compute_eer(scores, labels)
    assert abs(eer - expected) <= step
    assert 20 < eer < 35


@pytest.mark.parametrize("p_target", [0.05, 0.01])
def test_min_dcf_against_counting(p_target):
    rng = np.random.default_rng(5)
    labels = (rng.random(2000) < 0.5).astype(int)
    scores = rng.normal(size=2000) + 2 * labels
    miss, false_alarm = brute_rates(scores, labels)
    expected = (miss * p_target + false_alarm * (1 - p_target)).min() / min(p_target, 1 - p_target)
    assert compute_min_dcf(scores, labels, p_target) == pytest.approx(expected, abs=1e-9)
    assert compute_min_dcf(np.array([0.0, 1.0]), np.array([0, 1]), p_target) == 0.0


def test_scores_of_known_vectors_are_per_vector():
    table = np.array([[3.0, 4.0], [4.0, 3.0], [-3.0, -4.0]], np.float32)
    left, right = np.array([0, 0]), np.array([1, 2])
    np.testing.assert_allclose(score_trials(table, left, right, "C"), [-(1 - 0.96), -2.0], atol=1e-6)
    np.testing.assert_allclose(score_trials(table, left, right, "B"), [-np.sqrt(2), -10.0], atol=1e-5)
    with pytest.raises(UserError):
        score_trials(table, left, right, "A")


def test_processed_embeddings_are_normalised_per_vector():
    net = SpeakerNet("MyResidualNet", "CS", nOut=2)
    out = net.enhance(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    np.testing.assert_allclose(out.numpy(), [[0.6, 0.8], [1.0, 0.0]], atol=1e-6)
    raw = SpeakerNet("MyResidualNet", "MSE", nOut=2).enhance(torch.tensor([[3.0, 4.0]]))
    np.testing.assert_allclose(raw.numpy(), [[3.0, 4.0]])


def test_a_million_trials_score_at_once():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(2000, 64)).astype(np.float32)
    left, right = rng.integers(0, 2000, (2, 1_000_000))
    scores = score_trials(table, left, right, "C")
    i = 123_456
    a, b = table[left[i]], table[right[i]]
    assert scores[i] == pytest.approx(-(1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-5)
