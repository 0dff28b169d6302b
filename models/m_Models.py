"""Enhancement networks: each maps a (B, nOut) single-utterance embedding to (B, nOut).

Chosen by name with `model:`; `get_model(name, nOut=..., activation=...)` builds one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from m_utils import UserError, unknown_name

ACTIVATIONS = {"ReLU": nn.ReLU, "ELU": nn.ELU}
DROPOUT = 0.2


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise UserError(f"activation must be one of {', '.join(ACTIVATIONS)}, found {name!r}")
    return ACTIVATIONS[name]()


def stacked_linear(
    nOut: int, widths: Sequence[int], activation: str, dropout_after: Sequence[int] = ()
) -> nn.Sequential:
    """Linear layers nOut -> widths[0]*nOut -> ... , an activation after every layer and
    element-wise dropout after the layers numbered (from 1) in `dropout_after`."""
    layers: list[nn.Module] = []
    size = nOut
    for number, width in enumerate(widths, start=1):
        layers += [nn.Linear(size, width * nOut), make_activation(activation)]
        if number in dropout_after:
            layers.append(nn.Dropout(DROPOUT))
        size = width * nOut
    return nn.Sequential(*layers)


class StackedLinearNet(nn.Module):
    """Linear layers of widths `widths` (multiples of nOut), an activation after every layer."""

    widths: tuple[int, ...] = ()
    dropout_after: tuple[int, ...] = ()

    def __init__(self, nOut: int = 512, activation: str = "ReLU"):
        super().__init__()
        self.layers = stacked_linear(nOut, self.widths, activation, self.dropout_after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MyLinearNet(StackedLinearNet):
    """D -> 2D -> 4D -> 4D -> 2D -> D, dropout 0.2 after layers 2, 3 and 4."""

    widths, dropout_after = (2, 4, 4, 2, 1), (2, 3, 4)


class MyLinearNetv2(StackedLinearNet):
    """MyLinearNet without dropout."""

    widths = (2, 4, 4, 2, 1)


class MyLinearNetv3(StackedLinearNet):
    """D -> 2D -> 2D -> D, dropout 0.2 after layer 2."""

    widths, dropout_after = (2, 2, 1), (2,)


class MyLinearNetv4(StackedLinearNet):
    """D -> 2D -> 2D -> 4D -> 4D -> 2D -> 2D -> D, no dropout."""

    widths = (2, 2, 4, 4, 2, 2, 1)


class MyResidualNet(nn.Module):
    """x + f(x), f: D -> 2D -> activation -> D with its last layer zero-initialised.

    New in this project: it starts as the identity, so training can only move embeddings as far
    as the loss asks, and the output keeps the sign structure of the input (the MLPs above end in
    an activation, which maps every embedding into the positive orthant for ReLU).
    """

    def __init__(self, nOut: int = 512, activation: str = "ReLU"):
        super().__init__()
        self.hidden = nn.Linear(nOut, 2 * nOut)
        self.activation = make_activation(activation)
        self.out = nn.Linear(2 * nOut, nOut)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.activation(self.hidden(x)))


MODELS = {
    cls.__name__: cls for cls in (MyLinearNet, MyLinearNetv2, MyLinearNetv3, MyLinearNetv4, MyResidualNet)
}


def model_class(name: str, source: str | None = None) -> type[nn.Module]:
    """The model class of `name`; an unknown name is an error saying where it was given (`source`)."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS, source)
    return MODELS[name]


def get_model(name: str, **kwargs) -> nn.Module:
    return model_class(name)(**kwargs)
