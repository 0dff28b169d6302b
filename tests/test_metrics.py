import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from m_network import SpeakerNet
from m_utils import UserError
from scoring.metrics import (
    P_TARGETS,
    _score_on_device,
    compute_eer,
    compute_min_dcf,
    error_rates,
    evaluate_scores,
    mindcf_key,
    score_curve,
    score_trials,
)
from stores.arrays import embedding_type_of


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
    np.testing.assert_allclose(score_trials(table, left, right, True), [-(1 - 0.96), -2.0], atol=1e-6)
    np.testing.assert_allclose(score_trials(table, left, right, False), [-np.sqrt(2), -10.0], atol=1e-5)
    with pytest.raises(UserError):
        embedding_type_of("A")  # an embedding type other than B and C is the user's error
    with pytest.raises(TypeError):
        score_trials(table, left, right, "C")  # scoring takes cosine: bool, never a type's name


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
    scores = score_trials(table, left, right, True)
    i = 123_456
    a, b = table[left[i]], table[right[i]]
    assert scores[i] == pytest.approx(-(1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-5)


def sklearn_eer(scores, labels):
    """voxceleb_trainer's tuneThresholdfromScore, reduced to its EER and threshold."""
    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=1)
    best = int(np.nanargmin(np.abs((1 - tpr) - fpr)))
    return float(max(fpr[best], 1 - tpr[best]) * 100), float(thresholds[best])


def random_trials(rng, tied):
    n = int(rng.integers(2, 80))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = (
        rng.integers(0, int(rng.integers(1, 6)), n).astype(np.float32)
        if tied
        else rng.normal(size=n) + labels
    )
    return scores, labels


@pytest.mark.parametrize("tied", [False, True])
def test_eer_is_exactly_sklearns_roc_eer(tied):
    rng = np.random.default_rng(7)
    for _ in range(400):
        scores, labels = random_trials(rng, tied)
        assert compute_eer(scores, labels) == sklearn_eer(scores, labels)
        assert evaluate_scores(scores, labels)["eer"] == sklearn_eer(scores, labels)[0]


def test_rates_count_tied_scores_as_one_threshold():
    rng = np.random.default_rng(8)
    for _ in range(200):
        scores, labels = random_trials(rng, tied=True)
        miss, false_alarm, thresholds = error_rates(scores, labels)
        expected_miss, expected_fa = brute_rates(scores, labels)
        np.testing.assert_allclose(miss, expected_miss, atol=1e-12)
        np.testing.assert_allclose(false_alarm, expected_fa, atol=1e-12)
        assert len(thresholds) == len(miss) and np.all(np.diff(thresholds) > 0)
        result = evaluate_scores(scores, labels)
        assert result["mindcf_p05"] == pytest.approx(compute_min_dcf(scores, labels, 0.05), abs=1e-12)
        assert result["mindcf_p01"] == pytest.approx(compute_min_dcf(scores, labels, 0.01), abs=1e-12)
        assert [mindcf_key(p) for p in P_TARGETS] == ["mindcf_p05", "mindcf_p01"]


@pytest.mark.parametrize("embedding_type", ["B", "C"])
def test_threaded_scoring_equals_one_thread_and_direct_formula(embedding_type):
    rng = np.random.default_rng(9)
    table = rng.normal(size=(500, 48)).astype(np.float32)
    left, right = rng.integers(0, 500, (2, 100_000))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = score_trials(table, left, right, embedding_type == "C")
        torch.set_num_threads(3)
        threaded = score_trials(torch.from_numpy(table), left, right, embedding_type == "C")
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(single, threaded)
    # The GPU path, run on CPU tensors (same code), in chunks smaller than the trial list.
    on_device = _score_on_device(
        torch.from_numpy(table), left, right, "cosine" if embedding_type == "C" else "l2"
    )
    np.testing.assert_allclose(on_device, single, atol=1e-5)
    a, b = table[left].astype(np.float64), table[right].astype(np.float64)
    if embedding_type == "B":
        expected = -np.linalg.norm(a - b, axis=1)
    else:
        expected = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1) - 1
    np.testing.assert_allclose(single, expected, atol=2e-5)


def test_float32_curve_equals_the_float64_one():
    """float32 scores take a packed-integer sort: same thresholds and counts as the generic sort,
    with negative scores, ties, and -0.0 counted equal to +0.0."""
    rng = np.random.default_rng(10)
    for case in range(300):
        n = int(rng.integers(2, 300))
        scores = rng.normal(size=n).astype(np.float32)
        if case % 2:
            scores = np.round(scores * 3).astype(np.float32) / 3
        scores[rng.integers(0, n, 3)] = -0.0
        scores[rng.integers(0, n, 3)] = 0.0
        labels = rng.integers(0, 2, n)
        fast, generic = score_curve(scores, labels), score_curve(scores.astype(np.float64), labels)
        for got, expected in zip(fast, generic, strict=True):
            np.testing.assert_array_equal(got, expected)
    assert len(score_curve(np.array([-0.0, 0.0, 0.0], np.float32), np.array([0, 1, 1]))[0]) == 1


def test_trial_rows_outside_the_table_are_refused():
    table = np.ones((3, 4), np.float32)
    for left, right in (([0, 3], [1, 1]), ([0, 1], [-1, 2])):
        with pytest.raises(UserError, match="0..2"):
            score_trials(table, np.array(left), np.array(right), False)
    assert score_trials(table, np.array([], np.int64), np.array([], np.int64), True).shape == (0,)
