"""The two extractors: front ends against reference numbers, weight loading, shapes and batching."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import soundfile
import torch
from conftest import REFERENCE, random_checkpoint, reference_keys

from m_utils import UserError
from models import GE2E as ge2e_module
from models.GE2E import GE2E, full_fp32_rnn, packaged_weights, partial_starts
from models.m_Extractors import EXTRACTORS, load_extractor
from models.m_Features import LogMelInstanceNorm, mel_filterbank
from models.ResNetSE34V2 import ResNetSE34V2

needs_resemblyzer = pytest.mark.skipif(
    importlib.util.find_spec("resemblyzer") is None, reason="resemblyzer wheel not installed"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ge2e() -> GE2E:
    return load_extractor("GE2E")


@pytest.fixture(scope="module")
def ge2e_reference() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE / "ge2e_reference.npz"))


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    wave, rate = soundfile.read(REFERENCE / "probe_16k.wav", dtype="float32")
    assert rate == 16000
    return torch.from_numpy(wave)[None]


# ----------------------------------------------------------------------------------------------
# Front ends


def test_htk_filterbank_matches_reference():
    expected = np.load(REFERENCE / "resnetse34v2_mel_fb_nfft512_64_htk.npy")
    bank = mel_filterbank(512, 64, "htk", normalise=False).numpy()
    assert bank.shape == expected.shape == (64, 257)
    np.testing.assert_allclose(bank, expected, atol=1e-6)


def test_slaney_filterbank_matches_reference(ge2e_reference):
    bank = mel_filterbank(400, 40, "slaney", normalise=True).numpy()
    np.testing.assert_allclose(bank, ge2e_reference["mel_fb_nfft400_40"], atol=1e-7)


def test_resnet_front_end_matches_numpy_recipe():
    """Pre-emphasis 0.97, reflect-centred 512-point frames of a 400-sample Hamming window, power,
    HTK mel, log(x + 1e-6), per-band mean/variance normalisation, written out in numpy."""
    rng = np.random.default_rng(1)
    wave = rng.standard_normal(4000)
    emphasised = np.concatenate([[wave[0] - 0.97 * wave[1]], wave[1:] - 0.97 * wave[:-1]])
    padded = np.pad(emphasised, 256, mode="reflect")
    window = np.zeros(512)
    window[56:456] = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([padded[i : i + 512] * window for i in range(0, len(padded) - 511, 160)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    logmel = np.log(
        mel_filterbank(512, 64, "htk", normalise=False).numpy().astype(np.float64) @ power.T + 1e-6
    )
    expected = (logmel - logmel.mean(1, keepdims=True)) / np.sqrt(logmel.var(1, keepdims=True) + 1e-5)
    got = LogMelInstanceNorm()(torch.from_numpy(wave).float()[None])[0].numpy()
    assert got.shape == (64, 1 + 4000 // 160)
    np.testing.assert_allclose(got, expected, atol=2e-4)


# ----------------------------------------------------------------------------------------------
# GE2E against the package's own numbers


@needs_resemblyzer
def test_ge2e_mel_frames_match_reference(ge2e, ge2e_reference, probe):
    mels = ge2e.features(probe)[0].numpy()
    expected = ge2e_reference["probe_mel"]
    assert mels.shape == expected.shape == (321, 40)
    np.testing.assert_allclose(mels, expected, rtol=1e-4, atol=1e-4 * expected.max())


@needs_resemblyzer
def test_ge2e_embeddings_match_reference(ge2e, ge2e_reference, probe):
    with torch.inference_mode():
        partial = ge2e.embed_frames(ge2e.features(probe)[:, :160])[0].numpy()
        utterance = ge2e(probe)[0].numpy()
    np.testing.assert_allclose(partial, ge2e_reference["partial_embedding_first160"], atol=1e-4)
    np.testing.assert_allclose(utterance, ge2e_reference["utterance_embedding"], atol=1e-4)
    assert utterance.shape == (256,)


def test_partial_starts_follow_the_package_rule():
    assert partial_starts(51200) == ([0, 77, 154], 51200)
    assert partial_starts(8240) == ([0], 25600)
    starts, padded = partial_starts(64240)
    assert starts == [0, 77, 154, 231] and padded == 64240


def test_missing_resemblyzer_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ge2e_module.importlib.util, "find_spec", lambda name: None)
    assert packaged_weights() is None
    with pytest.raises(UserError, match=r"pip install --no-deps resemblyzer==0\.1\.4"):
        load_extractor("GE2E")


# ----------------------------------------------------------------------------------------------
# ResNetSE34V2 weights


def test_resnet_exposes_exactly_the_reference_names():
    expected = {
        name.removeprefix("__S__."): shape
        for name, shape in reference_keys().items()
        if name.startswith("__S__.") and not name.startswith("__S__.torchfb.")
    }
    own = {name: tuple(value.shape) for name, value in ResNetSE34V2().state_dict().items()}
    assert own == expected


def test_resnet_loads_a_checkpoint_with_the_reference_names(tmp_path):
    checkpoint = random_checkpoint(reference_keys())
    path = tmp_path / "baseline_v2_ap.model"
    torch.save(checkpoint, path)
    model = load_extractor("ResNetSE34V2", path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["__S__." + name]), name
    with torch.inference_mode():
        assert model(torch.randn(2, 20 * 160 + 240)).shape == (2, 512)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "1 missing: layer3.2.bn2.running_var"),
        ("misshaped", "1 mis-shaped: fc.weight (256, 4096) (expected (512, 4096))"),
    ],
)
def test_resnet_refuses_a_partial_or_misshaped_checkpoint(tmp_path, damage, message):
    checkpoint = random_checkpoint(reference_keys())
    if damage == "missing":
        del checkpoint["__S__.layer3.2.bn2.running_var"]
    else:
        checkpoint["__S__.fc.weight"] = torch.zeros(256, 4096)
    path = tmp_path / "broken.model"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match=rf"broken\.model: .*{re.escape(message)}"):
        load_extractor("ResNetSE34V2", path)


def test_resnet_without_weights_says_where_they_come_from():
    with pytest.raises(UserError, match="baseline_v2_ap.model"):
        load_extractor("ResNetSE34V2")
    assert load_extractor("ResNetSE34V2", random_init=True).embed_dim == 512


def test_unknown_extractor_lists_known_names():
    with pytest.raises(UserError, match="unknown extractor 'ResNet34'") as error:
        load_extractor("ResNet34")
    message = str(error.value)
    assert "did you mean ResNetSE34V2" in message
    assert message.split("; known: ")[1].split(", ") == sorted(EXTRACTORS)


def test_non_checkpoint_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.model"
    path.write_text("not a checkpoint")
    with pytest.raises(UserError, match="notes.model: not a readable weights file"):
        load_extractor("ResNetSE34V2", path)


# ----------------------------------------------------------------------------------------------
# Batching does not change the result


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_batched_equals_one_by_one(name):
    """Every registered extractor (with its default weights where it has some) maps a batch of crops
    to (crops, embed_dim), the same as one crop at a time."""
    torch.manual_seed(0)
    model = load_extractor(name, random_init=EXTRACTORS[name].default_weights() is None)
    crops = torch.randn(4, 30 * 160 + 240) * 0.1
    with torch.inference_mode():
        batched = model(crops)
        single = torch.cat([model(crop[None]) for crop in crops])
    assert batched.shape == (4, model.embed_dim) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_ge2e_lstm_runs_in_full_float32_and_restores_the_setting():
    rnn = torch.backends.cudnn.rnn
    before = rnn.fp32_precision
    seen = []
    model = GE2E()
    model.lstm.register_forward_pre_hook(lambda *_: seen.append(rnn.fp32_precision))
    model(torch.zeros(2, 4000))
    assert seen == ["ieee"] and rnn.fp32_precision == before
    with pytest.raises(RuntimeError), full_fp32_rnn():
        raise RuntimeError("inside")
    assert rnn.fp32_precision == before
