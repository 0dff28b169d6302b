"""Compressed audio files written with PyAV's encoders, for the tests, the benchmark and the GPU check."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

# Suffix -> FFmpeg encoder and its options. FFmpeg's own Vorbis encoder is marked experimental and
# encodes stereo only; the others take mono or stereo.
ENCODERS: dict[str, tuple[str, dict[str, str]]] = {
    ".m4a": ("aac", {}),
    ".mp3": ("libmp3lame", {}),
    ".opus": ("libopus", {}),
    ".ogg": ("vorbis", {"strict": "experimental"}),
}


def missing_encoder(suffix: str) -> str | None:
    """Why files of `suffix` cannot be written with this PyAV build, or None where they can."""
    codec = ENCODERS[suffix][0]
    try:
        av.codec.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError:
        return f"this PyAV build has no {codec} encoder for {suffix} files"
    return None


def write_encoded(path: Path, samples: np.ndarray, rate: int) -> None:
    """Encode float samples in [-1, 1], (n,) mono or (n, 2) stereo, at `rate` into `path`, with the
    container its suffix names and the encoder of ENCODERS. PyAV cuts the audio into the encoder's frames."""
    codec, options = ENCODERS[path.suffix.lower()]
    layout = "mono" if samples.ndim == 1 else "stereo"
    planar = np.ascontiguousarray(np.atleast_2d(samples.T), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout, options=options)
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def voice_like(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced-speech-like float64 waveform: harmonics of a gliding pitch under a syllable-rate envelope,
    plus a little noise; peaks below 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = (110 + 30 * seed) * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 12) if k * pitch.max() < rate / 2)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 2 * np.pi))
    return 0.15 * envelope * harmonics + 0.01 * rng.standard_normal(t.size)
