"""The demo corpus generator: deterministic bytes, the three layouts, the file format, re-runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.demo_corpus import (
    LIBRI_CHANNELS,
    VOX_CHANNELS,
    CorpusSizes,
    SynthParams,
    generate,
)

ROOT = Path(__file__).resolve().parents[1]
SIZES = CorpusSizes(
    train_speakers=2,
    train_sessions=2,
    test_speakers=2,
    test_sessions=2,
    libri_speakers=2,
    libri_sessions=2,
    utterances=2,
    calib_speakers=2,
    calib_sessions=2,
)
PARAMS = SynthParams(utt_seconds=(0.5, 0.8), calib_seconds=(0.3, 1.2))
N_FILES = 4 * 2 * 2 * 2

VOX_FILE = re.compile(r"id[89]\d{4}/[A-Za-z0-9_-]{11}/\d{5}\.wav")
LIBRI_FILE = re.compile(r"(\d+)/(\d+)/(\d+)-(\d+)-\d{4}\.flac")


def files_of(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file below root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "audio"
    written = generate(out, SIZES, seed=0, workers=1, params=PARAMS, progress=False)
    assert len(written) == N_FILES
    return out


def test_same_seed_same_bytes_whatever_the_worker_count(corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "audio"
    generate(other, SIZES, seed=0, workers=2, params=PARAMS, progress=False)
    assert files_of(other) == files_of(corpus)


def test_different_seed_different_audio(corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "audio"
    generate(other, SIZES, seed=1, workers=1, params=PARAMS, progress=False)
    first = sorted(corpus.rglob("*.wav"))[0]
    second = sorted(other.rglob("*.wav"))[0]
    a, b = sf.read(first)[0], sf.read(second)[0]
    assert len(a) != len(b) or not np.allclose(a, b)
    assert files_of(other).keys().isdisjoint(files_of(corpus).keys())


def test_voxceleb_layout(corpus: Path) -> None:
    speakers = {}
    for set_name in ("vox_train", "vox_test", "vox_calib"):
        files = sorted(p.relative_to(corpus / set_name).as_posix() for p in (corpus / set_name).rglob("*.*"))
        assert len(files) == 2 * 2 * 2
        assert all(VOX_FILE.fullmatch(f) for f in files), files
        assert {f.split("/")[-1] for f in files} == {"00001.wav", "00002.wav"}
        speakers[set_name] = {f.split("/")[0] for f in files}
        assert len(speakers[set_name]) == 2
        sessions = {f.rsplit("/", 1)[0] for f in files}
        assert len(sessions) == 4
    assert speakers["vox_train"].isdisjoint(speakers["vox_test"])
    assert speakers["vox_calib"].isdisjoint(speakers["vox_train"] | speakers["vox_test"])


def test_calibration_set_spans_its_own_durations(corpus: Path) -> None:
    """vox_calib's lengths come from calib_seconds, the other sets' from utt_seconds."""
    for set_name, (low, high) in (("vox_calib", PARAMS.calib_seconds), ("vox_test", PARAMS.utt_seconds)):
        seconds = [sf.info(str(p)).frames / PARAMS.sample_rate for p in (corpus / set_name).rglob("*.wav")]
        assert len(seconds) == 2 * 2 * 2
        assert all(low - 1e-3 <= value <= high for value in seconds), (set_name, seconds)
    calib = [sf.info(str(p)).frames for p in (corpus / "vox_calib").rglob("*.wav")]
    assert min(calib) < PARAMS.utt_seconds[0] * PARAMS.sample_rate < max(calib)


def test_librispeech_layout(corpus: Path) -> None:
    files = sorted(p.relative_to(corpus / "libri").as_posix() for p in (corpus / "libri").rglob("*.*"))
    assert len(files) == 2 * 2 * 2
    for f in files:
        match = LIBRI_FILE.fullmatch(f)
        assert match, f
        assert match.group(1) == match.group(3) and match.group(2) == match.group(4)
    assert {f.rsplit("-", 1)[1] for f in files} == {"0000.flac", "0001.flac"}


def test_file_format(corpus: Path) -> None:
    for path in sorted(corpus.rglob("*.*")):
        info = sf.info(str(path))
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
        assert info.format == ("FLAC" if path.suffix == ".flac" else "WAV")
        low, high = PARAMS.calib_seconds if "vox_calib" in path.parts else PARAMS.utt_seconds
        assert low - 0.01 <= info.duration <= high + 0.01
        audio = sf.read(str(path), dtype="float32")[0]
        rms = float(np.sqrt(np.mean(audio**2)))
        assert 0.01 < rms < 0.2 and np.max(np.abs(audio)) < 1.0


def test_rerun_writes_nothing_and_leaves_no_temporary_files(corpus: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*")}
    assert generate(corpus, SIZES, seed=0, workers=2, params=PARAMS, progress=False) == []
    assert {p: p.stat().st_mtime_ns for p in corpus.rglob("*")} == before
    assert not [p for p in corpus.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_existing_files_are_kept(tmp_path: Path) -> None:
    sizes = CorpusSizes(1, 1, 0, 0, 0, 0, 2)
    out = tmp_path / "audio"
    first = generate(out, sizes, seed=0, workers=1, params=PARAMS, progress=False)
    Path(first[0]).write_bytes(b"mine")
    assert generate(out, sizes, seed=0, workers=1, params=PARAMS, progress=False) == []
    assert Path(first[0]).read_bytes() == b"mine"


def test_out_of_domain_channels_are_other_types() -> None:
    assert {c.name for c in VOX_CHANNELS}.isdisjoint(c.name for c in LIBRI_CHANNELS)


def test_command_line(tmp_path: Path) -> None:
    out = tmp_path / "audio"
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "demo_corpus.py"),
        "--out",
        str(out),
        "--seed",
        "3",
        "--train_speakers",
        "1",
        "--test_speakers",
        "1",
        "--libri_speakers",
        "1",
        "--calib_speakers",
        "1",
        "--sessions",
        "1",
        "--test_sessions",
        "1",
        "--utterances",
        "1",
        "--workers",
        "1",
        "--min_seconds",
        "0.4",
        "--max_seconds",
        "0.5",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert len(list(out.rglob("*.wav"))) == 3 and len(list(out.rglob("*.flac"))) == 1
    assert len(list((out / "vox_calib").rglob("*.wav"))) == 1
    bad = subprocess.run(cmd + ["--utterances", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2
