"""The GE2E voice encoder (3-layer LSTM over 40 power-mel bands, linear, ReLU, L2 norm; 256-dim),
with the pretrained weights shipped inside the `resemblyzer` wheel."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.m_Features import HOP, SAMPLE_RATE, PowerMel, full_precision

PARTIAL_FRAMES = 160
PARTIAL_RATE = 1.3
MIN_COVERAGE = 0.75
INSTALL_HINT = "pip install --no-deps resemblyzer==0.1.4"


@contextmanager
def full_fp32_rnn() -> Iterator[None]:
    """cuDNN runs float32 RNNs in TF32 (10-bit mantissa) by default on recent GPUs; on GE2E's
    power-mel inputs (not logged: a wide dynamic range) that moves embeddings far from the CPU's, so
    its LSTM runs in full float32. ResNetSE34V2's convolutions keep TF32: they agree to cosine 1.0."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is None or not hasattr(rnn, "fp32_precision"):
        yield
        return
    previous = rnn.fp32_precision
    rnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        rnn.fp32_precision = previous


def partial_starts(n_samples: int) -> tuple[list[int], int]:
    """Start frames of the 160-frame partials covering `n_samples`, and the length (samples) to
    zero-pad the waveform to, following the package's embed_utterance (1.3 partials per second; a last
    partial covering less than 75 % of its span is dropped unless it is the only one)."""
    n_frames = math.ceil((n_samples + 1) / HOP)
    step = round(SAMPLE_RATE / PARTIAL_RATE / HOP)
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
    last_start = starts[-1] * HOP
    coverage = (n_samples - last_start) / (PARTIAL_FRAMES * HOP)
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts.pop()
    return starts, max(n_samples, (starts[-1] + PARTIAL_FRAMES) * HOP)


class GE2E(nn.Module):
    """Waveform crops (B, samples) at 16 kHz -> L2-normalised embeddings (B, 256): each crop is split
    into 160-frame partials whose embeddings are averaged and renormalised."""

    embed_dim = 256

    def __init__(self, n_mels: int = 40, hidden: int = 256, layers: int = 3):
        super().__init__()
        self.features = PowerMel(n_mels=n_mels)
        self.lstm = nn.LSTM(n_mels, hidden, layers, batch_first=True)
        self.linear = nn.Linear(hidden, self.embed_dim)

    def embed_frames(self, mels: torch.Tensor) -> torch.Tensor:
        """Mel frames (N, frames, n_mels) -> L2-normalised embeddings (N, 256). The LSTM runs in float32
        also under autocast: in bfloat16 it moved embeddings to cosine 0.998 of float32 (on a CPU)."""
        with full_fp32_rnn(), full_precision(mels.device):
            _, (hidden, _) = self.lstm(mels.float())
        return F.normalize(torch.relu(self.linear(hidden[-1])), dim=1)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        starts, padded_len = partial_starts(wave.shape[1])
        wave = F.pad(wave, (0, padded_len - wave.shape[1]))
        mels = self.features(wave)
        partials = torch.stack([mels[:, s : s + PARTIAL_FRAMES] for s in starts], dim=1)
        embeds = self.embed_frames(partials.flatten(0, 1)).view(wave.shape[0], len(starts), -1)
        return F.normalize(embeds.mean(dim=1), dim=1)


def packaged_weights() -> Path | None:
    """Path of `pretrained.pt` inside the installed resemblyzer package (not imported), or None."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "pretrained.pt"
    return path if path.is_file() else None


def select_weights(checkpoint: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The encoder's tensors from a resemblyzer checkpoint (`model_state`) or a bare state dict,
    and what else the file holds: the GE2E loss' similarity scale/bias are not part of the encoder."""
    state = checkpoint.get("model_state", checkpoint)
    unused = [key for key in state if key.startswith("similarity_")]
    unused += [key for key in checkpoint if key != "model_state"] if "model_state" in checkpoint else []
    return {key: value for key, value in state.items() if key not in unused}, sorted(unused)
