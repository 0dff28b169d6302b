"""Registry of speaker extractors: name -> constructor, checkpoint reader and default weights."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from m_utils import UserError, unknown_name
from models import GE2E, ResNetSE34V2
from models.m_Checkpoints import read_checkpoint

log = logging.getLogger("m_Extractors")


@dataclass(frozen=True)
class ExtractorEntry:
    """How to build one extractor and fill it from a checkpoint file."""

    build: Callable[[], nn.Module]
    select_weights: Callable[[dict], tuple[dict[str, torch.Tensor], list[str]]]
    default_weights: Callable[[], Path | None]
    no_weights_hint: str


EXTRACTORS: dict[str, ExtractorEntry] = {
    "GE2E": ExtractorEntry(
        GE2E.GE2E,
        GE2E.select_weights,
        GE2E.packaged_weights,
        f"its pretrained weights ship with the resemblyzer wheel, which is not installed: "
        f"{GE2E.INSTALL_HINT}",
    ),
    "ResNetSE34V2": ExtractorEntry(
        ResNetSE34V2.ResNetSE34V2, ResNetSE34V2.select_weights, lambda: None, ResNetSE34V2.WEIGHTS_HINT
    ),
}
DEFAULT_EXTRACTOR = "GE2E"


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module`; every tensor of the module must be present with its shape, and no
    tensor may be left over: otherwise a UserError naming `source` (never a partial load)."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshaped = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(value.shape)})"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise UserError(f"{source}: weights do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def extractor_entry(name: str, source: str | None = None) -> ExtractorEntry:
    """The entry of extractor `name`; an unknown name is an error saying where it was given (`source`)."""
    if name not in EXTRACTORS:
        raise unknown_name("extractor", name, EXTRACTORS, source)
    return EXTRACTORS[name]


def weights_path(
    name: str, initial_model: str | Path | None = None, random_init: bool = False
) -> Path | None:
    """The weights file load_extractor reads for these options: `initial_model`, else the extractor's
    default weights; None with `random_init` (and no `initial_model`)."""
    entry = extractor_entry(name)
    if initial_model is not None and random_init:
        raise UserError("--random_init and --initial_model exclude each other")
    if random_init:
        return None
    path = Path(initial_model) if initial_model is not None else entry.default_weights()
    if path is None:
        raise UserError(f"{name} needs weights: {entry.no_weights_hint}")
    return path


def load_extractor(
    name: str,
    initial_model: str | Path | None = None,
    random_init: bool = False,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build extractor `name` in eval mode on `device`, with weights from `initial_model`, else its
    default weights; untrained only with `random_init` (and no `initial_model`)."""
    path = weights_path(name, initial_model, random_init)
    entry = EXTRACTORS[name]
    model = entry.build()
    if path is not None:
        weights, unused = entry.select_weights(read_checkpoint(path, "weights file"))
        if unused:
            log.info("%s: loading the %s weights; not used: %s", path, name, ", ".join(unused))
        load_state_strict(model, weights, str(path))
    return model.to(device).eval()
