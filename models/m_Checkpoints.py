"""voxceleb_trainer's checkpoint layout: every model file the project reads goes through
read_checkpoint, and voxceleb_trainer_state flattens the original repository's three checkpoint
formats into one `__S__.*` (speaker model) / `__L__.*` (loss) state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from m_utils import UserError


def read_checkpoint(path: str | os.PathLike, what: str, device: Any = "cpu") -> dict:
    """The dict stored in a torch checkpoint, read with weights_only=True (no code is run).

    `what` names the file's role in errors ("checkpoint", "weights file", "softmax_init checkpoint").
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise UserError(
            f"{path}: not a readable {what}, truncated or foreign ({type(err).__name__}: {detail})"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: a {what} holds a dict of tensors, this one a {type(state).__name__}")
    return state


SPEAKER_PREFIX, LOSS_PREFIX = "__S__.", "__L__."  # the speaker model's and the loss's keys


def voxceleb_trainer_state(checkpoint: dict) -> tuple[dict, list[str]]:
    """The flat `__S__.*` / `__L__.*` state of a voxceleb_trainer-style checkpoint, in any of its
    three formats: the bare state dict (the released `baseline_v2_ap.model`), the current
    `{"model_state_dict": ..., "optimizer_state_dict": ..., ...}`, and the legacy `{"model": ...}`
    whose names lack the `__S__.` prefix; a `module.` prefix (DataParallel) is dropped. Also the
    names of the file's other entries (optimiser state, epoch, ...), which hold no weights."""
    if isinstance(checkpoint.get("model_state_dict"), dict):
        container = "model_state_dict"
    elif isinstance(checkpoint.get("model"), dict):
        container = "model"
    else:
        container = None
    state = checkpoint if container is None else checkpoint[container]
    flat = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if container == "model" and not key.startswith((SPEAKER_PREFIX, LOSS_PREFIX)):
            key = SPEAKER_PREFIX + key
        flat[key] = value
    others = [] if container is None else sorted(key for key in checkpoint if key != container)
    return flat, others
