import math

import numpy as np
import pytest
import torch

from loss.m_Losses import LOSSES, loss_class
from m_DataLoader import Batch, TrainingKind, list_kind
from m_network import options_taken
from m_utils import UserError

X = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
T = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
OTHER = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
LABELS = torch.tensor([0, 1])


def batch(**extra) -> Batch:
    return Batch(inputs=X, targets=T, labels=LABELS, **extra)


@pytest.mark.parametrize("name, expected", [("MSE", 0.5), ("MAE", 0.5), ("CS", 0.5), ("MSE_CS", 1.0)])
def test_simple_losses(name, expected):
    value, _ = loss_class(name)()(X, batch())
    assert value.item() == pytest.approx(expected)


def test_triplet_cs():
    value, _ = loss_class("MyTriplet_CS")()(X, batch(others=OTHER))
    # 1 - mean(1, 0) + mean(0, 1)
    assert value.item() == pytest.approx(1.0)


@pytest.mark.parametrize("name, extra", [("Softmax", 0.0), ("MSE_Softmax", 0.5)])
def test_softmax_losses(name, extra):
    loss = loss_class(name)(nOut=2, nClasses=2)
    with torch.no_grad():
        loss.fc.weight.copy_(torch.eye(2))
        loss.fc.bias.zero_()
    value, accuracy = loss(X, batch())
    assert value.item() == pytest.approx(math.log(1 + math.exp(-1)) + extra, rel=1e-6)
    assert accuracy.item() == pytest.approx(100.0)


def test_softmax_init_from_extractor_checkpoint(tmp_path):
    weight, bias = torch.randn(3, 2), torch.randn(3)
    path = tmp_path / "extractor.model"
    torch.save(
        {
            "__S__.conv1.weight": torch.zeros(1),
            "__L__.softmax.fc.weight": weight,
            "__L__.softmax.fc.bias": bias,
        },
        path,
    )
    loss = loss_class("Softmax")(nOut=2, nClasses=3, softmax_init=str(path))
    assert torch.equal(loss.fc.weight.data, weight) and torch.equal(loss.fc.bias.data, bias)
    with pytest.raises(UserError, match="needs"):
        loss_class("Softmax")(nOut=2, nClasses=4, softmax_init=str(path))


def rbf(a, b, sigma):
    return np.exp(-(np.subtract.outer(a, b) ** 2) / (2 * sigma**2)).mean()


def mmd(same, other, sigma):
    return rbf(same, same, sigma) + rbf(other, other, sigma) - 2 * rbf(same, other, sigma)


def pair_batch(x: torch.Tensor, same: list[bool], speaker: list[int]) -> Batch:
    target = torch.tensor([[1.0, 0.0, 0.0]]).repeat(len(x), 1)
    return Batch(
        inputs=x,
        targets=target,
        labels=torch.zeros(len(x), dtype=torch.long),
        pair_same=torch.tensor(same),
        pair_speaker=torch.tensor(speaker),
    )


PAIRS = torch.tensor(
    [
        [1.0, 0.2, 0.0],
        [0.9, 0.1, 0.3],  # same-category pair
        [1.0, 0.0, 0.5],
        [0.0, 1.0, 0.2],  # same-category pair
        [0.5, 0.5, 0.0],
        [0.1, -1.0, 0.4],
    ]
)  # different-category pair


def cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_da_value():
    x = PAIRS.numpy().astype(np.float64)
    sigma = 0.7
    distance = 1 - cos(x[0::2], x[1::2])
    expected_mmd = mmd(distance[:2], distance[2:], sigma)
    expected = expected_mmd + 1 - cos(x, np.array([1.0, 0, 0])).mean()
    value, reported = loss_class("DA")(sigma=sigma)(PAIRS, pair_batch(PAIRS, [True, True, False], [0, 0, 0]))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert reported.item() == pytest.approx(expected_mmd, rel=1e-5)
    assert expected_mmd == pytest.approx(1.01804, rel=1e-5)  # the two kinds of pair differ: not 0


def test_da_mse_value():
    x = PAIRS.numpy().astype(np.float64)
    distance = np.sqrt(((x[0::2] - x[1::2]) ** 2).mean(axis=1))
    expected = mmd(distance[:2], distance[2:], 1.0) + ((x - np.array([1.0, 0, 0])) ** 2).mean()
    value, _ = loss_class("DA_MSE")(sigma=1.0)(PAIRS, pair_batch(PAIRS, [True, True, False], [0, 0, 0]))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_da_speaker_without_different_pairs_adds_no_mmd_and_no_nan():
    value, reported = loss_class("DA")()(PAIRS, pair_batch(PAIRS, [True, True, True], [0, 0, 0]))
    assert torch.isfinite(value) and reported.item() == 0.0
    x = PAIRS.numpy().astype(np.float64)
    assert value.item() == pytest.approx(1 - cos(x, np.array([1.0, 0, 0])).mean(), rel=1e-5)


def test_da_averages_mmd_over_speakers():
    x = PAIRS.numpy().astype(np.float64)
    distance = 1 - cos(x[0::2], x[1::2])
    # speaker 0: pairs 0 (same) and 2 (different); speaker 1: pair 1 (same) only
    _, reported = loss_class("DA")()(PAIRS, pair_batch(PAIRS, [True, True, False], [0, 1, 0]))
    assert reported.item() == pytest.approx(mmd(distance[:1], distance[2:], 1.0) / 1, rel=1e-5)


@pytest.mark.parametrize("name", ["DA", "DA_MSE"])
def test_da_mmd_equals_a_loop_over_speakers_value_and_gradient(name):
    """Random multi-speaker batches (some speakers lacking one kind of pair) against the plain
    per-speaker definition, written with the loss's own pair distance."""
    loss = loss_class(name)(sigma=0.8)
    rng = np.random.default_rng(4)
    for _ in range(20):
        pairs = int(rng.integers(2, 30))
        speaker = torch.from_numpy(rng.integers(0, 5, pairs))
        same = torch.from_numpy(rng.random(pairs) < 0.5)
        x = torch.from_numpy(rng.normal(size=(2 * pairs, 6))).requires_grad_()
        distance = loss.pair_distance(x[0::2], x[1::2])
        terms = []
        for g in torch.unique(speaker):
            a, b = distance[(speaker == g) & same], distance[(speaker == g) & ~same]
            if len(a) and len(b):
                k = lambda u, v: torch.exp(-((u[:, None] - v[None, :]) ** 2) / (2 * 0.8**2)).mean()  # noqa: E731
                terms.append(k(a, a) + k(b, b) - 2 * k(a, b))
        expected = torch.stack(terms).mean() if terms else torch.zeros((), dtype=x.dtype)
        got = loss.mmd(x, pair_batch(x, same.tolist(), speaker.tolist()))
        assert got.item() == pytest.approx(expected.item(), abs=1e-12)
        if terms:
            (expected_grad,) = torch.autograd.grad(expected, x)
            (got_grad,) = torch.autograd.grad(loss.mmd(x, pair_batch(x, same.tolist(), speaker.tolist())), x)
            torch.testing.assert_close(got_grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_list_kinds_and_test_normalisation():
    for name in ("CS", "MSE_CS", "MyTriplet_CS", "DA", "DA_MSE"):
        assert LOSSES[name].normalize_for_test is True, name
    for name in ("MSE", "MAE", "Softmax", "MSE_Softmax"):
        assert LOSSES[name].normalize_for_test is False, name
    assert LOSSES["MyTriplet_CS"].list_kind == "triplet"
    assert LOSSES["DA"].list_kind == LOSSES["DA_MSE"].list_kind == "distribution"


def batch_of_kind(kind: str, x: torch.Tensor) -> Batch:
    """A batch of four rows of `x` as a list of `kind` gathers it: triplets with others, pairs of
    two speakers, each with one same- and one different-category pair."""
    if kind == "distribution":
        return pair_batch(x, [True, False], [0, 1])
    target = torch.nn.functional.one_hot(torch.arange(len(x)) % x.shape[1], x.shape[1]).float()
    extra = {"others": torch.roll(x.detach(), 1, dims=0)} if kind == "triplet" else {}
    return Batch(inputs=x, targets=target, labels=torch.arange(len(x)) % 2, **extra)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_gives_a_scalar_with_a_gradient(name):
    """What every registered loss must do: train on a list kind that exists, take its hyper-parameters
    by constructor name, return a finite scalar loss (and accuracy) whose gradient reaches x."""
    cls = LOSSES[name]
    assert isinstance(list_kind(cls.list_kind), TrainingKind)
    loss = cls(**options_taken(cls, {"nOut": 3, "nClasses": 2, "sigma": 1.0}))
    x = torch.tensor(PAIRS.tolist(), dtype=torch.float32)[:4].requires_grad_()
    value, accuracy = loss(x, batch_of_kind(cls.list_kind, x))
    assert value.shape == () and torch.isfinite(value)
    assert torch.as_tensor(accuracy).shape == () and torch.isfinite(torch.as_tensor(accuracy))
    (gradient,) = torch.autograd.grad(value, x)
    assert gradient.shape == x.shape and gradient.abs().sum() > 0
    assert cls.classifies == any(isinstance(m, torch.nn.Linear) for m in loss.modules())


def test_unknown_loss_lists_known_names():
    with pytest.raises(UserError, match="did you mean MSE_CS") as err:
        loss_class("MSE_SC")()
    assert str(err.value).split("; known: ")[1].split(", ") == sorted(LOSSES)
