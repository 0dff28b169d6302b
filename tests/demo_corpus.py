"""Deterministic synthetic speech corpus for the demo and the tests.

No public speech corpus can be downloaded here, so the demo makes one: speech-like audio from a
source-filter synthesiser (a Rosenberg glottal pulse train with jitter, shimmer and aspiration, a
Klatt-style cascade of five formant resonators updated every 5 ms, parallel frication noise). Each
speaker has fixed voice parameters; each session (the *category* of the trees) passes the voice
through a channel (band-pass, EQ peaks, sometimes reverberation, coloured noise at some SNR) drawn
from a set of channel types that all speakers share. Four sets are written:

- ``<out>/vox_train/<id9xxxx>/<session>/<nnnnn>.wav``: VoxCeleb layout, training speakers;
- ``<out>/vox_test/...``: the same layout and channel types, other speakers (the in-domain test set);
- ``<out>/libri/<spk>/<chapter>/<spk>-<chapter>-<nnnn>.flac``: LibriSpeech layout, other speakers
  and other channel types (the out-of-domain test set).
- ``<out>/vox_calib/<id8xxxx>/...``: VoxCeleb layout and channel types, other speakers again, with
  utterances of widely varied length (held out to calibrate scores, QMF included).

Every file is 16 kHz mono 16-bit PCM. Its random numbers come from a generator seeded with
(seed, set, speaker, session, utterance), so the bytes do not depend on the number of worker
processes. Existing files are skipped; new files are written under a temporary name in the same
folder and renamed into place. Nothing is ever deleted.

Run: ``python tests/demo_corpus.py --out demo_out/audio [--seed 0] [--workers 2] ...``
All synthesis parameters are in the "Parameters" section below.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import fft, signal
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m_utils import atomic_write  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Parameters. Every number the synthesis uses is here. A range (lo, hi) is drawn uniformly.

Range = tuple[float, float]

#: Vowel targets (F1, F2, F3 in Hz) of an average adult male voice (after Peterson & Barney 1952
#: and Hillenbrand et al. 1995); each speaker scales them by its vocal-tract factor.
VOWELS: dict[str, tuple[float, float, float]] = {
    "i": (270, 2290, 3010),
    "I": (390, 1990, 2550),
    "e": (530, 1840, 2480),
    "ae": (660, 1720, 2410),
    "a": (730, 1090, 2440),
    "o": (570, 840, 2410),
    "U": (440, 1020, 2240),
    "u": (300, 870, 2240),
    "V": (640, 1190, 2390),
    "er": (490, 1350, 1690),
}

#: Voiced consonant targets: (F1, F2, F3, amplitude relative to a vowel).
SONORANTS: dict[str, tuple[float, float, float, float]] = {
    "m": (280, 1100, 2200, 0.30),
    "n": (280, 1500, 2500, 0.30),
    "l": (360, 1100, 2700, 0.55),
    "r": (350, 1100, 1600, 0.55),
    "w": (300, 700, 2200, 0.50),
    "y": (270, 2200, 2900, 0.50),
}

#: Frication noise bands (low, high Hz) and their level relative to a vowel.
NOISE_BANDS: dict[str, tuple[float, float, float]] = {
    "s": (4200.0, 7600.0, 0.12),
    "sh": (2000.0, 5000.0, 0.12),
    "f": (1000.0, 7600.0, 0.04),
}

#: Obstruents: (noise band, voiced?, stop?). A stop is a closure followed by a burst of its band.
OBSTRUENTS: dict[str, tuple[str, bool, bool]] = {
    "s": ("s", False, False),
    "z": ("s", True, False),
    "sh": ("sh", False, False),
    "f": ("f", False, False),
    "v": ("f", True, False),
    "p": ("f", False, True),
    "b": ("f", True, True),
    "t": ("s", False, True),
    "d": ("s", True, True),
    "k": ("sh", False, True),
    "g": ("sh", True, True),
}


@dataclass(frozen=True)
class ChannelType:
    """A kind of recording channel; each session draws its exact settings from these ranges."""

    name: str
    low_hz: Range  # high-pass corner of the band-pass
    high_hz: Range  # low-pass corner of the band-pass
    bandpass_order: int  # Butterworth order of each corner
    eq_peaks: tuple[int, int]  # how many peaking-EQ bands (min, max)
    eq_gain_db: float  # each EQ gain is drawn in [-eq_gain_db, eq_gain_db]
    reverb_prob: float  # chance that a session is reverberant
    rt60_s: Range  # reverberation time when it is
    direct_ratio: Range  # weight of the direct path against the reverberant tail
    noise: tuple[str, ...]  # noise colours to choose from: white, pink, brown, hum, babble
    snr_db: Range  # signal-to-noise ratio of the session
    drive: Range  # soft-clipping drive (1 = almost linear)


#: Channel types of the VoxCeleb-layout sets (shared by vox_train and vox_test).
VOX_CHANNELS: tuple[ChannelType, ...] = (
    ChannelType(
        "studio",
        (50, 90),
        (7000, 7800),
        2,
        (1, 2),
        2.0,
        0.1,
        (0.2, 0.35),
        (0.75, 0.9),
        ("white", "pink"),
        (32, 40),
        (1.0, 1.1),
    ),
    ChannelType(
        "interview_room",
        (80, 150),
        (6000, 7600),
        2,
        (1, 3),
        3.0,
        0.5,
        (0.25, 0.5),
        (0.5, 0.8),
        ("pink", "babble"),
        (24, 34),
        (1.0, 1.2),
    ),
    ChannelType(
        "phone",
        (150, 250),
        (4000, 4800),
        2,
        (1, 2),
        4.0,
        0.1,
        (0.2, 0.3),
        (0.7, 0.85),
        ("white", "pink"),
        (24, 32),
        (1.0, 1.3),
    ),
    ChannelType(
        "outdoor_lapel",
        (100, 180),
        (5500, 7200),
        2,
        (1, 2),
        3.0,
        0.0,
        (0.2, 0.3),
        (1.0, 1.0),
        ("brown", "pink"),
        (20, 28),
        (1.0, 1.2),
    ),
    ChannelType(
        "laptop",
        (150, 250),
        (5000, 7000),
        2,
        (1, 3),
        4.0,
        0.3,
        (0.2, 0.4),
        (0.6, 0.85),
        ("hum", "white"),
        (24, 32),
        (1.0, 1.3),
    ),
    ChannelType(
        "broadcast",
        (60, 120),
        (6500, 7800),
        2,
        (1, 2),
        3.0,
        0.2,
        (0.25, 0.45),
        (0.65, 0.85),
        ("babble", "white"),
        (26, 34),
        (1.0, 1.3),
    ),
)

#: Channel types of the LibriSpeech-layout set: read speech at home, none of them in VOX_CHANNELS.
LIBRI_CHANNELS: tuple[ChannelType, ...] = (
    ChannelType(
        "audiobook_condenser",
        (30, 60),
        (7600, 7900),
        2,
        (1, 2),
        2.0,
        0.2,
        (0.15, 0.3),
        (0.75, 0.9),
        ("white",),
        (28, 38),
        (1.0, 1.1),
    ),
    ChannelType(
        "usb_headset",
        (100, 180),
        (6000, 7200),
        3,
        (2, 3),
        5.0,
        0.0,
        (0.2, 0.3),
        (1.0, 1.0),
        ("white", "hum"),
        (20, 30),
        (1.0, 1.3),
    ),
    ChannelType(
        "home_office",
        (70, 130),
        (6500, 7600),
        2,
        (1, 3),
        4.0,
        0.6,
        (0.25, 0.5),
        (0.55, 0.8),
        ("pink", "brown"),
        (20, 30),
        (1.0, 1.2),
    ),
)


@dataclass(frozen=True)
class SynthParams:
    """Voice, prosody, timing and level parameters of the synthesiser (ranges are (lo, hi))."""

    sample_rate: int = 16000
    frame_ms: float = 5.0  # formant and gain tracks are updated every frame
    utt_seconds: Range = (3.0, 4.5)  # utterance length
    # vox_calib's utterances span short and long ones, so that a quality-aware back-end (QMF),
    # calibrated on them, sees how scores change with duration
    calib_seconds: Range = (0.8, 4.5)
    # speaker: source
    f0_male_hz: Range = (85.0, 150.0)  # mean pitch of a male speaker
    f0_female_hz: Range = (160.0, 250.0)  # mean pitch of a female speaker
    f0_range_st: Range = (1.5, 5.0)  # pitch excursion of accents, in semitones
    open_quotient: Range = (0.45, 0.75)  # open phase of the Rosenberg pulse, fraction of a period
    speed_quotient: Range = (1.5, 4.0)  # opening / closing time of the pulse
    tilt: Range = (0.0, 0.7)  # one-pole low-pass coefficient on the source (spectral tilt)
    breathiness: Range = (0.01, 0.12)  # aspiration noise level relative to the pulses
    jitter: Range = (0.003, 0.02)  # relative s.d. of each period
    shimmer: Range = (0.02, 0.10)  # relative s.d. of each pulse amplitude
    # speaker: filter
    vtl_male: Range = (0.84, 1.04)  # formant scale factor (inverse vocal-tract length) of a male
    vtl_female: Range = (1.06, 1.30)  # ... of a female
    formant_spread: float = 0.10  # s.d. of each speaker's own factor on F1..F5
    vowel_spread: float = 0.10  # s.d. of each speaker's own factor on each vowel formant target
    bandwidth_scale: Range = (0.8, 1.5)  # factor on the formant bandwidths
    higher_formants_hz: tuple[float, float] = (3400.0, 4300.0)  # F4, F5 before the vocal-tract factor
    bandwidths_hz: tuple[float, ...] = (70.0, 100.0, 140.0, 220.0, 300.0)  # B1..B5
    vowel_preference: float = 0.7  # Dirichlet concentration of a speaker's vowel frequencies
    timbre_peaks: int = 3  # fixed peaking-EQ bands of a speaker's voice (nasal/sinus colour)
    timbre_gain_db: float = 12.0  # their gains are drawn in [-timbre_gain_db, timbre_gain_db]
    timbre_hz: Range = (300.0, 5000.0)  # their centre frequencies (log-uniform)
    # speaker: timing
    rate: Range = (0.8, 1.25)  # speaking-rate factor (durations are divided by it)
    # session: how much a speaker's voice varies from one session to the next
    session_f0_st: float = 1.0  # s.d. of the session pitch shift, semitones
    session_rate: float = 0.05  # s.d. of the relative session rate change
    session_effort: float = 0.1  # s.d. of the session change of spectral tilt
    # segments, in ms at rate 1
    vowel_ms: Range = (90.0, 190.0)
    sonorant_ms: Range = (45.0, 80.0)
    fricative_ms: Range = (70.0, 140.0)
    closure_ms: Range = (40.0, 80.0)
    burst_ms: Range = (10.0, 25.0)
    pause_ms: Range = (120.0, 300.0)
    edge_silence_ms: Range = (60.0, 200.0)  # silence at both ends of an utterance
    onset_prob: float = 0.75  # chance of a syllable onset consonant
    cluster_prob: float = 0.15  # chance that the onset is followed by a liquid/glide
    coda_prob: float = 0.45  # chance of a coda consonant
    pause_prob: float = 0.12  # chance of a pause after a syllable
    sonorant_share: float = 0.4  # share of sonorants among the consonants
    smoothing_ms: float = 30.0  # formant transition smoothing (Hann window length)
    declination_st: float = 2.0  # pitch fall over an utterance, semitones
    # level
    rms_dbfs: float = -24.0  # level of the finished utterance
    level_jitter_db: float = 0.5  # s.d. of the per-utterance level
    # channels
    vox_channels: tuple[ChannelType, ...] = VOX_CHANNELS
    libri_channels: tuple[ChannelType, ...] = LIBRI_CHANNELS
    max_reverb_s: float = 0.8  # longest impulse response
    eq_hz: Range = (200.0, 6000.0)  # centre frequencies of the channel EQ bands (log-uniform)


@dataclass(frozen=True)
class CorpusSizes:
    """How many speakers, sessions and utterances each set has."""

    train_speakers: int = 120
    train_sessions: int = 4
    test_speakers: int = 60
    test_sessions: int = 3
    libri_speakers: int = 40
    libri_sessions: int = 3
    utterances: int = 3
    calib_speakers: int = 30
    calib_sessions: int = 3


SETS = ("vox_train", "vox_test", "libri", "vox_calib")
SPK_ID_OFFSET = {"vox_train": 0, "vox_test": 5000, "libri": 0, "vox_calib": 0}
MAX_SPEAKERS = 5000
SESSION_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))

# ----------------------------------------------------------------------------------------------
# Random draws: every object is seeded by its position, never by the order of the work.


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """A generator for one object of the corpus, keyed by (seed, set, speaker, session, utterance)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def uniform(rng: np.random.Generator, rng_range: Range) -> float:
    return float(rng.uniform(rng_range[0], rng_range[1]))


@dataclass(frozen=True)
class Voice:
    """One speaker's fixed voice."""

    f0: float
    f0_range_st: float
    open_quotient: float
    speed_quotient: float
    tilt: float
    breathiness: float
    jitter: float
    shimmer: float
    formant_factors: tuple[float, ...]  # F1..F5 factor (vocal-tract scale x own factor)
    vowel_factors: dict[str, tuple[float, float, float]] = field(hash=False)
    vowel_weights: tuple[float, ...]
    bandwidth_scale: float
    rate: float
    timbre: np.ndarray = field(hash=False)  # second-order sections of the voice colour


def draw_voice(rng: np.random.Generator, p: SynthParams) -> Voice:
    """Draw a speaker's voice parameters."""
    female = rng.random() < 0.5
    vtl = uniform(rng, p.vtl_female if female else p.vtl_male)
    own = 1.0 + p.formant_spread * rng.standard_normal(5)
    vowel_factors = {
        v: tuple(float(x) for x in 1.0 + p.vowel_spread * rng.standard_normal(3)) for v in VOWELS
    }
    return Voice(
        f0=uniform(rng, p.f0_female_hz if female else p.f0_male_hz),
        f0_range_st=uniform(rng, p.f0_range_st),
        open_quotient=uniform(rng, p.open_quotient),
        speed_quotient=uniform(rng, p.speed_quotient),
        tilt=uniform(rng, p.tilt),
        breathiness=uniform(rng, p.breathiness),
        jitter=uniform(rng, p.jitter),
        shimmer=uniform(rng, p.shimmer),
        formant_factors=tuple(float(x) for x in vtl * own),
        vowel_factors=vowel_factors,
        vowel_weights=tuple(float(x) for x in rng.dirichlet([p.vowel_preference] * len(VOWELS))),
        bandwidth_scale=uniform(rng, p.bandwidth_scale),
        rate=uniform(rng, p.rate),
        timbre=random_peaks(
            rng, p.timbre_peaks, p.timbre_peaks, p.timbre_gain_db, p.timbre_hz, p.sample_rate
        ),
    )


def session_voice(voice: Voice, rng: np.random.Generator, p: SynthParams) -> Voice:
    """The speaker's voice on the day of one session: small pitch, rate and effort changes."""
    return replace(
        voice,
        f0=voice.f0 * 2.0 ** (p.session_f0_st * rng.standard_normal() / 12.0),
        rate=voice.rate * (1.0 + p.session_rate * rng.standard_normal()),
        tilt=float(np.clip(voice.tilt + p.session_effort * rng.standard_normal(), 0.0, 0.9)),
    )


@dataclass(frozen=True)
class Channel:
    """One session's exact channel."""

    bandpass: np.ndarray  # second-order sections
    eq: np.ndarray  # second-order sections (possibly none)
    impulse: np.ndarray | None  # room impulse response, None when dry
    noise: str
    snr_db: float
    drive: float


def peaking_eq(freq: float, gain_db: float, q: float, fs: int) -> np.ndarray:
    """One peaking-EQ biquad (RBJ audio-EQ cookbook) as a second-order section."""
    amp = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * freq / fs
    alpha = np.sin(w0) / (2.0 * q)
    b = np.array([1.0 + alpha * amp, -2.0 * np.cos(w0), 1.0 - alpha * amp])
    a = np.array([1.0 + alpha / amp, -2.0 * np.cos(w0), 1.0 - alpha / amp])
    return np.concatenate([b / a[0], a / a[0]])


def random_peaks(
    rng: np.random.Generator, lo: int, hi: int, gain_db: float, hz: Range, fs: int
) -> np.ndarray:
    """Between lo and hi peaking-EQ bands at log-uniform frequencies, as (n, 6) sections."""
    peaks = [
        peaking_eq(
            float(np.exp(rng.uniform(np.log(hz[0]), np.log(hz[1])))),
            float(rng.uniform(-gain_db, gain_db)),
            float(rng.uniform(0.7, 3.0)),
            fs,
        )
        for _ in range(int(rng.integers(lo, hi + 1)))
    ]
    return np.array(peaks).reshape(-1, 6)


def room_impulse(rng: np.random.Generator, rt60: float, direct: float, p: SynthParams) -> np.ndarray:
    """A simple room response: a direct path plus exponentially decaying low-passed noise."""
    n = int(min(rt60, p.max_reverb_s) * p.sample_rate)
    t = np.arange(n) / p.sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    tail = signal.lfilter([0.6], [1.0, -0.4], tail)
    delay = int(rng.uniform(0.002, 0.01) * p.sample_rate)
    tail[:delay] = 0.0
    tail *= (1.0 - direct) / (np.sqrt(np.sum(tail**2)) + 1e-12)
    tail[0] += direct
    return tail


def draw_channel(rng: np.random.Generator, types: Sequence[ChannelType], p: SynthParams) -> Channel:
    """Draw a channel type and then its exact settings."""
    kind = types[int(rng.integers(len(types)))]
    fs = p.sample_rate
    bandpass = signal.butter(
        kind.bandpass_order,
        [uniform(rng, kind.low_hz), uniform(rng, kind.high_hz)],
        btype="bandpass",
        fs=fs,
        output="sos",
    )
    eq = random_peaks(rng, kind.eq_peaks[0], kind.eq_peaks[1], kind.eq_gain_db, p.eq_hz, fs)
    reverberant = rng.random() < kind.reverb_prob
    rt60, direct = uniform(rng, kind.rt60_s), uniform(rng, kind.direct_ratio)
    impulse = room_impulse(rng, rt60, direct, p) if reverberant else None
    return Channel(
        bandpass=bandpass,
        eq=eq,
        impulse=impulse,
        noise=str(rng.choice(kind.noise)),
        snr_db=uniform(rng, kind.snr_db),
        drive=uniform(rng, kind.drive),
    )


# ----------------------------------------------------------------------------------------------
# Utterance plan: a sequence of segments with formant, voicing and noise targets.


@dataclass
class Tracks:
    """Frame-rate control tracks of one utterance."""

    formants: np.ndarray  # (frames, 5) Hz
    voicing: np.ndarray  # (frames,) glottal source gain
    noise: dict[str, np.ndarray]  # band name -> (frames,) frication gain
    accent: np.ndarray  # (frames,) 0..1 pitch accent


def _ms_frames(rng: np.random.Generator, ms_range: Range, rate: float, frame_ms: float) -> int:
    return max(1, int(round(uniform(rng, ms_range) / rate / frame_ms)))


def vowel_formants(voice: Voice, vowel: str, p: SynthParams) -> np.ndarray:
    f123 = np.array(VOWELS[vowel]) * np.array(voice.vowel_factors[vowel])
    return np.concatenate([f123, p.higher_formants_hz]) * np.array(voice.formant_factors)


def sonorant_formants(voice: Voice, name: str, p: SynthParams) -> np.ndarray:
    return np.concatenate([SONORANTS[name][:3], p.higher_formants_hz]) * np.array(voice.formant_factors)


def plan_segments(rng: np.random.Generator, voice: Voice, n_frames: int, p: SynthParams) -> list[tuple]:
    """Syllables (onset, vowel, coda) and pauses until the utterance is full.

    Each segment is (frames, formants or None, voicing gain, noise band or None, noise gain, accent).
    """
    fm = p.frame_ms
    vowels, weights = list(VOWELS), np.array(voice.vowel_weights)
    sonorants, obstruents = list(SONORANTS), list(OBSTRUENTS)
    segs: list[tuple] = [(_ms_frames(rng, p.edge_silence_ms, 1.0, fm), None, 0.0, None, 0.0, 0.0)]

    def consonant() -> list[tuple]:
        if rng.random() < p.sonorant_share:
            name = sonorants[int(rng.integers(len(sonorants)))]
            amp = SONORANTS[name][3]
            return [
                (
                    _ms_frames(rng, p.sonorant_ms, voice.rate, fm),
                    sonorant_formants(voice, name, p),
                    amp,
                    None,
                    0.0,
                    0.0,
                )
            ]
        band, voiced, stop = OBSTRUENTS[obstruents[int(rng.integers(len(obstruents)))]]
        level = NOISE_BANDS[band][2]
        if stop:
            return [
                (_ms_frames(rng, p.closure_ms, voice.rate, fm), None, 0.08 * voiced, None, 0.0, 0.0),
                (_ms_frames(rng, p.burst_ms, voice.rate, fm), None, 0.0, band, 2.0 * level, 0.0),
            ]
        return [(_ms_frames(rng, p.fricative_ms, voice.rate, fm), None, 0.25 * voiced, band, level, 0.0)]

    total = segs[0][0]
    while total < n_frames:
        syllable: list[tuple] = []
        if rng.random() < p.onset_prob:
            syllable += consonant()
            if rng.random() < p.cluster_prob:
                name = ("l", "r", "w", "y")[int(rng.integers(4))]
                syllable.append(
                    (
                        _ms_frames(rng, p.sonorant_ms, voice.rate, fm),
                        sonorant_formants(voice, name, p),
                        SONORANTS[name][3],
                        None,
                        0.0,
                        0.0,
                    )
                )
        vowel = vowels[int(rng.choice(len(vowels), p=weights))]
        accent = float(rng.random() ** 2)
        syllable.append(
            (
                _ms_frames(rng, p.vowel_ms, voice.rate, fm),
                vowel_formants(voice, vowel, p),
                1.0,
                None,
                0.0,
                accent,
            )
        )
        if rng.random() < p.coda_prob:
            syllable += consonant()
        if rng.random() < p.pause_prob:
            syllable.append((_ms_frames(rng, p.pause_ms, voice.rate, fm), None, 0.0, None, 0.0, 0.0))
        segs += syllable
        total += sum(s[0] for s in syllable)
    return segs


def segments_to_tracks(segs: list[tuple], n_frames: int, p: SynthParams) -> Tracks:
    """Lay the segments out frame by frame, fill formants across obstruents, smooth transitions."""
    lengths = np.array([s[0] for s in segs])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    formants = np.full((total, 5), np.nan)
    voicing, accent = np.zeros(total), np.zeros(total)
    noise = {band: np.zeros(total) for band in NOISE_BANDS}
    for (length, f, v, band, level, acc), s in zip(segs, starts[:-1], strict=True):
        if f is not None:
            formants[s : s + length] = f
        voicing[s : s + length] = v
        accent[s : s + length] = acc
        if band is not None:
            noise[band][s : s + length] = level
    formants = _fill_gaps(formants)
    win = np.hanning(max(3, int(p.smoothing_ms / p.frame_ms)) + 2)[1:-1]
    win /= win.sum()
    log_f = np.log(formants)
    smooth = np.stack(
        [np.convolve(np.pad(c, len(win), mode="edge"), win, "same")[len(win) : -len(win)] for c in log_f.T],
        axis=1,
    )
    ramp = np.hanning(5)[1:-1] / np.hanning(5)[1:-1].sum()

    def soften(x: np.ndarray) -> np.ndarray:
        return np.convolve(x, ramp, "same")[:n_frames]

    return Tracks(
        formants=np.exp(smooth)[:n_frames],
        voicing=soften(voicing),
        noise={band: soften(g) for band, g in noise.items()},
        accent=np.convolve(accent, win, "same")[:n_frames],
    )


def _fill_gaps(formants: np.ndarray) -> np.ndarray:
    """Frames without formant targets take the next target (coarticulation), the last at the end."""
    out = formants.copy()
    valid = ~np.isnan(out[:, 0])
    if not valid.any():
        out[:] = np.array([500, 1500, 2500, 3400, 4300], dtype=float)
        return out
    idx = np.where(valid, np.arange(len(out)), len(out))
    nxt = np.minimum.accumulate(idx[::-1])[::-1]
    last = int(np.flatnonzero(valid)[-1])
    nxt = np.where(nxt >= len(out), last, nxt)
    return out[nxt]


# ----------------------------------------------------------------------------------------------
# Sample-rate synthesis.


def pitch_contour(rng: np.random.Generator, voice: Voice, tracks: Tracks, p: SynthParams) -> np.ndarray:
    """Frame-rate f0 in Hz: declination, accents and a slow random walk."""
    n = len(tracks.voicing)
    decl = np.linspace(0.5, -0.5, n) * p.declination_st
    walk = np.cumsum(rng.standard_normal(n)) * 0.05
    walk = np.convolve(walk - walk.mean(), np.ones(20) / 20, "same")
    semitones = decl + voice.f0_range_st * tracks.accent + walk
    return np.clip(voice.f0 * 2.0 ** (semitones / 12.0), 50.0, 450.0)


def glottal_source(rng: np.random.Generator, voice: Voice, f0: np.ndarray, n: int, fs: int) -> np.ndarray:
    """Rosenberg pulse train (flow derivative) with per-period jitter and shimmer."""
    onsets, periods, amps = [], [], []
    t = 0.0
    while t < n:
        period = fs / f0[min(int(t), n - 1)] * (1.0 + voice.jitter * rng.standard_normal())
        onsets.append(t)
        periods.append(max(period, 8.0))
        amps.append(max(0.0, 1.0 + voice.shimmer * rng.standard_normal()))
        t += periods[-1]
    onsets_a, periods_a, amps_a = np.array(onsets), np.array(periods), np.array(amps)
    samples = np.arange(n, dtype=float)
    k = np.searchsorted(onsets_a, samples, side="right") - 1
    phase = (samples - onsets_a[k]) / periods_a[k]
    t_open = voice.open_quotient * voice.speed_quotient / (1.0 + voice.speed_quotient)
    t_close = voice.open_quotient / (1.0 + voice.speed_quotient)
    flow = np.where(
        phase < t_open,
        0.5 * (1.0 - np.cos(np.pi * phase / t_open)),
        np.where(phase < t_open + t_close, np.cos(0.5 * np.pi * (phase - t_open) / t_close), 0.0),
    )
    return np.diff(flow * amps_a[k], prepend=0.0)


def formant_filter(
    x: np.ndarray, formants: np.ndarray, bandwidths: np.ndarray, hop: int, fs: int, nfft: int = 1024
) -> np.ndarray:
    """Cascade of five Klatt resonators whose settings change every `hop` samples.

    Applied frame by frame in the frequency domain: each Hann-windowed frame of 4 hops (the frames
    add up to a constant) is multiplied by the cascade's complex response for that frame, and the
    results are overlap-added. `nfft` leaves room for the resonators' ringing. `x` holds
    `len(formants) * hop` samples.
    """
    win_len, n_frames = 4 * hop, formants.shape[0]
    window = np.hanning(win_len + 1)[:win_len]
    padded = np.concatenate([np.zeros(3 * hop), x, np.zeros(3 * hop)])
    idx = np.arange(n_frames + 3)[:, None] * hop + np.arange(win_len)[None, :]
    spectra = fft.rfft(padded[idx] * window, nfft)
    frame_formants = formants[np.clip(np.arange(n_frames + 3) - 1, 0, n_frames - 1)]
    radius = np.exp(-np.pi * bandwidths / fs)
    b = 2.0 * radius * np.cos(2.0 * np.pi * frame_formants / fs)
    c = np.broadcast_to(-(radius**2), b.shape)
    denominator = np.zeros((len(b), 11))
    denominator[:, 0] = 1.0
    for k in range(5):
        prev = denominator.copy()
        denominator[:, 1:] -= b[:, k : k + 1] * prev[:, :-1]
        denominator[:, 2:] -= c[:, k : k + 1] * prev[:, :-2]
    gain = np.prod(1.0 - b - c, axis=1, keepdims=True)
    frames = fft.irfft(spectra * gain / fft.rfft(denominator, nfft), nfft)
    y = np.zeros(len(padded) + nfft)
    for i, frame in enumerate(frames):
        y[i * hop : i * hop + nfft] += frame
    return y[3 * hop : 3 * hop + len(x)] * hop / window.sum()


@lru_cache(maxsize=16)
def _band_sos(band: str, fs: int) -> np.ndarray:
    low, high, _ = NOISE_BANDS[band]
    return signal.butter(2, [low, min(high, 0.48 * fs)], btype="bandpass", fs=fs, output="sos")


def synth_voice(rng: np.random.Generator, voice: Voice, n: int, p: SynthParams) -> np.ndarray:
    """The dry speech signal of one utterance, n samples."""
    fs, hop = p.sample_rate, int(p.sample_rate * p.frame_ms / 1000)
    n_frames = -(-n // hop)
    tracks = segments_to_tracks(plan_segments(rng, voice, n_frames, p), n_frames, p)
    f0 = np.repeat(pitch_contour(rng, voice, tracks, p), hop)[:n]
    frame_t = (np.arange(n_frames) + 0.5) * hop
    samples = np.arange(n)
    voicing = np.interp(samples, frame_t, tracks.voicing)
    pulses = glottal_source(rng, voice, f0, n, fs)
    pulses = signal.lfilter([1.0 - voice.tilt], [1.0, -voice.tilt], pulses)
    aspiration = voice.breathiness * 0.05 * rng.standard_normal(n)
    source = np.zeros(n_frames * hop)
    source[:n] = voicing * (pulses + aspiration)
    bandwidths = np.array(p.bandwidths_hz) * voice.bandwidth_scale
    speech = formant_filter(source, tracks.formants, bandwidths, hop, fs)[:n]
    if len(voice.timbre):
        speech = signal.sosfilt(voice.timbre, speech)
    speech /= np.sqrt(np.mean(speech**2)) + 1e-9
    for band, gains in tracks.noise.items():
        if gains.any():
            hiss = signal.sosfilt(_band_sos(band, fs), rng.standard_normal(n))
            speech += np.interp(samples, frame_t, gains) * hiss / (np.std(hiss) + 1e-9)
    return speech


# ----------------------------------------------------------------------------------------------
# Channel.


def coloured_noise(rng: np.random.Generator, colour: str, n: int, fs: int) -> np.ndarray:
    """Unit-power noise of a colour: white, pink, brown, hum (mains + fan), babble (speech-shaped)."""
    white = rng.standard_normal(n)
    if colour == "white":
        out = white
    elif colour == "pink":
        out = signal.lfilter(
            [0.049922, -0.095993, 0.050612, -0.004408], [1.0, -2.494956, 2.017265, -0.522189], white
        )
    elif colour == "brown":
        out = signal.lfilter([1.0], [1.0, -0.995], white)
    elif colour == "hum":
        t = np.arange(n) / fs
        mains = rng.choice([50.0, 60.0])
        out = sum(np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 2 * np.pi)) / h for h in (1, 2, 3, 5))
        out = out / np.std(out) + 0.7 * signal.lfilter([1.0], [1.0, -0.98], white) / 10.0
    elif colour == "babble":
        sos = signal.butter(2, [300.0, 3000.0], btype="bandpass", fs=fs, output="sos")
        envelope = np.abs(signal.lfilter([1.0], [1.0, -0.999], rng.standard_normal(n))) + 0.3
        out = signal.sosfilt(sos, white) * envelope
    else:
        raise ValueError(f"unknown noise colour {colour!r}")
    return out / (np.std(out) + 1e-12)


def apply_channel(rng: np.random.Generator, speech: np.ndarray, ch: Channel, p: SynthParams) -> np.ndarray:
    """Pass dry speech through a session channel and add its noise at its SNR."""
    y = speech
    if ch.impulse is not None:
        y = signal.fftconvolve(y, ch.impulse)[: len(y)]
    y = signal.sosfilt(ch.bandpass, y)
    if len(ch.eq):
        y = signal.sosfilt(ch.eq, y)
    y = y / (np.std(y) + 1e-12)
    if ch.drive > 1.0:
        y = np.tanh(ch.drive * y / 3.0) * 3.0 / ch.drive
    noise = coloured_noise(rng, ch.noise, len(y), p.sample_rate)
    snr = ch.snr_db + rng.normal(0.0, 1.0)
    return y / (np.std(y) + 1e-12) + noise * 10.0 ** (-snr / 20.0)


def finish_level(rng: np.random.Generator, x: np.ndarray, p: SynthParams) -> np.ndarray:
    """Scale to the target level (with a little jitter), limit peaks, quantise to int16."""
    db = p.rms_dbfs + p.level_jitter_db * rng.standard_normal()
    x = x * 10.0 ** (db / 20.0) / (np.sqrt(np.mean(x**2)) + 1e-12)
    peak = np.max(np.abs(x))
    if peak > 0.98:
        x = x * 0.98 / peak
    return np.round(x * 32767.0).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Corpus layout and jobs.


@dataclass(frozen=True)
class Job:
    """One file to write."""

    path: str
    seed: int
    set_index: int
    speaker: int
    session: int
    utterance: int


def speaker_name(set_name: str, index: int) -> str:
    if set_name == "libri":
        return str(1000 + 7 * index)
    prefix = "id8" if set_name == "vox_calib" else "id9"
    return f"{prefix}{SPK_ID_OFFSET[set_name] + index:04d}"


def session_names(seed: int, set_index: int, speaker: int, count: int, libri: bool) -> list[str]:
    """Distinct session names of one speaker: 11-char YouTube-like ids, or 6-digit chapter ids."""
    rng = rng_for(seed, set_index, speaker, 1_000_001)
    names: list[str] = []
    while len(names) < count:
        if libri:
            name = str(int(rng.integers(100000, 1000000)))
        else:
            name = "".join(rng.choice(SESSION_ALPHABET, 11))
        if name not in names:
            names.append(name)
    return names


def file_name(set_name: str, spk: str, session: str, utterance: int) -> str:
    if set_name == "libri":
        return f"{spk}-{session}-{utterance:04d}.flac"
    return f"{utterance + 1:05d}.wav"


def corpus_jobs(out: Path, sizes: CorpusSizes, seed: int) -> list[Job]:
    """Every file of the corpus, in a fixed order."""
    counts = {
        "vox_train": (sizes.train_speakers, sizes.train_sessions),
        "vox_test": (sizes.test_speakers, sizes.test_sessions),
        "libri": (sizes.libri_speakers, sizes.libri_sessions),
        "vox_calib": (sizes.calib_speakers, sizes.calib_sessions),
    }
    jobs = []
    for set_index, set_name in enumerate(SETS):
        n_spk, n_sess = counts[set_name]
        if n_spk > MAX_SPEAKERS:
            raise ValueError(f"{set_name}: at most {MAX_SPEAKERS} speakers")
        for spk in range(n_spk):
            spk_name = speaker_name(set_name, spk)
            names = session_names(seed, set_index, spk, n_sess, set_name == "libri")
            for sess, sess_name in enumerate(names):
                for utt in range(sizes.utterances):
                    name = file_name(set_name, spk_name, sess_name, utt)
                    path = out / set_name / spk_name / sess_name / name
                    jobs.append(Job(str(path), seed, set_index, spk, sess, utt))
    return jobs


def synth_file(job: Job, p: SynthParams) -> np.ndarray:
    """The int16 samples of one file; depends only on the job's keys and the parameters."""
    voice = draw_voice(rng_for(job.seed, job.set_index, job.speaker), p)
    session_rng = rng_for(job.seed, job.set_index, job.speaker, job.session)
    voice = session_voice(voice, session_rng, p)
    types = p.libri_channels if SETS[job.set_index] == "libri" else p.vox_channels
    channel = draw_channel(session_rng, types, p)
    rng = rng_for(job.seed, job.set_index, job.speaker, job.session, job.utterance)
    seconds = p.calib_seconds if SETS[job.set_index] == "vox_calib" else p.utt_seconds
    n = int(uniform(rng, seconds) * p.sample_rate)
    speech = synth_voice(rng, voice, n, p)
    return finish_level(rng, apply_channel(rng, speech, channel, p), p)


def write_audio_atomic(path: Path, samples: np.ndarray, fs: int) -> None:
    """Write 16-bit PCM (WAV or FLAC by suffix) under a temporary name, then rename it into place."""
    fmt = "FLAC" if path.suffix == ".flac" else "WAV"
    atomic_write(path, lambda handle: sf.write(handle, samples, fs, subtype="PCM_16", format=fmt))


def _run_job(args: tuple[Job, SynthParams]) -> str:
    job, p = args
    write_audio_atomic(Path(job.path), synth_file(job, p), p.sample_rate)
    return job.path


def generate(
    out: str | os.PathLike,
    sizes: CorpusSizes | None = None,
    seed: int = 0,
    workers: int = 2,
    params: SynthParams | None = None,
    progress: bool = True,
) -> list[str]:
    """Write the missing files of the corpus under `out`; returns the paths written this time."""
    sizes, params = sizes or CorpusSizes(), params or SynthParams()
    todo = [job for job in corpus_jobs(Path(out), sizes, seed) if not os.path.exists(job.path)]
    bar = tqdm(total=len(todo), desc="synthesising demo corpus", unit="file", disable=not progress)
    written = []
    tasks = [(job, params) for job in todo]
    if workers <= 1 or len(todo) < 2:
        for task in tasks:
            written.append(_run_job(task))
            bar.update()
    else:
        with Pool(workers) as pool:
            for path in pool.imap_unordered(_run_job, tasks, chunksize=4):
                written.append(path)
                bar.update()
    bar.close()
    return sorted(written)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = CorpusSizes()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", default="demo_out/audio", help="output root")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    parser.add_argument("--train_speakers", type=int, default=d.train_speakers)
    parser.add_argument("--test_speakers", type=int, default=d.test_speakers)
    parser.add_argument("--libri_speakers", type=int, default=d.libri_speakers)
    parser.add_argument(
        "--calib_speakers",
        type=int,
        default=d.calib_speakers,
        help="speakers of vox_calib (held out, utterances of varied length)",
    )
    parser.add_argument(
        "--sessions", type=int, default=d.train_sessions, help="sessions per vox_train speaker"
    )
    parser.add_argument(
        "--test_sessions",
        type=int,
        default=d.test_sessions,
        help="sessions (chapters) per vox_test and libri speaker",
    )
    parser.add_argument("--utterances", type=int, default=d.utterances, help="utterances per session")
    parser.add_argument("--min_seconds", type=float, default=SynthParams().utt_seconds[0])
    parser.add_argument("--max_seconds", type=float, default=SynthParams().utt_seconds[1])
    args = parser.parse_args(argv)
    counts = (
        "train_speakers",
        "test_speakers",
        "libri_speakers",
        "calib_speakers",
        "sessions",
        "test_sessions",
        "utterances",
    )
    for name in counts:
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
    if not 0.1 <= args.min_seconds <= args.max_seconds:
        parser.error("need 0.1 <= --min_seconds <= --max_seconds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = CorpusSizes(
        train_speakers=args.train_speakers,
        train_sessions=args.sessions,
        test_speakers=args.test_speakers,
        test_sessions=args.test_sessions,
        libri_speakers=args.libri_speakers,
        libri_sessions=args.test_sessions,
        calib_speakers=args.calib_speakers,
        calib_sessions=args.test_sessions,
        utterances=args.utterances,
    )
    params = SynthParams(utt_seconds=(args.min_seconds, args.max_seconds))
    start = time.perf_counter()
    written = generate(args.out, sizes, args.seed, args.workers, params)
    print(f"wrote {len(written)} files under {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
