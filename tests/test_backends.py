"""Back-ends (mean, AS-Norm, PLDA), bootstrap intervals, calibration and the results table
(issue 13), each against a direct computation of its definition."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

import scoring.backends
import scoring.bootstrap
from m_utils import UserError
from scoring.backends import Quality, check_backend_options, fit_two_covariance, make_backend
from scoring.bootstrap import _RankedTrials, bootstrap_eer, interval
from scoring.calibration import Calibration, cllr, decision_thresholds, min_cllr
from scoring.evaluation import Settings, TrainingSet, TrialList, evaluate
from scoring.metrics import compute_eer, score_trials
from scoring.report import Sources, SystemResult, list_records, records_table

COSINE = {"B": False, "C": True}  # the scoring of each embedding type


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
    backend = make_backend("none", COSINE[embedding_type])
    np.testing.assert_array_equal(
        backend.score(table, left, right), score_trials(table, left, right, COSINE[embedding_type])
    )


@pytest.mark.parametrize("embedding_type", ["B", "C"])
def test_mean_normalisation_against_a_loop(embedding_type):
    rng = np.random.default_rng(1)
    train, speakers = speaker_data(rng, 10, 5, 6)
    train += 0.5  # a common offset the mean takes away
    table, _ = speaker_data(rng, 4, 5, 6)
    left, right = random_trials(rng, len(table), 40)
    got = make_backend("mean", COSINE[embedding_type]).fit(train, speakers).score(table, left, right)
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
    backend = make_backend("asnorm", COSINE[embedding_type], asnorm_topk=5).fit(train, speakers)
    expected = asnorm_by_loop(train, speakers, table, left, right, embedding_type, 5)
    np.testing.assert_allclose(backend.score(table, left, right), expected, rtol=1e-4, atol=1e-4)
    # top-k beyond the cohort: the whole cohort
    whole = make_backend("asnorm", COSINE[embedding_type], asnorm_topk=300).fit(train, speakers)
    expected = asnorm_by_loop(train, speakers, table, left, right, embedding_type, 12)
    np.testing.assert_allclose(whole.score(table, left, right), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("embedding_type", ["B", "C"])
def test_asnorm_in_chunks_equals_at_once(embedding_type, monkeypatch):
    rng = np.random.default_rng(3)
    train, speakers = speaker_data(rng, 40, 2, 16)
    table, _ = speaker_data(rng, 10, 10, 16)
    left, right = random_trials(rng, len(table), 500)
    backend = make_backend("asnorm", COSINE[embedding_type], asnorm_topk=10).fit(train, speakers)
    at_once = backend.score(torch.from_numpy(table), left, right)
    monkeypatch.setattr(scoring.backends, "BACKEND_CHUNK_BYTES", 3 * 40 * 4)  # three rows a chunk
    assert len(scoring.backends._row_chunks(len(table), 40)) == 34
    chunked = make_backend("asnorm", COSINE[embedding_type], asnorm_topk=10).fit(train, speakers)
    np.testing.assert_allclose(chunked.score(table, left, right), at_once, rtol=1e-5, atol=1e-5)


def test_plda_llr_is_the_gaussian_likelihood_ratio():
    """The PLDA score of (a, b) is log N([a; b]; same speaker) - log N(a) - log N(b) in the space
    the model was fitted in (centred, LDA-projected, length-normalised)."""
    rng = np.random.default_rng(4)
    train, speakers = speaker_data(rng, 30, 6, 5)
    table, _ = speaker_data(rng, 5, 3, 5)
    left, right = random_trials(rng, len(table), 20)
    backend = make_backend("plda", True, lda_dim=3).fit(train, speakers)
    assert backend.lda.shape == (5, 3)
    got = backend.score(table, left, right)
    model = backend.plda
    total = model.between + model.within
    same = multivariate_normal(
        np.concatenate([model.mean, model.mean]), np.block([[total, model.between], [model.between, total]])
    )
    apart = multivariate_normal(model.mean, total)
    projected = backend.project(torch.from_numpy(table).double()).numpy()
    expected = [
        same.logpdf(np.concatenate([projected[i], projected[j]]))
        - apart.logpdf(projected[i])
        - apart.logpdf(projected[j])
        for i, j in zip(left, right, strict=True)
    ]
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
    right[::2] = np.array([rng.choice(np.flatnonzero(test_speakers == test_speakers[i])) for i in left[::2]])
    labels = (test_speakers[left] == test_speakers[right]).astype(int)
    keep = left != right
    eer = {
        name: compute_eer(
            make_backend(name, True).fit(train, speakers).score(table, left, right)[keep], labels[keep]
        )[0]
        for name in ("none", "plda")
    }
    assert eer["none"] > 20 and eer["plda"] < 0.2 * eer["none"], eer


def test_bad_fits_and_names_are_user_errors():
    rng = np.random.default_rng(7)
    train, _ = speaker_data(rng, 3, 4, 6)
    one_speaker = np.zeros(len(train), int)
    for name in ("asnorm", "plda"):
        with pytest.raises(UserError, match="at least 2 speakers"):
            make_backend(name, False).fit(train, one_speaker)
    with pytest.raises(UserError, match="at least two utterances"):
        make_backend("plda", False).fit(train[:3], np.arange(3))
    with pytest.raises(UserError, match="12 training embeddings but 5 speaker labels"):
        make_backend("mean", False).fit(train, np.arange(5))
    fitted = make_backend("mean", False).fit(train, one_speaker)
    with pytest.raises(UserError, match="6-dimensional"):
        fitted.score(np.ones((2, 4), np.float32), np.array([0]), np.array([1]))
    with pytest.raises(UserError, match="0..1"):
        fitted.score(train[:2], np.array([0]), np.array([2]))
    with pytest.raises(RuntimeError, match="fitted"):
        make_backend("plda", False).score(train, np.array([0]), np.array([1]))
    with pytest.raises(UserError) as err:
        make_backend("pdla", False)
    assert "known: asnorm, mean, none, plda" in str(err.value) and "did you mean plda" in str(err.value)
    with pytest.raises(TypeError):
        make_backend("mean", "A")  # cosine: bool; an unknown embedding type fails at the config check


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
        ranked = _RankedTrials(scores, labels, speaker, 4)
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
    monkeypatch.setattr(scoring.bootstrap, "RESAMPLE_BLOCK", 1)  # one resample a block
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
        np.testing.assert_allclose(
            calibration.llr(3 * np.array([-1.0, 1.0, 3.0]) - 1),
            2.0 * (np.array([-1.0, 1.0, 3.0]) - 1.0),
            atol=0.15,
        )


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
        calibration.llr(calibration.thresholds["raw"]["far"]), abs=1e-9
    )
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
    typed = list_records("test", scores, labels, speaker, calibrations, resamples=100)
    records = [r.as_json() for r in typed]  # as check.json holds them
    systems = [r for r in records if "system" in r]
    assert [(r["system"], r["backend"]) for r in systems] == list(scores)
    for r in systems:
        assert r["eer_ci95"][0] <= r["eer"] <= r["eer_ci95"][1]
        assert set(r) >= {"trials", "eer", "mindcf_p05", "mindcf_p01"}
        assert ("cllr" in r) == ((r["system"], r["backend"]) == ("original", "plda"))
    differences = {r["backend"]: r for r in records if "eer_diff" in r}
    assert differences["none"]["eer_diff"] == 0 and differences["none"]["eer_diff_ci95"] == [0.0, 0.0]
    assert differences["plda"]["eer_diff_ci95"][1] < 0
    table = records_table(typed)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["trials", "system", "back-end"] and "Cllr" in lines[0]
    assert sum(line.startswith("test ") for line in lines) == 6
    none_line = next(line for line in lines if line.split()[:2] == ["test", "none"])
    plda_line = next(line for line in lines if line.split()[:2] == ["test", "plda"])
    assert none_line.endswith("no") and plda_line.endswith("yes")


# ----------------------------------------------------------------------------------------------
# QMF, the bounds of hyper-parameters, and the evaluation of trial lists


def speaker_trials(rng, speakers, per_speaker, dim, count):
    """A table of `speakers` speakers' embeddings and `count` trials between its rows, half of
    them target trials, with each trial's speaker."""
    table, labels = speaker_data(rng, speakers, per_speaker, dim)
    left = rng.integers(0, len(table), count)
    same = rng.integers(0, per_speaker, count) + per_speaker * labels[left]
    right = np.where(np.arange(count) % 2 == 0, same, rng.integers(0, len(table), count))
    return table, left, right, (labels[left] == labels[right]).astype(int), labels[left]


def test_qmf_equals_a_direct_logistic_regression():
    """QMF over AS-Norm = sklearn's LogisticRegression (balanced classes) on the standardised
    features [AS-Norm score, min and max log duration (, min and max log norm)] of the calibration
    trials; its scores are the fit's log-odds, the same for a trial and its mirror image."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(21)
    train, speakers = speaker_data(rng, 12, 6, 8)
    base = make_backend("asnorm", True, asnorm_topk=5).fit(train, speakers)
    table, left, right, labels, _ = speaker_trials(rng, 10, 8, 8, 600)
    quality = Quality(rng.uniform(1, 20, len(table)), rng.uniform(5, 15, len(table)))
    for norms in (False, True):
        qmf = make_backend("qmf", True, backends=["none", "asnorm"], qmf_norms=norms)
        assert qmf.base_name == "asnorm"
        qmf.base = base
        qmf.fit_trials(table, left[:400], right[:400], labels[:400], quality)
        logs = [
            np.log(values)
            for values in (quality.durations, quality.norms if norms else None)
            if values is not None
        ]
        features = np.column_stack(
            [base.score(table, left, right).astype(np.float64)]
            + [f(x[left], x[right]) for x in logs for f in (np.minimum, np.maximum)]
        )
        centre, scale = features[:400].mean(axis=0), features[:400].std(axis=0)
        direct = LogisticRegression(class_weight="balanced")
        direct.fit((features[:400] - centre) / scale, labels[:400])
        np.testing.assert_allclose(qmf.model[-1].coef_, direct.coef_, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(qmf.model[-1].intercept_, direct.intercept_, rtol=1e-5, atol=1e-8)
        expected = direct.decision_function((features[400:] - centre) / scale)
        got = qmf.score(table, left[400:], right[400:], quality)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(qmf.score(table, right[400:], left[400:], quality), got)
    assert make_backend("qmf", False, backends=["none", "plda"]).base_name == "none"
    with pytest.raises(UserError, match="qmf_base"):
        make_backend("qmf", False, backends=["none"], qmf_base="plda")  # not among the back-ends
    with pytest.raises(UserError, match="durations"):
        qmf.score(table, left, right, Quality(norms=quality.norms))


def test_hyper_parameter_bounds_are_one_rule_for_the_class_and_the_config():
    for options in ({"asnorm_topk": 1}, {"lda_dim": 0}):
        key = next(iter(options))
        with pytest.raises(UserError, match=f"option '{key}' must be at least"):
            check_backend_options(["none"], options)  # checked whether chosen or not, as before
        name = {"asnorm_topk": "asnorm", "lda_dim": "plda"}[key]
        with pytest.raises(UserError, match=f"option '{key}' must be at least"):
            make_backend(name, True, **options)
    check_backend_options(["none", "asnorm", "qmf"], {"asnorm_topk": 2, "lda_dim": 1})
    with pytest.raises(UserError, match="unknown back-end 'znorm'"):
        check_backend_options(["znorm"], {})


def plain_trial_list(rng, name, durations=True):
    table, left, right, labels, speakers = speaker_trials(rng, 8, 6, 8, 300)
    quality = Quality(rng.uniform(1, 20, len(table)) if durations else None)
    return TrialList(
        name,
        f"{name}.txt",
        labels,
        left,
        right,
        [f"f{i}" for i in range(len(table))],
        table,
        speakers,
        quality,
    )


def evaluated(calib_durations=True, with_calib=True, test_durations=True):
    rng = np.random.default_rng(5)
    train, speakers = speaker_data(rng, 12, 6, 8)
    lists = [plain_trial_list(rng, "test", test_durations), plain_trial_list(rng, "libri")]
    calib = plain_trial_list(rng, "calib", calib_durations) if with_calib else None
    settings = Settings(["none", "asnorm", "qmf"], {"asnorm_topk": 5}, cosine=True, resamples=20)
    results = evaluate(
        lists, {"original": lambda table: table}, settings, TrainingSet(train, speakers), calib
    )
    return results, lists, calib


def test_evaluation_scores_qmf_like_the_other_back_ends():
    results, lists, calib = evaluated()
    qmf = make_backend("qmf", True, backends=["none", "asnorm"])
    train, speakers = speaker_data(np.random.default_rng(5), 12, 6, 8)
    qmf.base = make_backend("asnorm", True, asnorm_topk=5).fit(train, speakers)
    qmf.fit_trials(calib.embeddings, calib.left, calib.right, calib.labels, calib.quality)
    for trials in lists:
        scores = results.lists[trials.name].scores
        assert list(scores) == [("original", name) for name in ("none", "asnorm", "qmf")]
        np.testing.assert_allclose(
            scores[("original", "qmf")],
            qmf.score(trials.embeddings, trials.left, trials.right, trials.quality),
            rtol=1e-6,
            atol=1e-6,
        )
    rows = {(r.trials, r.backend) for r in results.records if isinstance(r, SystemResult)}
    assert rows == {(t, b) for t in ("test", "libri") for b in ("none", "asnorm", "qmf")}
    sources = next(r for r in results.records if isinstance(r, Sources)).as_json()
    assert sources["trials"] is None
    assert sources["sources"]["test"]["count"] == 300 and sources["sources"]["calib"]["path"] == "calib.txt"
    assert sources["sources"]["train"]["count"] == 72


@pytest.mark.parametrize("case", ["no calib_list", "calib without durations", "test without durations"])
def test_qmf_without_calibration_or_durations_is_skipped_with_a_notice(case, caplog):
    caplog.set_level("INFO", logger="scoring")
    results, _, _ = evaluated(
        with_calib=case != "no calib_list",
        calib_durations=case != "calib without durations",
        test_durations=case != "test without durations",
    )
    scored = {name: {backend for _, backend in result.scores} for name, result in results.lists.items()}
    if case == "test without durations":
        assert scored == {"test": {"none", "asnorm"}, "libri": {"none", "asnorm", "qmf"}}
    else:
        assert scored == {"test": {"none", "asnorm"}, "libri": {"none", "asnorm"}}
    notices = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(notices) == 1 and "qmf" in notices[0]
