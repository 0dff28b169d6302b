"""m_gen_embs.py on compressed audio (.m4a and whatever else PyAV decodes): the decoded samples against
their source (alignment, SNR, channels, rates), embeddings of an m4a against those of its wav, and
broken files reported and skipped."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from audio_files import missing_encoder, voice_like, write_encoded
from scipy.signal import correlate, resample_poly

from m_gen_embs import AudioError, FailedFiles, main, read_audio
from m_utils import UserError
from models.GE2E import packaged_weights

pytestmark = pytest.mark.usefixtures("one_thread")

SECONDS = 3.0
MAX_LAG = 2048  # samples searched either side; AAC's priming alone is 1024
GE2E_FLAGS = ["--model", "GE2E", "--eval_frames", "160", "--num_eval", "5", "--nDataLoaderThread", "0"]


def best_lag(decoded: np.ndarray, source: np.ndarray) -> int:
    """The shift (samples) of `decoded` against `source` that correlates best, within MAX_LAG."""
    full = correlate(decoded, source, mode="full", method="fft")
    zero = len(source) - 1
    return int(np.argmax(full[zero - MAX_LAG : zero + MAX_LAG + 1])) - MAX_LAG


def snr_db(decoded: np.ndarray, source: np.ndarray) -> float:
    """Signal-to-noise ratio of `decoded` as a copy of `source` (same length, aligned)."""
    return float(10 * np.log10(np.sum(source**2) / np.sum((decoded - source) ** 2)))


def resampled(audio: np.ndarray, rate: int) -> np.ndarray:
    common = math.gcd(rate, 16000)
    return resample_poly(audio, rate // common, 16000 // common)


def assert_copy_of(decoded: np.ndarray, source: np.ndarray, min_snr: float) -> None:
    """Same length, aligned to the sample (the priming dropped, nothing added), and close."""
    assert len(decoded) == len(source)
    assert best_lag(decoded, source) == 0
    assert snr_db(decoded, source) >= min_snr


def test_m4a_is_decoded_aligned_with_its_source(tmp_path):
    """FFmpeg's AAC encoder writes 1024 priming samples and an edit list saying so: they are dropped,
    and so is the padding of the last frame beyond the declared duration."""
    source = voice_like(SECONDS, seed=1)
    write_encoded(tmp_path / "a.m4a", source, 16000)
    decoded, rate = read_audio(tmp_path / "a.m4a")
    assert rate == 16000
    assert_copy_of(decoded, source, min_snr=20.0)


def test_stereo_m4a_is_mixed_to_mono(tmp_path):
    left, right = voice_like(SECONDS, seed=1), voice_like(SECONDS, seed=2)
    write_encoded(tmp_path / "a.m4a", np.stack([left, right], axis=1), 16000)
    decoded, _ = read_audio(tmp_path / "a.m4a")
    assert_copy_of(decoded, (left + right) / 2, min_snr=20.0)


@pytest.mark.parametrize("rate", [44100, 48000])
def test_m4a_at_other_rates_is_resampled(tmp_path, rate):
    source = voice_like(SECONDS, seed=1)
    write_encoded(tmp_path / "a.m4a", resampled(source, rate), rate)
    decoded, source_rate = read_audio(tmp_path / "a.m4a")
    assert source_rate == rate
    assert_copy_of(decoded, source, min_snr=20.0)


# SNR floors a few dB under what each encoder gives at its default bitrate; FFmpeg's experimental
# Vorbis encoder keeps the spectrum far better than the waveform.
@pytest.mark.parametrize(
    ("suffix", "channels", "min_snr"), [(".mp3", 1, 15.0), (".opus", 1, 20.0), (".ogg", 2, 4.0)]
)
def test_other_compressed_formats(tmp_path, suffix, channels, min_snr):
    reason = missing_encoder(suffix)
    if reason:
        pytest.skip(reason)
    voices = [voice_like(SECONDS, seed=seed) for seed in range(1, channels + 1)]
    write_encoded(tmp_path / f"a{suffix}", np.stack(voices, axis=1) if channels > 1 else voices[0], 16000)
    decoded, _ = read_audio(tmp_path / f"a{suffix}")
    assert_copy_of(decoded, np.mean(voices, axis=0), min_snr)


def test_broken_m4a_files_are_audio_errors(tmp_path):
    write_encoded(tmp_path / "good.m4a", voice_like(SECONDS), 16000)
    data = (tmp_path / "good.m4a").read_bytes()
    (tmp_path / "truncated.m4a").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.m4a").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "empty.m4a").touch()
    for name in ("truncated", "garbage", "empty"):
        with pytest.raises(AudioError, match="cannot decode"):
            read_audio(tmp_path / f"{name}.m4a")
    write_encoded(tmp_path / "silent.m4a", np.zeros(16000), 16000)
    with pytest.raises(AudioError, match="silent"):
        read_audio(tmp_path / "silent.m4a")


# ----------------------------------------------------------------------------------------------
# The script


def embed_tree(db: Path, emb: Path, *extra: str) -> int:
    """The script's exit status: 0, or 2 where files could not be read (any other error is raised)."""
    try:
        return main(["--db_path", str(db), "--embed_dir", str(emb), *GE2E_FLAGS, *extra])
    except FailedFiles:
        return 2


@pytest.mark.skipif(packaged_weights() is None, reason="GE2E's weights (resemblyzer) are not installed")
def test_m4a_tree_gives_the_wav_tree_embeddings(tmp_path):
    """The same <spk>/<video>/<nnnnn>.npy layout from an m4a tree as from its wav tree, and per crop
    embeddings within cosine 0.99 (crops start at the same samples: the m4a has the wav's length)."""
    for seed, rel in enumerate(
        ["id00012/21Uxsk56VDQ/00001", "id00012/21Uxsk56VDQ/00002", "id00015/0fijmz4vTVU/00001"]
    ):
        source = voice_like(SECONDS, seed=seed)
        path = tmp_path / "wav" / f"{rel}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, source, 16000)
        write_encoded(tmp_path / "m4a" / f"{rel}.m4a", source, 16000)
    assert embed_tree(tmp_path / "wav", tmp_path / "emb_wav") == 0
    assert embed_tree(tmp_path / "m4a", tmp_path / "emb_m4a") == 0
    wav_files = sorted(p.relative_to(tmp_path / "emb_wav") for p in (tmp_path / "emb_wav").rglob("*.npy"))
    m4a_files = sorted(p.relative_to(tmp_path / "emb_m4a") for p in (tmp_path / "emb_m4a").rglob("*.npy"))
    assert m4a_files == wav_files and len(wav_files) == 3
    for rel in wav_files:
        wav = torch.from_numpy(np.load(tmp_path / "emb_wav" / rel))
        m4a = torch.from_numpy(np.load(tmp_path / "emb_m4a" / rel))
        assert m4a.shape == wav.shape == (5, 256)
        assert float(torch.nn.functional.cosine_similarity(wav, m4a).min()) >= 0.99


@pytest.mark.skipif(packaged_weights() is None, reason="GE2E's weights (resemblyzer) are not installed")
def test_utt2dur_of_m4a_files_from_decoding_and_from_the_header(tmp_path):
    """utt2dur gives the decoded m4a's samples over 16 kHz (the priming and the padding beyond the declared
    duration dropped; FFmpeg's muxer declares 19,760 samples for these 19,750, within 1 ms) and, for files
    embedded earlier without a line, the same from the duration the container declares."""
    db, emb = tmp_path / "db", tmp_path / "emb"
    write_encoded(db / "id00001" / "v" / "00001.m4a", voice_like(19750 / 16000, seed=1), 16000)
    write_encoded(db / "id00001" / "v" / "00002.m4a", resampled(voice_like(2.5, seed=2), 44100), 44100)
    decoded = [len(read_audio(db / "id00001" / "v" / f"0000{index}.m4a")[0]) for index in (1, 2)]
    assert abs(decoded[0] - 19750) <= 16 and decoded[1] == 40000
    expected = f"id00001/v/00001 {decoded[0] / 16000:.3f}\nid00001/v/00002 2.500\n"
    assert embed_tree(db, emb) == 0
    assert (emb / "utt2dur").read_text() == expected
    (emb / "utt2dur").unlink()
    assert embed_tree(db, emb) == 0
    assert (emb / "utt2dur").read_text() == expected


@pytest.mark.skipif(packaged_weights() is None, reason="GE2E's weights (resemblyzer) are not installed")
def test_broken_m4a_files_are_skipped_named_and_counted(tmp_path, caplog):
    db = tmp_path / "db"
    write_encoded(db / "id00001" / "v" / "00001.m4a", voice_like(SECONDS), 16000)
    data = (db / "id00001" / "v" / "00001.m4a").read_bytes()
    (db / "id00001" / "v" / "00002.m4a").write_bytes(data[: len(data) // 2])
    (db / "id00001" / "v" / "00003.m4a").write_bytes(data[:200] + bytes(4000))
    caplog.set_level(logging.INFO)
    assert embed_tree(db, tmp_path / "emb", "--nDataLoaderThread", "1") == 2
    assert [p.name for p in (tmp_path / "emb").rglob("*.npy")] == ["00001.npy"]
    for name in ("00002.m4a", "00003.m4a"):
        assert f"skipped {db / 'id00001' / 'v' / name}: cannot decode" in caplog.text
    assert (tmp_path / "emb" / "failed_audio.txt").read_text() == "".join(
        f"{db / 'id00001' / 'v' / name}\n" for name in ("00002.m4a", "00003.m4a")
    )


def test_no_audio_message_names_the_compressed_suffixes(tmp_path):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "notes.txt").write_text("not audio")
    with pytest.raises(UserError, match=r"no audio files \(.wav, .flac, .m4a, .mp3, .ogg, .opus\) below it"):
        embed_tree(tmp_path / "db", tmp_path / "emb")
