import pytest
import torch
from torch import nn

from m_utils import UserError
from models.m_Models import MODELS, get_model


def linear_widths(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(
    "name, widths",
    [
        ("MyLinearNet", [1, 2, 4, 4, 2, 1]),
        ("MyLinearNetv2", [1, 2, 4, 4, 2, 1]),
        ("MyLinearNetv3", [1, 2, 2, 1]),
        ("MyLinearNetv4", [1, 2, 2, 4, 4, 2, 2, 1]),
    ],
)
@pytest.mark.parametrize("n_out", [7, 32])
def test_layer_widths(name, widths, n_out):
    model = get_model(name, nOut=n_out)
    sizes = [w * n_out for w in widths]
    assert linear_widths(model) == list(zip(sizes[:-1], sizes[1:], strict=True))
    assert model(torch.randn(5, n_out)).shape == (5, n_out)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_d_to_d_and_learns(name):
    """What every registered model must do: (B, D) -> (B, D) for any nOut, with each activation the
    models accept, every parameter reached by the gradient; in eval mode each embedding is
    enhanced alone (its output does not depend on the rest of its batch), which scoring relies on:
    it enhances trial lists in chunks of any size."""
    torch.manual_seed(0)
    for n_out, activation in ((7, "ReLU"), (32, "ELU")):
        model = get_model(name, nOut=n_out, activation=activation).eval()
        x = torch.randn(5, n_out)
        y = model(x)
        assert y.shape == (5, n_out) and y.dtype == x.dtype and torch.isfinite(y).all()
        alone = torch.cat([model(x[i : i + 1]) for i in range(5)])
        torch.testing.assert_close(alone, y, rtol=1e-5, atol=1e-6)
        (y**2).sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_dropout_placement_and_last_activation():
    layers = list(get_model("MyLinearNet", nOut=4).layers)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == [
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
        "ReLU",
    ]
    assert [m.p for m in layers if isinstance(m, nn.Dropout)] == [0.2] * 3  # the original's rate
    assert not any(isinstance(m, nn.Dropout) for m in get_model("MyLinearNetv2", nOut=4).modules())
    assert isinstance(get_model("MyLinearNetv3", nOut=4, activation="ELU").layers[-1], nn.ELU)


@pytest.mark.parametrize(
    "name, drops",
    [("MyLinearNet", True), ("MyLinearNetv3", True), ("MyLinearNetv2", False), ("MyLinearNetv4", False)],
)
def test_dropout_acts_in_training_alone(name, drops):
    """A model with dropout gives other outputs at each training call and the same ones in eval
    mode (where scoring runs); one without gives the eval outputs in training too."""
    torch.manual_seed(0)
    model = get_model(name, nOut=16)
    x = torch.randn(50, 16)
    first, second = model.train()(x), model(x)
    scored = model.eval()(x)
    assert torch.equal(model(x), scored)
    assert (not torch.equal(first, second)) == drops
    assert torch.equal(first, scored) != drops


def test_residual_starts_as_identity():
    x = torch.randn(3, 16)
    assert torch.equal(get_model("MyResidualNet", nOut=16)(x), x)


def test_errors_list_known_names():
    with pytest.raises(UserError, match="unknown model 'MyLinearNetV5'") as err:
        get_model("MyLinearNetV5")
    assert str(err.value).split("; known: ")[1].split(", ") == sorted(MODELS)
    with pytest.raises(UserError, match="ReLU, ELU"):
        get_model("MyLinearNet", activation="tanh")
