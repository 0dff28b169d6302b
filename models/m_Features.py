"""Torch front ends of the extractors: mel filterbanks, pre-emphasis, power spectrogram, and the two
feature pipelines built from them (log-mel with instance norm, and plain power mel)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000  # every extractor works on 16 kHz audio
HOP = 160  # samples between frames (10 ms): one frame of eval_frames

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray | float, scale: str) -> np.ndarray:
    """Frequency in Hz to mel, on the `htk` or `slaney` scale."""
    hz = np.asarray(hz, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    if scale == "slaney":
        log_part = _SLANEY_BREAK_MEL + np.log(np.maximum(hz, 1e-10) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
        return np.where(hz >= _SLANEY_BREAK_HZ, log_part, hz / _SLANEY_HZ_PER_MEL)
    raise ValueError(f"unknown mel scale {scale!r}")


def mel_to_hz(mel: np.ndarray, scale: str) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if scale == "slaney":
        log_part = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL))
        return np.where(mel >= _SLANEY_BREAK_MEL, log_part, mel * _SLANEY_HZ_PER_MEL)
    raise ValueError(f"unknown mel scale {scale!r}")


def mel_filterbank(
    n_fft: int, n_mels: int, scale: str, normalise: bool, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """Triangular mel filters from 0 Hz to Nyquist, shape (n_mels, n_fft // 2 + 1), float32.

    `normalise` scales each triangle to unit area (Slaney's normalisation); otherwise peaks are 1.
    """
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges_mel = np.linspace(hz_to_mel(0.0, scale), hz_to_mel(sample_rate / 2, scale), n_mels + 2)
    edges_hz = mel_to_hz(edges_mel, scale)
    widths = np.diff(edges_hz)
    offsets = edges_hz[:, None] - fft_hz[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    if normalise:
        bank *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return torch.from_numpy(bank.astype(np.float32))


def full_precision(device: torch.device) -> torch.autocast:
    """A block that runs in float32 inside a mixed-precision (autocast) pass on `device`."""
    return torch.autocast(device.type, enabled=False)


def pre_emphasis(wave: torch.Tensor, coef: float = 0.97) -> torch.Tensor:
    """y[t] = x[t] - coef * x[t-1] on (B, N), with x[-1] taken as x[1] (reflection)."""
    padded = torch.cat([wave[:, 1:2], wave], dim=1)
    return padded[:, 1:] - coef * padded[:, :-1]


def power_spectrogram(
    wave: torch.Tensor, n_fft: int, win_length: int, hop: int, window: torch.Tensor, pad_mode: str
) -> torch.Tensor:
    """|STFT|^2 of (B, N) with centred frames -> (B, n_fft // 2 + 1, frames)."""
    spec = torch.stft(
        wave,
        n_fft=n_fft,
        hop_length=hop,
        win_length=win_length,
        window=window,
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    )
    return spec.abs().pow(2.0)


class LogMelInstanceNorm(nn.Module):
    """ResNetSE34V2 front end: pre-emphasis, Hamming power STFT, HTK mel (unnormalised), log, and
    per-utterance instance normalisation. (B, N) -> (B, n_mels, frames), always in float32: under
    bfloat16 autocast the mel sums before the log made most of ResNetSE34V2's distance to float32."""

    window: torch.Tensor
    mel_fb: torch.Tensor

    def __init__(self, n_mels: int = 64, n_fft: int = 512, win_length: int = 400, hop: int = 160):
        super().__init__()
        self.n_fft, self.win_length, self.hop = n_fft, win_length, hop
        self.register_buffer("window", torch.hamming_window(win_length), persistent=False)
        self.register_buffer(
            "mel_fb", mel_filterbank(n_fft, n_mels, "htk", normalise=False), persistent=False
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with full_precision(wave.device):
            wave = pre_emphasis(wave.float())
            power = power_spectrogram(wave, self.n_fft, self.win_length, self.hop, self.window, "reflect")
            logmel = torch.log(torch.matmul(self.mel_fb, power) + 1e-6)
            return F.instance_norm(logmel, eps=1e-5)


class PowerMel(nn.Module):
    """GE2E front end: Hann power STFT with zero-padded centred frames and Slaney-normalised mel,
    not logged. (B, N) -> (B, frames, n_mels), always in float32."""

    window: torch.Tensor
    mel_fb: torch.Tensor

    def __init__(self, n_mels: int = 40, n_fft: int = 400, hop: int = 160):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer(
            "mel_fb", mel_filterbank(n_fft, n_mels, "slaney", normalise=True), persistent=False
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with full_precision(wave.device):
            power = power_spectrogram(wave.float(), self.n_fft, self.n_fft, self.hop, self.window, "constant")
            return torch.matmul(self.mel_fb, power).transpose(1, 2)
