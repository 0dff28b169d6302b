"""The fast paths of the back-ends' fits and of AS-Norm (issue 25): speaker moments by a sparse
product, shared by the back-ends of one system; PLDA's projection in place; the top-k cohort
scores by a partition. Each against a direct computation."""

import numpy as np
import pytest
import torch
from test_backends import speaker_data, speaker_trials

import scoring.backends
from scoring.backends import TrainingRows, add_speaker_sums, make_backend, speaker_moments, top_scores
from scoring.evaluation import Settings, TrainingSet, TrialList, evaluate


def shuffled_speakers(rng, speakers=9, per_speaker=7, dim=6):
    """Embeddings whose speakers' rows are interleaved, with labels that skip numbers."""
    table, labels = speaker_data(rng, speakers, per_speaker, dim)
    order = rng.permutation(len(table))
    return table[order], 3 * labels[order] + 5


def test_speaker_moments_equal_a_direct_computation(monkeypatch):
    rng = np.random.default_rng(0)
    table, speakers = shuffled_speakers(rng)
    monkeypatch.setattr(scoring.backends, "BACKEND_CHUNK_BYTES", 5 * 6 * 8)  # five rows a chunk
    rows = TrainingRows.of(table, speakers, "test")
    moments = rows.moments(second=True)
    x = table.astype(np.float64)
    names = np.unique(speakers)
    np.testing.assert_array_equal(moments.counts, [np.sum(speakers == s) for s in names])
    np.testing.assert_allclose(moments.sums, [x[speakers == s].sum(axis=0) for s in names], rtol=1e-12)
    np.testing.assert_allclose(moments.products, x.T @ x, rtol=1e-12)
    centred = np.concatenate([x[speakers == s] - x[speakers == s].mean(axis=0) for s in names])
    np.testing.assert_allclose(moments.within_scatter(), centred.T @ centred, rtol=1e-9, atol=1e-12)

    def transform(chunk):  # may overwrite its chunk, as PLDA's projection does
        return chunk.mul_(2)[:, :3]

    through = speaker_moments(rows.table, rows.labels, rows.speakers, transform)
    np.testing.assert_allclose(through.sums, 2 * moments.sums[:, :3], rtol=1e-12)
    np.testing.assert_allclose(through.products, 4 * (x[:, :3].T @ x[:, :3]), rtol=1e-12)


def test_speaker_sums_add_as_index_add_does():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(50, 4)))
    labels = rng.integers(0, 7, 50)
    labels[labels == 3] = 4  # a speaker with no rows in this chunk
    sums = torch.zeros((7, 4), dtype=torch.float64)
    add_speaker_sums(sums, x, labels)
    expected = torch.zeros_like(sums).index_add_(0, torch.from_numpy(labels), x)
    np.testing.assert_array_equal(sums.numpy(), expected.numpy())


def test_moments_are_computed_once_with_products_when_wanted(monkeypatch):
    calls = []
    original = scoring.backends.speaker_moments

    def counted(*args, **kwargs):
        calls.append(kwargs.get("second", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(scoring.backends, "speaker_moments", counted)
    table, speakers = shuffled_speakers(np.random.default_rng(2))
    rows = TrainingRows.of(table, speakers, "test", products=True)
    assert rows.moments() is rows.moments(second=True) and calls == [True]
    rows = TrainingRows.of(table, speakers, "test")
    first = rows.moments()
    assert first.products is None and rows.moments() is first and calls == [True, False]
    assert rows.moments(second=True).products is not None and calls == [True, False, True]


@pytest.mark.parametrize("cosine", [False, True])
def test_back_ends_of_a_system_share_their_rows_and_score_as_if_fitted_alone(cosine, monkeypatch):
    """evaluate fits mean, AS-Norm and PLDA of a system with one pass for their moments (and
    PLDA's own pass over its projection); the scores equal those of each back-end fitted alone."""
    rng = np.random.default_rng(3)
    train, speakers = speaker_data(rng, 12, 6, 8)
    table, left, right, labels, trial_speakers = speaker_trials(rng, 8, 6, 8, 300)
    trials = TrialList(
        "test", "test.txt", labels, left, right, [f"f{i}" for i in range(len(table))], table, trial_speakers
    )
    systems = {"original": lambda x: x, "doubled": lambda x: 2 * x}
    calls = []
    original = scoring.backends.speaker_moments

    def counted(table, labels, speakers, transform=None, second=True):
        calls.append((transform is None, second))
        return original(table, labels, speakers, transform, second)

    monkeypatch.setattr(scoring.backends, "speaker_moments", counted)
    names = ["mean", "asnorm", "plda"]
    options = {"asnorm_topk": 5, "lda_dim": 4}
    results = evaluate(
        [trials], systems, Settings(names, options, cosine, resamples=2), TrainingSet(train, speakers)
    )
    assert calls == [(True, True), (False, True)] * 2  # per system: the shared pass, then PLDA's
    scores = results.lists["test"].scores
    for system, apply in systems.items():
        for name in names:
            alone = make_backend(name, cosine, **options).fit(apply(train), speakers)
            np.testing.assert_array_equal(scores[(system, name)], alone.score(apply(table), left, right))


def test_plda_projects_in_place_as_project_does():
    rng = np.random.default_rng(4)
    train, speakers = speaker_data(rng, 20, 5, 6)
    plda = make_backend("plda", True, lda_dim=4).fit(train, speakers)
    x = torch.from_numpy(rng.normal(size=(30, 6)))
    projected = plda._project_in_place()(x.clone())
    np.testing.assert_allclose(projected.numpy(), plda.project(x).numpy(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("k", [1, 4, 12])
def test_top_scores_are_the_k_highest_of_each_row(k):
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 6, (40, 12)).astype(np.float32)  # many ties
    top = top_scores(torch.from_numpy(scores.copy()), k)
    assert top.shape == (40, k)
    np.testing.assert_array_equal(np.sort(top.numpy(), axis=1), np.sort(scores, axis=1)[:, 12 - k :])
