"""Shared fixtures and helpers: small embedding trees with a known structure, experiment configs,
script runners and the reference checkpoint's keys. Fixtures are found by pytest; import the plain
helpers (make_embedding_tree, config, train, run_script, ...) from conftest."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference"
if not REFERENCE.is_dir():
    REFERENCE = Path("/work/shared/reference")
KEYS_FILE = REFERENCE / "ResNetSE34V2_ASP_nOut512_nmels64.keys.txt"


def make_embedding_tree(
    root: Path,
    speakers: int = 8,
    sessions: int = 3,
    utterances: int = 4,
    dim: int = 24,
    crops: int = 3,
    seed: int = 0,
    channels: int = 4,
    channel_scale: float = 1.0,
    noise: float = 0.3,
    prefix: str = "id",
    libri: bool = False,
) -> Path:
    """Write `<spk>/<session>/<file>.npy` embeddings of shape (crops, dim).

    Each utterance = speaker vector + a channel offset (one of `channels`, shared by all
    speakers, picked per session) + noise: the session effect a network can learn to remove.
    """
    rng = np.random.default_rng(seed)
    channel_rng = np.random.default_rng(12345)
    channel_vectors = channel_rng.standard_normal((channels, dim)) * channel_scale
    for s in range(speakers):
        spk = f"{100 + s}" if libri else f"{prefix}{10000 + s:05d}"
        voice = rng.standard_normal(dim)
        for k in range(sessions):
            session = f"{200 + k}" if libri else f"sess{k:07d}"
            channel = channel_vectors[rng.integers(channels)]
            for u in range(utterances):
                name = f"{spk}-{session}-{u:04d}.npy" if libri else f"{u + 1:05d}.npy"
                crop = voice + channel + noise * rng.standard_normal((crops, dim))
                path = root / spk / session / name
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, crop.astype(np.float32))
    return root


def make_experiment_data(root: Path, train: int, test: int, libri: int) -> Path:
    """Train / test (VoxCeleb layout) and libri (LibriSpeech layout) embedding trees of that many
    speakers, with speaker files and the four lists of each under root/lists."""
    from m_comb_embs import combine
    from m_gen_list import make_lists

    for seed, (name, speakers) in enumerate((("train", train), ("test", test), ("libri", libri))):
        tree = make_embedding_tree(root / name, speakers=speakers, seed=seed, libri=name == "libri")
        combine(tree)
        make_lists(tree, name, root / "lists", seed=10)
    return root


def config(data: Path, tmp_path: Path, **options) -> Path:
    """An experiment yaml over the `data` fixture's trees (MyLinearNetv2 defaults, nOut 24, two
    epochs on the CPU), `options` overriding; written to tmp_path/exp.yaml."""
    lists = data / "lists"
    values = {
        "train_list": str(lists / "train_normal_list.txt"),
        "train_path": str(data / "train"),
        "valid_list": str(lists / "train_normal_list.txt"),
        "valid_path": str(data / "train"),
        "test_list": str(lists / "test_test_list.txt"),
        "test_path": str(data / "test"),
        "test_list_libri": str(lists / "libri_test_list.txt"),
        "test_path_libri": str(data / "libri"),
        "nOut": 24,
        "batch_size": 32,
        "max_epoch": 2,
        "test_interval": 1,
        "nClasses": 40,
        "device": "cpu",
        **options,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def train(cfg: Path, save: Path, *extra: str) -> list[str]:
    """m_trainer run in this process with `cfg`; the lines of its scores.txt."""
    import m_trainer

    m_trainer.main(["--config", str(cfg), "--save_path", str(save), *extra])
    return (save / "result" / "scores.txt").read_text().splitlines()


def reference_keys() -> dict[str, tuple[int, ...]]:
    """The released ResNetSE34V2 checkpoint's keys and their shapes."""
    keys = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            keys[name] = tuple(ast.literal_eval(shape))
    return keys


def random_checkpoint(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.rand(shape, generator=generator) + 0.5 if shape else torch.tensor(7)
        for name, shape in keys.items()
    }


def run_script(
    *args: str, cwd: Path | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would: `python ./m_x.py ...`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Train / test / LibriSpeech-layout embedding trees with their lists, nOut 24 (one per module)."""
    return make_experiment_data(tmp_path_factory.mktemp("data"), 40, 16, 8)


@pytest.fixture
def vox_tree(tmp_path: Path) -> Path:
    return make_embedding_tree(tmp_path / "emb")


@pytest.fixture
def one_thread():
    """Tiny batches: one intra-op thread is faster and steadier on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
