"""tests/gpu_check.py cannot run its CUDA checks here: its script starts, and the helpers of the new
checks work on a CPU."""

from __future__ import annotations

import gpu_check
import numpy as np
import pytest
import torch
from audio_files import voice_like
from conftest import run_script

from m_gen_embs import find_audio, make_crops, read_audio
from m_utils import bf16_is_native
from models.GE2E import packaged_weights
from models.m_Extractors import load_extractor

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_script_shows_its_help():
    assert "--out" in run_script("tests/gpu_check.py", "--help").stdout


def test_m4a_files_it_writes_decode(tmp_path):
    gpu_check.write_audio(tmp_path, 3, ".m4a")
    files = find_audio(tmp_path)
    assert [p.suffix for p in files] == [".m4a"] * 3
    for rel in files:
        audio, rate = read_audio(tmp_path / rel)
        assert rate == 16000 and 2 * 16000 <= len(audio) <= 6 * 16000


def test_min_crop_cosine_takes_the_worst_crop():
    a = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    b = np.array([[[1.0, 0.0], [1.0, 1.0]]])
    assert gpu_check.min_crop_cosine(a, b) == pytest.approx(2**-0.5)


@pytest.mark.skipif(packaged_weights() is None, reason="GE2E's weights (resemblyzer) are not installed")
@pytest.mark.skipif(
    not bf16_is_native(CPU),
    reason="this CPU has no bfloat16 instructions (AVX512-BF16 or "
    "AMX): oneDNN has no bfloat16 LSTM for GE2E here",
)
def test_mixedprec_checks_run_on_a_cpu(capsys):
    model = load_extractor("GE2E")
    crops = torch.from_numpy(make_crops(voice_like(2.0), 160, 2))
    gpu_check.check_mixedprec(model, "GE2E", crops, 2, device=CPU)
    assert gpu_check.problems == []
    line = capsys.readouterr().out
    assert "GE2E bfloat16 ~ float32 on cpu: lowest cosine per crop" in line
    project = float(line.split("lowest cosine per crop ")[1].split(";")[0])
    assert project >= 0.999
    assert gpu_check.bf16_lstm_cosine(model, crops, device=CPU) < project  # the LSTM really ran in bfloat16
