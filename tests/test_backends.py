"""Back-ends (mean, AS-Norm, PLDA), bootstrap intervals, calibration and the results table
(issue 13), each against a direct computation of its definition."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

import m_scoring
from m_scoring import (
    Calibration,
    _RankedTrials,
    bootstrap_eer,
    cllr,
    compute_eer,
    decision_thresholds,
    fit_two_covariance,
    interval,
    make_backend,
    min_cllr,
    results_table,
    score_trials,
    trial_list_records,
)
from m_utils import UserError


def speaker_data(rng, speakers, per_speaker, dim, spread=1.0, noise=0.7):
    """L2-normalised embeddings of `speakers` speakers (centre + noise), with their labels."""
    labels = np.repeat(np.arange(speakers), per_speaker)
    centres = spread * rng.normal(size=(speakers, dim))
    embeddings = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings.astype(np.float32), labels


def random_trials(rng, rows, count):
    left, right = rng.integers(0, rows, (2, count))
    return left, right


def unit(x):
    return x / np.linalg.norm(x)


def raw_score(a, b, embedding_type):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return unit(a) @ unit(b) - 1 if embedding_type == "C" else -np.linalg.norm(a - b)


@pytest.mark.parametrize("embedding_type", ["B", "C"])
def test_none_is_score_trials(embedding_type):
    rng = np.random.default_rng(0)
    table, _ = speaker_data(rng, 5, 4, 8)
    left, right = random_trials(rng, len(table), 50)
    backend = make_backend("none", embedding_type)
    np.testing.assert_array_equal(backend.score(table, left, right),
                                  score_trials(table, left, right, embedding_type))


@pytest.mark.parametrize("embedding_type", ["B", "C"])
def test_mean_normalisation_against_a_loop(embedding_type):
    rng = np.random.default_rng(1)
    train, speakers = speaker_data(rng, 10, 5, 6)
    train += 0.5  # a common offset the mean takes away
    table, _ = speaker_data(rng, 4, 5, 6)
    left, right = random_trials(rng, len(table), 40)
    got = make_backend("mean", embedding_type).fit(train, speakers).score(table, left, right)
    mean = train.astype(np.float64).mean(axis=0)
    expected = [unit(table[i] - mean) @ unit(table[j] - mean) - 1 for i, j in zip(left, right, strict=True)]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def asnorm_by_loop(train, speakers, table, left, right, embedding_type, topk):
    """AS-Norm by its definition, one trial at a time."""
    cohort = [train[speakers == s].astype(np.float64).mean(axis=0) for s in np.unique(speakers)]
    if embedding_type == "C":
        cohort = [unit(c) for c in cohort]

    def statistics(row):
        top = np.sort([raw_score(table[row], c, embedding_type) for c in cohort])[::-1][:topk]
        return top.mean(), top.std()

    scores = []
    for i, j in zip(left, right, strict=True):
        s = raw_score(table[i], table[j], embedding_type)
        (m_e, d_e), (m_t, d_t) = statistics(i), statistics(j)
        scores.append(((s - m_e) / d_e + (s - m_t) / d_t) / 2)
    return np.array(scores)


@pytest.mark.parametrize("embedding_type", ["B", "C"])
def test_asnorm_against_a_loop(embedding_type):
    rng = np.random.default_rng(2)
    train, speakers = speaker_data(rng, 12, 3, 8)
    table, _ = speaker_data(rng, 4, 4, 8)
    left, right = random_trials(rng, len(table), 30)
    backend = make_backend("asnorm", embedding_type, asnorm_topk=5).fit(train, speakers)
    expected = asnorm_by_loop(train, speakers, table, left, right, embedding_type, 5)
    np.testing.assert_allclose(backend.score(table, left, right), expected, rtol=1e-4, atol=1e-4)
    # top-k beyond the cohort: the whole cohort
    whole = make_backend("asnorm", embedding_type, asnorm_topk=300).fit(train, speakers)
    expected = asnorm_by_loop(train, speakers, table, left, right, embedding_type, 12)
    np.testing.assert_allclose(whole.score(table, left, right), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("embedding_type", ["B", "C"])
def test_asnorm_in_chunks_equals_at_once(embedding_type, monkeypatch):
    rng = np.random.default_rng(3)
    train, speakers = speaker_data(rng, 40, 2, 16)
    table, _ = speaker_data(rng, 10, 10, 16)
    left, right = random_trials(rng, len(table), 500)
    backend = make_backend("asnorm", embedding_type, asnorm_topk=10).fit(train, speakers)
    at_once = backend.score(torch.from_numpy(table), left, right)
    monkeypatch.setattr(m_scoring, "BACKEND_CHUNK_BYTES", 3 * 40 * 4)  # three rows a chunk
    assert len(m_scoring._row_chunks(len(table), 40)) == 34
    chunked = make_backend("asnorm", embedding_type, asnorm_topk=10).fit(train, speakers)
    np.testing.assert_allclose(chunked.score(table, left, right), at_once, rtol=1e-5, atol=1e-5)


def test_plda_llr_is_the_gaussian_likelihood_ratio():
    """The PLDA score of (a, b) is log N([a; b]; same speaker) - log N(a) - log N(b) in the space
    the model was fitted in (centred, LDA-projected, length-normalised)."""
    rng = np.random.default_rng(4)
    train, speakers = speaker_data(rng, 30, 6, 5)
    table, _ = speaker_data(rng, 5, 3, 5)
    left, right = random_trials(rng, len(table), 20)
    backend = make_backend("plda", "C", lda_dim=3).fit(train, speakers)
    assert backend.lda.shape == (5, 3)
    got = backend.score(table, left, right)
    model = backend.plda
    total = model.between + model.within
    same = multivariate_normal(np.concatenate([model.mean, model.mean]),
                               np.block([[total, model.between], [model.between, total]]))
    apart = multivariate_normal(model.mean, total)
    projected = backend.project(torch.from_numpy(table).double()).numpy()
    expected = [same.logpdf(np.concatenate([projected[i], projected[j]])) - apart.logpdf(projected[i])
                - apart.logpdf(projected[j]) for i, j in zip(left, right, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    assert np.ptp(got) > 1  # the LLRs vary: the test compares something


def test_two_covariance_recovers_the_generating_covariances():
    rng = np.random.default_rng(5)
    between = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
    within = np.array([[0.5, -0.1, 0.0], [-0.1, 0.3, 0.0], [0.0, 0.0, 0.8]])
    mean = np.array([1.0, -2.0, 0.5])
    counts = rng.integers(2, 9, 4000)  # unequal numbers of utterances
    labels = np.repeat(np.arange(len(counts)), counts)
    speaker = rng.multivariate_normal(np.zeros(3), between, len(counts))
    data = mean + speaker[labels] + rng.multivariate_normal(np.zeros(3), within, len(labels))
    model = fit_two_covariance(data.astype(np.float32), labels)
    for estimate, truth in ((model.between, between), (model.within, within)):
        assert np.linalg.norm(estimate - truth) <= 0.08 * np.linalg.norm(truth)
    np.testing.assert_allclose(model.mean, mean, atol=0.08)


def test_plda_beats_raw_scores_where_a_nuisance_dominates():
    """Within-speaker variation concentrated in a few directions (a channel): PLDA learns to
    discount them, so its EER is well below the raw cosine's."""
    rng = np.random.default_rng(6)
    dim, nuisance = 20, 3

    def draw(speakers, per_speaker):
        labels = np.repeat(np.arange(speakers), per_speaker)
        x = rng.normal(size=(speakers, dim))[labels] + 0.3 * rng.normal(size=(len(labels), dim))
        x[:, :nuisance] += 3 * rng.normal(size=(len(labels), nuisance))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels

    train, speakers = draw(200, 6)
    table, test_speakers = draw(50, 6)
    left, right = random_trials(rng, len(table), 4000)
    right[::2] = np.array([rng.choice(np.flatnonzero(test_speakers == test_speakers[i]))
                           for i in left[::2]])
    labels = (test_speakers[left] == test_speakers[right]).astype(int)
    keep = left != right
    eer = {name: compute_eer(make_backend(name, "C").fit(train, speakers).score(table, left, right)[keep],
                             labels[keep])[0] for name in ("none", "plda")}
    assert eer["none"] > 20 and eer["plda"] < 0.2 * eer["none"], eer


def test_bad_fits_and_names_are_user_errors():
    rng = np.random.default_rng(7)
    train, _ = speaker_data(rng, 3, 4, 6)
    one_speaker = np.zeros(len(train), int)
    for name in ("asnorm", "plda"):
        with pytest.raises(UserError, match="at least 2 speakers"):
            make_backend(name, "B").fit(train, one_speaker)
    with pytest.raises(UserError, match="at least two utterances"):
        make_backend("plda", "B").fit(train[:3], np.arange(3))
    with pytest.raises(UserError, match="12 training embeddings but 5 speaker labels"):
        make_backend("mean", "B").fit(train, np.arange(5))
    fitted = make_backend("mean", "B").fit(train, one_speaker)
    with pytest.raises(UserError, match="6-dimensional"):
        fitted.score(np.ones((2, 4), np.float32), np.array([0]), np.array([1]))
    with pytest.raises(UserError, match="0..1"):
        fitted.score(train[:2], np.array([0]), np.array([2]))
    with pytest.raises(RuntimeError, match="fitted"):
        make_backend("plda", "B").score(train, np.array([0]), np.array([1]))
    with pytest.raises(UserError) as err:
        make_backend("pdla", "B")
    assert "known: asnorm, mean, none, plda" in str(err.value) and "did you mean plda" in str(err.value)
    with pytest.raises(UserError):
        make_backend("mean", "A")


# ----------------------------------------------------------------------------------------------
# Bootstrap


def random_list(rng, tied):
    n = int(rng.integers(2, 60))
    labels = rng.integers(0, 2, n).astype(bool)
    labels[:2] = [False, True]
    scores = rng.integers(0, int(rng.integers(1, 6)), n) if tied else rng.normal(size=n) + labels
    return scores.astype(np.float32), labels


@pytest.mark.parametrize("tied", [False, True])
def test_weighted_eer_is_compute_eer_of_the_repeated_list(tied):
    """Weights all 1 give compute_eer exactly; any weights give compute_eer of the list with each
    trial repeated as often as its weight (speakers not drawn: weight 0)."""
    rng = np.random.default_rng(8)
    for _ in range(300):
        scores, labels = random_list(rng, tied)
        speaker = rng.integers(0, 4, len(scores))
        ranked = _RankedTrials(scores, labels, speaker)
        assert ranked.eers(np.ones((1, 4), np.int64))[0] == compute_eer(scores, labels)[0]
        draws = rng.integers(0, 3, (4, 4))
        for weights, eer in zip(draws, ranked.eers(draws), strict=True):
            repeated = np.repeat(labels, weights[speaker])
            if repeated.all() or not repeated.any():
                assert np.isnan(eer)
            else:
                assert eer == compute_eer(np.repeat(scores, weights[speaker]), repeated)[0]


def test_bootstrap_is_seeded_paired_and_chunk_independent(monkeypatch):
    rng = np.random.default_rng(9)
    labels = np.tile([1, 0], 300)
    speaker = np.repeat(np.arange(20), 30)
    first = (rng.normal(size=600) + 2 * labels).astype(np.float32)
    second = (rng.normal(size=600) + 2.5 * labels).astype(np.float32)
    eers = bootstrap_eer([first, second, first], labels, speaker, resamples=50, seed=3)
    assert eers.shape == (3, 50) and np.ptp(eers[0]) > 0
    np.testing.assert_array_equal(eers[0], eers[2])
    assert interval(eers[2] - eers[0]) == (0.0, 0.0)
    np.testing.assert_array_equal(bootstrap_eer(first, labels, speaker, 50, 3)[0], eers[0])
    monkeypatch.setattr(m_scoring, "BOOTSTRAP_CHUNK", 1000)  # one resample a chunk
    np.testing.assert_array_equal(bootstrap_eer([first, second], labels, speaker, 50, 3), eers[:2])
    assert not np.array_equal(bootstrap_eer(first, labels, speaker, 50, 4)[0], eers[0])


def test_bootstrap_interval_covers_the_true_eer():
    """Targets N(2, 1), non-targets N(0, 1): the EER is Phi(-1). The 95 % interval covers it in
    most of 100 independent experiments."""
    true_eer = 100 * norm.cdf(-1.0)
    speaker = np.repeat(np.arange(30), 40)
    labels = np.tile(np.arange(40) % 2, 30)
    covered = 0
    for seed in range(100):
        scores = np.random.default_rng(seed).normal(size=len(labels)) + 2.0 * labels
        lo, hi = interval(bootstrap_eer(scores.astype(np.float32), labels, speaker, 200, seed)[0])
        covered += lo <= true_eer <= hi
    assert covered >= 85


def test_bootstrap_refuses_mismatched_input():
    with pytest.raises(UserError, match="one value per trial"):
        bootstrap_eer(np.zeros(4), np.array([0, 1, 0]), np.zeros(4))
    with pytest.raises(UserError, match="finite"):
        bootstrap_eer(np.array([0.0, np.nan]), np.array([0, 1]), np.zeros(2))


# ----------------------------------------------------------------------------------------------
# Calibration


def gaussian_trials(rng, targets, nontargets, separation):
    """Target scores N(separation, 1), non-target N(0, 1): the LLR is separation x (s - separation / 2)."""
    labels = np.r_[np.ones(targets, bool), np.zeros(nontargets, bool)]
    return rng.normal(size=len(labels)) + separation * labels, labels


def test_calibration_recovers_the_llr_whatever_the_target_share():
    rng = np.random.default_rng(10)
    for targets, nontargets in ((2000, 18000), (10000, 10000)):
        scores, labels = gaussian_trials(rng, targets, nontargets, 2.0)
        calibration = Calibration.fit(3 * scores - 1, labels)  # a mis-scaled system
        np.testing.assert_allclose(calibration.llr(3 * np.array([-1.0, 1.0, 3.0]) - 1),
                                   2.0 * (np.array([-1.0, 1.0, 3.0]) - 1.0), atol=0.15)


def test_cllr_of_calibrated_llrs_beats_mis_scaled_and_min_cllr_is_a_floor():
    rng = np.random.default_rng(11)
    scores, labels = gaussian_trials(rng, 3000, 3000, 2.0)
    llr = 2.0 * (scores - 1.0)
    assert cllr(llr, labels) < cllr(4 * llr, labels)
    assert cllr(llr, labels) < cllr(llr + 3, labels)
    assert cllr(np.zeros(len(labels)), labels) == pytest.approx(1.0)  # an uninformative system
    floor = min_cllr(4 * llr + 7, labels)  # monotone maps do not change it
    assert floor == pytest.approx(min_cllr(llr, labels), abs=1e-12)
    assert floor <= cllr(llr, labels)
    assert floor <= cllr(Calibration.fit(scores, labels).llr(scores), labels)
    assert min_cllr(np.r_[np.zeros(5), np.ones(5)], np.r_[np.zeros(5), np.ones(5)]) == 0.0


@pytest.mark.parametrize("far", [0.01, 0.05])
def test_far_threshold_gives_the_stated_false_accept_rate(far):
    rng = np.random.default_rng(12)
    scores, labels = gaussian_trials(rng, 1500, 4000, 2.0)
    calibration = Calibration.fit(scores, labels, far=far)
    for kind, values in (("raw", scores), ("llr", calibration.llr(scores))):
        threshold = calibration.thresholds[kind]["far"]
        false_accepts = (values[~labels] >= threshold).mean()
        assert far - 1 / 4000 <= false_accepts <= far
        assert calibration.thresholds[kind]["eer"] == compute_eer(values, labels)[1]
    # the LLR thresholds are the raw ones mapped through the calibration
    assert calibration.thresholds["llr"]["far"] == pytest.approx(
        calibration.llr(calibration.thresholds["raw"]["far"]), abs=1e-9)
    # a highest score that is a non-target's: the threshold accepts nothing
    assert decision_thresholds(np.array([0.0, 1.0, 2.0]), np.array([1, 0, 0]), 0.01)["far"] > 2.0


def test_calibration_needs_both_classes():
    with pytest.raises(UserError, match="target"):
        Calibration.fit(np.zeros(4), np.ones(4))


# ----------------------------------------------------------------------------------------------
# Records and table


def test_records_and_table_of_one_trial_list():
    rng = np.random.default_rng(13)
    labels = np.tile([1, 0], 400)
    speaker = np.repeat(np.arange(20), 40)
    scores = {}
    for backend, gain in (("none", 0.0), ("plda", 1.0)):
        scores[("original", backend)] = rng.normal(size=800) + 1.5 * labels
        scores[("enhanced", backend)] = scores[("original", backend)] + gain * labels
    calibrations = {("original", "plda"): Calibration.fit(scores[("original", "plda")], labels)}
    records = trial_list_records("test", scores, labels, speaker, calibrations, resamples=100)
    systems = [r for r in records if "system" in r]
    assert [(r["system"], r["backend"]) for r in systems] == list(scores)
    for r in systems:
        assert r["eer_ci95"][0] <= r["eer"] <= r["eer_ci95"][1]
        assert set(r) >= {"trials", "eer", "mindcf_p05", "mindcf_p01"}
        assert ("cllr" in r) == ((r["system"], r["backend"]) == ("original", "plda"))
    differences = {r["backend"]: r for r in records if "eer_diff" in r}
    assert differences["none"]["eer_diff"] == 0 and differences["none"]["eer_diff_ci95"] == [0.0, 0.0]
    assert differences["plda"]["eer_diff_ci95"][1] < 0
    table = results_table(records)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["trials", "system", "back-end"] and "Cllr" in lines[0]
    assert sum(line.startswith("test ") for line in lines) == 6
    none_line = next(line for line in lines if line.split()[:2] == ["test", "none"])
    plda_line = next(line for line in lines if line.split()[:2] == ["test", "plda"])
    assert none_line.endswith("no") and plda_line.endswith("yes")
