"""`nDataLoaderThread: 0` loads in the calling thread, as the original's num_workers 0 loaded in the
main process; negative values are refused."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml
from conftest import make_experiment_data

import m_gen_embs
import m_trainer
import stores.arrays
from m_DataLoader import load_embeddings
from m_utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reader_threads(monkeypatch) -> list[int]:
    """The thread of every embedding file read from now on."""
    threads: list[int] = []
    read = stores.arrays.read_embedding

    def recorded(path: Path, dim: int | None = None, **options) -> np.ndarray:
        threads.append(threading.get_ident())
        return read(path, dim, **options)

    monkeypatch.setattr(stores.arrays, "read_embedding", recorded)
    return threads


def test_zero_threads_read_in_the_calling_thread(vox_tree, reader_threads):
    rels = sorted(p.relative_to(vox_tree).as_posix() for p in vox_tree.glob("*/*/*.npy"))
    in_caller = load_embeddings(vox_tree, rels, threads=0)
    assert reader_threads == [threading.get_ident()] * len(rels)
    reader_threads.clear()
    pooled = load_embeddings(vox_tree, rels, threads=2)
    assert len(reader_threads) == len(rels) and set(reader_threads) != {threading.get_ident()}
    np.testing.assert_array_equal(in_caller, pooled)


def test_trainer_accepts_zero_and_refuses_negative(tmp_path, reader_threads):
    data = make_experiment_data(tmp_path / "data", 6, 4, 2)
    lists = data / "lists"
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "train_list": str(lists / "train_normal_list.txt"),
                "train_path": str(data / "train"),
                "test_list": str(lists / "test_test_list.txt"),
                "test_path": str(data / "test"),
                "nOut": 24,
                "batch_size": 16,
                "max_epoch": 1,
                "nClasses": 6,
                "device": "cpu",
                "nDataLoaderThread": 0,
            }
        )
    )

    def train(run: str, *extra: str) -> None:
        m_trainer.main(["--config", str(cfg), "--save_path", str(tmp_path / run), *extra])

    reader_threads.clear()  # m_comb_embs read the data above on its own threads
    train("zero")
    assert reader_threads and set(reader_threads) == {threading.get_ident()}
    train("five", "--nDataLoaderThread", "5")
    scores = [(tmp_path / run / "result" / "scores.txt").read_text() for run in ("zero", "five")]
    assert scores[0] == scores[1] and "--Val-- Epoch 1" in scores[0]
    with pytest.raises(UserError, match="--nDataLoaderThread must be 0 or more, found -1"):
        train("neg", "--nDataLoaderThread", "-1")
    assert not (tmp_path / "neg").exists()


def test_extractor_with_zero_loader_workers_matches_workers(tmp_path):
    rng = np.random.default_rng(0)
    db = tmp_path / "db"
    for index in range(3):
        path = db / "id00001" / "sess" / f"{index:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, (0.1 * rng.standard_normal(4000)).astype(np.float32), 16000)
    common = ["--db_path", str(db), "--eval_frames", "20", "--num_eval", "2", "--batch_size", "2"]
    outputs = {}
    for workers in ("0", "2"):
        emb = tmp_path / f"emb{workers}"
        assert m_gen_embs.main([*common, "--embed_dir", str(emb), "--nDataLoaderThread", workers]) == 0
        outputs[workers] = {p.relative_to(emb): np.load(p) for p in sorted(emb.rglob("*.npy"))}
    assert len(outputs["0"]) == 3 and outputs["0"].keys() == outputs["2"].keys()
    for rel, embedding in outputs["0"].items():
        np.testing.assert_allclose(embedding, outputs["2"][rel], atol=1e-6)
    with pytest.raises(UserError, match="--nDataLoaderThread must be 0 or more"):
        m_gen_embs.main([*common, "--embed_dir", str(tmp_path / "neg"), "--nDataLoaderThread", "-1"])
