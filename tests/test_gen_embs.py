"""m_gen_embs.py on small audio trees: the mirrored tree, crops, failures, re-runs, a killed run, the
split across processes, and the utt2dur and manifest.json written beside the embeddings."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from conftest import run_script

import m_gen_embs
from m_gen_embs import (
    AudioError,
    FailedFiles,
    Job,
    batch_size_for,
    extract,
    find_audio,
    main,
    make_crops,
    output_path,
    read_audio,
    workers_for,
)
from m_utils import FAULT_EXIT_STATUS, FAULT_VARIABLE, DistContext, UserError, bf16_is_native
from models.GE2E import GE2E, packaged_weights
from models.m_Extractors import load_extractor

REPO = Path(__file__).resolve().parents[1]
FAST = ["--eval_frames", "20", "--num_eval", "3", "--nDataLoaderThread", "0", "--batch_size", "4"]
GOOD = [
    "19/198/19-198-0001.flac",
    "19/198/19-198-0002.flac",
    "26/495/26-495-0001.flac",
    "id10001/sessA/00001.wav",
    "id10001/sessA/00002.wav",
    "id10001/sessB/00001.WAV",
    "id10002/sessC/00001.wav",
    "id10002/sessC/00002.wav",
    "id10002/sessC/00003.wav",
]
BAD = ["id10002/sessC/00004.wav", "id10002/sessC/00005.wav"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tone(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def write(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, rate)


def make_tree(root: Path) -> Path:
    """VoxCeleb and LibriSpeech layouts; one 8 kHz file, one stereo, one shorter than a crop, one empty
    and one silent file, and a non-audio file."""
    for seed, rel in enumerate(GOOD[:6]):
        write(root / rel, tone(0.4 + 0.1 * seed, seed=seed))
    write(root / GOOD[6], tone(0.5, rate=8000, seed=6), rate=8000)
    write(root / GOOD[7], np.stack([tone(0.5, seed=7), tone(0.5, seed=8)], axis=1))
    write(root / GOOD[8], tone(0.1, seed=9))
    (root / BAD[0]).touch()
    write(root / BAD[1], np.zeros(8000, dtype=np.float32))
    (root / "id10001/sessA/notes.txt").write_text("not audio")
    return root


def npy_files(root: Path) -> dict[str, int]:
    """Relative path -> mtime (ns) of every .npy below root."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*.npy")}


def expected_outputs() -> set[str]:
    return {str(Path(rel).with_suffix(".npy")) for rel in GOOD}


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    db, emb = make_tree(tmp_path / "db"), tmp_path / "emb"
    (emb / "id10001").mkdir(parents=True)
    (emb / "notes.txt").write_text("the user's own notes")
    np.save(emb / "id10001" / "mine.npy", np.arange(3.0))
    return db, emb


def run(db: Path, emb: Path, *extra: str) -> int:
    """The script's exit status: 0, or 2 where files could not be read (any other error is raised)."""
    try:
        return main(["--db_path", str(db), "--embed_dir", str(emb), *FAST, *extra])
    except FailedFiles:
        return 2


# ----------------------------------------------------------------------------------------------
# Pieces


def test_find_audio_is_sorted_any_case_and_follows_links(tmp_path):
    db = make_tree(tmp_path / "db")
    linked = make_tree(tmp_path / "elsewhere")
    (db / "id10003").symlink_to(linked / "id10001", target_is_directory=True)
    (db / "id10002" / "loop").symlink_to(db, target_is_directory=True)
    found = [p.as_posix() for p in find_audio(db)]
    expected = sorted(
        GOOD + BAD + ["id10003/sessA/00001.wav", "id10003/sessA/00002.wav", "id10003/sessB/00001.WAV"]
    )
    assert found == expected


def test_crop_positions_follow_linspace():
    audio = np.arange(50001, dtype=np.float64)
    crops = make_crops(audio, eval_frames=100, num_eval=5)
    assert crops.shape == (5, 100 * 160 + 240) and crops.dtype == np.float32
    assert crops[:, 0].tolist() == [0, 8440, 16880, 25320, 33761]
    np.testing.assert_array_equal(crops[3], audio[25320 : 25320 + 16240])


def test_short_audio_is_wrap_padded():
    audio = np.arange(1000, dtype=np.float64)
    crops = make_crops(audio, eval_frames=20, num_eval=3)
    assert crops.shape == (3, 3440)
    np.testing.assert_array_equal(crops[0], np.arange(3440) % 1000)
    np.testing.assert_array_equal(crops[2], np.arange(1, 3441) % 1000)


def test_read_audio_resamples_mixes_and_rejects(tree):
    db, _ = tree
    audio, rate = read_audio(db / GOOD[6])
    assert rate == 8000 and audio.shape == (16000 // 2,)
    stereo, _ = soundfile.read(db / GOOD[7], dtype="float64")
    audio, rate = read_audio(db / GOOD[7])
    assert rate == 16000
    np.testing.assert_allclose(audio, stereo.mean(axis=1))
    with pytest.raises(AudioError, match="cannot decode"):
        read_audio(db / BAD[0])
    with pytest.raises(AudioError, match="silent"):
        read_audio(db / BAD[1])


# ----------------------------------------------------------------------------------------------
# The script


def test_run_mirrors_the_tree_and_reports_failures(tree, caplog):
    db, emb = tree
    caplog.set_level(logging.INFO)
    assert run(db, emb) == 2
    outputs = npy_files(emb)
    assert set(outputs) == expected_outputs() | {"id10001/mine.npy"}
    for rel in expected_outputs():
        embedding = np.load(emb / rel)
        assert embedding.shape == (3, 256) and embedding.dtype == np.float32
        assert np.isfinite(embedding).all()
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
    for rel in BAD:
        assert str(db / rel) in caplog.text
    assert "resampling 8000 Hz audio to 16000 Hz" in caplog.text
    assert (emb / "failed_audio.txt").read_text() == "".join(f"{db / rel}\n" for rel in BAD)


def test_rerun_writes_nothing_and_keeps_user_files(tree):
    db, emb = tree
    run(db, emb)
    before = npy_files(emb)
    written = {
        name: (emb / name).stat().st_mtime_ns for name in ("manifest.json", "utt2dur", "failed_audio.txt")
    }
    assert run(db, emb) == 2
    assert npy_files(emb) == before
    assert {name: (emb / name).stat().st_mtime_ns for name in written} == written
    assert (emb / "notes.txt").read_text() == "the user's own notes"
    np.testing.assert_array_equal(np.load(emb / "id10001" / "mine.npy"), np.arange(3.0))
    assert sorted(p.name for p in emb.rglob("*") if p.is_file() and p.suffix != ".npy") == [
        "failed_audio.txt",
        "manifest.json",
        "notes.txt",
        "utt2dur",
    ]


def npy_inodes(root: Path) -> dict[str, int]:
    """Relative path -> inode of every .npy below root: a file written again (atomically, a new file
    renamed over the old) has a new one, whatever the clock's resolution."""
    return {p.relative_to(root).as_posix(): p.stat().st_ino for p in root.rglob("*.npy")}


def test_overwrite_recomputes_the_same_values(tree):
    db, emb = tree
    run(db, emb)
    first = {rel: np.load(emb / rel) for rel in expected_outputs()}
    before = npy_inodes(emb)
    run(db, emb, "--overwrite", "--batch_size", "1")
    after = npy_inodes(emb)
    assert all(after[rel] != before[rel] for rel in expected_outputs())
    assert after["id10001/mine.npy"] == before["id10001/mine.npy"]
    for rel, values in first.items():
        np.testing.assert_allclose(np.load(emb / rel), values, atol=1e-5)


def test_resnet_random_init_with_loader_workers(tree):
    db, emb = tree
    assert run(db, emb, "--model", "ResNetSE34V2", "--random_init", "--nDataLoaderThread", "1") == 2
    for rel in expected_outputs():
        embedding = np.load(emb / rel)
        assert embedding.shape == (3, 512) and np.isfinite(embedding).all()


def test_automatic_batch_size_follows_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert batch_size_for(0, cpu, 400, 10) == 1
    assert batch_size_for(0, cpu, 160, 5) == 8
    assert batch_size_for(0, cpu, 1000, 10) == 1
    assert batch_size_for(0, cuda, 400, 10) == 16
    assert batch_size_for(0, cuda, 400, 10, mixedprec=True) == 64
    assert batch_size_for(0, cpu, 160, 5, mixedprec=True) == 8
    assert batch_size_for(3, cpu, 400, 10) == batch_size_for(3, cuda, 400, 10, mixedprec=True) == 3


def test_automatic_workers_follow_the_device(monkeypatch):
    """4 decoding workers on a CPU; on a GPU machine each process's share of the cores less one."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert workers_for(None, cpu) == 4
    assert workers_for(None, cuda) == 15
    assert workers_for(None, cuda, world_size=4) == 3
    assert workers_for(0, cuda) == 0 and workers_for(7, cpu) == 7
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert workers_for(None, cuda) == 16
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert workers_for(None, cpu) == 2 and workers_for(None, cuda) == 1


@pytest.mark.parametrize(
    ("extractor", "extra"),
    [("GE2E", ["--eval_frames", "160"]), ("ResNetSE34V2", ["--random_init", "--eval_frames", "100"])],
)
def test_mixedprec_stays_within_cosine_0999_of_float32(tree, caplog, extractor, extra):
    """bfloat16 autocast (CPU autocast here; CUDA's in gpu_check): float32 files of the same tree and
    shapes, every crop's embedding within cosine 0.999 of float32's. The ResNet's weights are random,
    the same in both runs."""
    db, _ = tree
    outputs = {}
    caplog.set_level(logging.INFO)
    for mixed in (False, True):
        torch.manual_seed(0)
        emb = db.parent / f"emb_{extractor}_{mixed}"
        assert run(db, emb, "--model", extractor, *extra, *(["--mixedprec"] if mixed else [])) == 2
        outputs[mixed] = {rel: np.load(emb / rel) for rel in npy_files(emb)}
    assert ("bfloat16 autocast" if bf16_is_native("cpu") else "running float32") in caplog.text
    assert outputs[True].keys() == outputs[False].keys() == expected_outputs()
    cosines = []
    for rel, exact in outputs[False].items():
        mixed = outputs[True][rel]
        assert mixed.dtype == np.float32 and mixed.shape == exact.shape == (3, exact.shape[1])
        cosines += F.cosine_similarity(torch.from_numpy(exact), torch.from_numpy(mixed)).tolist()
    assert min(cosines) >= 0.999


def test_mixedprec_runs_float32_on_a_cpu_without_bfloat16(tree, caplog, monkeypatch):
    """A CPU without bfloat16 instructions (detection patched to say so): --mixedprec says once that
    float32 runs, and the files equal those of a float32 run exactly."""
    db, _ = tree
    monkeypatch.setattr(m_gen_embs, "bf16_is_native", lambda device: False)
    autocast_dtypes = []
    real_autocast = torch.autocast

    def recording_autocast(device_type, dtype=None, enabled=True, **kwargs):
        autocast_dtypes.append(enabled)
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kwargs)

    monkeypatch.setattr(m_gen_embs.torch, "autocast", recording_autocast)
    caplog.set_level(logging.INFO)
    outputs = {}
    for mixed in (False, True):
        emb = db.parent / f"emb_{mixed}"
        mixedprec = ["--mixedprec"] if mixed else []
        assert run(db, emb, "--model", "GE2E", "--eval_frames", "160", *mixedprec) == 2
        outputs[mixed] = {rel: np.load(emb / rel) for rel in npy_files(emb)}
    assert caplog.text.count("running float32") == 1
    assert autocast_dtypes and not any(autocast_dtypes)
    assert outputs[True].keys() == outputs[False].keys() == expected_outputs()
    for rel, exact in outputs[False].items():
        np.testing.assert_array_equal(outputs[True][rel], exact)


def test_bfloat16_is_native_only_with_cpu_instructions(monkeypatch):
    """CUDA always; a CPU only with AVX512-BF16 or AMX and oneDNN's own check."""
    assert bf16_is_native("cuda")
    for avx512_bf16, amx, onednn, native in [
        (True, False, True, True),
        (False, True, True, True),
        (False, False, True, False),
        (True, True, False, False),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda v=onednn: v)
        assert bf16_is_native("cpu") is native


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "ResNet34"], "known: GE2E, ResNetSE34V2"),
        (["--model", "ResNetSE34V2"], "baseline_v2_ap.model"),
        (["--num_eval", "0"], "--num_eval must be at least 1"),
        (["--batch_size", "-1"], "--batch_size must be 0 or more"),
        (["--max_seconds", "0"], "--max_seconds must be a number of seconds above 0"),
        (["--max_seconds", "nan"], "--max_seconds must be a number of seconds above 0"),
    ],
)
def test_bad_options_are_user_errors(tree, extra, message):
    db, emb = tree
    with pytest.raises(UserError, match=message):
        run(db, emb, *extra)
    assert set(npy_files(emb)) == {"id10001/mine.npy"}


def test_missing_db_path_and_clashing_outputs(tmp_path):
    with pytest.raises(UserError, match="nowhere: audio folder not found"):
        run(tmp_path / "nowhere", tmp_path / "emb")
    write(tmp_path / "db" / "s" / "c" / "a.wav", tone(0.2))
    write(tmp_path / "db" / "s" / "c" / "a.flac", tone(0.2))
    with pytest.raises(UserError, match="would both be written"):
        run(tmp_path / "db", tmp_path / "emb")
    assert not (tmp_path / "emb").exists()


# ----------------------------------------------------------------------------------------------
# Interruption and distribution


def test_run_stopped_hard_resumes_without_truncated_files(tmp_path, caplog):
    """A run stopped hard (fault_point, as kill -9) after its third file: those three files are
    whole, the re-run leaves them as they are and writes the rest, equal to an uninterrupted run's."""
    db, emb = tmp_path / "db", tmp_path / "emb"
    count = 24
    for index in range(count):
        write(db / f"id{index % 4:05d}" / "sess" / f"{index:05d}.wav", tone(0.3, seed=index))
    command = [
        sys.executable,
        "m_gen_embs.py",
        "--db_path",
        str(db),
        "--embed_dir",
        str(emb),
        *FAST,
        "--batch_size",
        "1",
    ]
    fault = {"OMP_NUM_THREADS": "1", FAULT_VARIABLE: "exit_after:gen_embs.file:3"}
    stopped = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **fault})
    assert stopped.returncode == FAULT_EXIT_STATUS, stopped.stderr
    done = npy_files(emb)
    assert len(done) == 3
    for rel in done:
        assert np.load(emb / rel).shape == (3, 256)
    caplog.set_level(logging.INFO)
    assert run(db, emb, "--batch_size", "1") == 0
    after = npy_files(emb)
    assert len(after) == count
    assert all(after[rel] == mtime for rel, mtime in done.items())
    assert f"3 already done, {count - 3} to extract" in caplog.text
    whole = tmp_path / "whole"
    assert run(db, whole, "--batch_size", "1") == 0
    for rel in after:
        np.testing.assert_allclose(np.load(emb / rel), np.load(whole / rel), atol=1e-5)


def test_ranks_take_disjoint_shares(tree):
    db, emb = tree
    files = tuple(find_audio(db))
    job = Job(
        db_path=db,
        embed_dir=emb,
        files=files,
        eval_frames=20,
        num_eval=3,
        batch_size=4,
        nDataLoaderThread=0,
        device="cpu",
    )
    failed = multiprocessing.get_context("spawn").Value("i", 0)
    extract(DistContext(rank=1, world_size=3), job, load_extractor("GE2E"), failed)
    written = set(npy_files(emb)) - {"id10001/mine.npy"}
    assert written == {str(rel.with_suffix(".npy")) for rel in files[1::3] if str(rel) not in BAD}
    assert failed.value == sum(str(rel) in BAD for rel in files[1::3])
    assert not (emb / "utt2dur").exists() and not (emb / "manifest.json").exists()  # rank 0 writes them


def test_distributed_cpu_processes_cover_every_file_once(tmp_path, capfd):
    db, emb = tmp_path / "db", tmp_path / "emb"
    for index in range(5):
        write(db / "id00001" / "sess" / f"{index:05d}.wav", tone(0.3, seed=index))
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    assert run(db, emb, "--distributed", "--nprocs", "2", "--port", str(port)) == 0
    assert len(npy_files(emb)) == 5
    assert (emb / "utt2dur").read_text() == "".join(f"id00001/sess/{index:05d} 0.300\n" for index in range(5))
    assert json.loads((emb / "manifest.json").read_text())["num_eval"] == 3
    out = capfd.readouterr().out
    assert "rank 0/2: 3 file(s), 0 already done, 3 to extract" in out
    assert "rank 1/2: 2 file(s), 0 already done, 2 to extract" in out


def test_default_paths_are_relative_constants():
    assert not Path(m_gen_embs.DB_PATH).is_absolute() and not Path(m_gen_embs.EMBED_DIR).is_absolute()


FAULTS_OF_REUSE = """
import resource, sys
import torch
import m_gen_embs
if sys.argv[1] == "keep" and not m_gen_embs.keep_freed_memory():
    print("unsupported"); sys.exit()
for _ in range(4):  # 64 MB, touched, freed; the heap's layout settles within three
    torch.ones(2 ** 24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(2 ** 24)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_memory_is_reused_without_page_faults():
    """keep_freed_memory: a 64 MB tensor allocated again reuses the freed one; by default each one
    is fresh memory (16,384 page faults of 4 KB)."""

    def faults(mode: str) -> str:
        return run_script("-c", FAULTS_OF_REUSE, mode).stdout.strip()

    kept = faults("keep")
    if kept == "unsupported":
        pytest.skip("the C library has no mallopt (not glibc)")
    assert int(kept) < 1000
    assert int(faults("default")) > 3 * 10_000


# ----------------------------------------------------------------------------------------------
# utt2dur and manifest.json


def written_seconds() -> dict[str, float]:
    """utt -> seconds of the audio make_tree writes for GOOD (its sample counts over its rates)."""
    lengths = [len(tone(0.4 + 0.1 * seed, seed=seed)) / 16000 for seed in range(6)]
    lengths += [
        len(tone(0.5, rate=8000, seed=6)) / 8000,
        len(tone(0.5, seed=7)) / 16000,
        len(tone(0.1, seed=9)) / 16000,
    ]
    return {str(Path(rel).with_suffix("")): seconds for rel, seconds in zip(GOOD, lengths, strict=True)}


def utt2dur_of(seconds: dict[str, float]) -> str:
    return "".join(f"{utt} {seconds[utt]:.3f}\n" for utt in sorted(seconds))


def test_utt2dur_gives_the_length_of_every_embedded_file(tree):
    """One line per embedding (none for the failed files), sorted, seconds = samples / rate."""
    db, emb = tree
    assert run(db, emb) == 2
    assert (emb / "utt2dur").read_text() == utt2dur_of(written_seconds())
    assert written_seconds()["id10001/sessB/00001"] == 0.9 and written_seconds()["id10002/sessC/00001"] == 0.5


def test_rerun_merges_utt2dur_and_fills_what_it_lacks(tree, caplog):
    """Files embedded earlier without a line (an interrupted run, a tree from before utt2dur) get their
    length from the audio; lines of other utterances are kept; a new file is added."""
    db, emb = tree
    run(db, emb)
    seconds = written_seconds()
    kept = dict(list(seconds.items())[::2])
    (emb / "utt2dur").write_text(utt2dur_of({**kept, "id10009/other/00001": 12.345}))
    write(db / "id10003/sessD/00001.flac", tone(0.75, seed=11))
    caplog.set_level(logging.INFO)
    assert run(db, emb) == 2
    expected = {**seconds, "id10009/other/00001": 12.345, "id10003/sessD/00001": 0.75}
    assert (emb / "utt2dur").read_text() == utt2dur_of(expected)
    assert f"reading the durations of {len(seconds) - len(kept)} file(s) embedded earlier" in caplog.text
    (emb / "utt2dur").unlink()
    (emb / "manifest.json").unlink()
    assert run(db, emb) == 2
    assert (emb / "utt2dur").read_text() == utt2dur_of({**seconds, "id10003/sessD/00001": 0.75})


def test_a_bad_utt2dur_line_is_refused_before_any_work(tree):
    db, emb = tree
    (emb / "utt2dur").write_text("id10001/sessA/00001 0.700\nid10001/sessA/00002 long\n")
    message = "utt2dur:2: expected '<utt> <seconds>', found 'id10001/sessA/00002 long'"
    with pytest.raises(UserError, match=re.escape(message)):
        run(db, emb)
    assert set(npy_files(emb)) == {"id10001/mine.npy"}


def test_max_seconds_embeds_the_first_seconds(tree):
    """--max_seconds 0.3: each file's embedding equals the model's on crops of its first 0.3 s (wrap-padded
    where shorter than a crop), and utt2dur says min(length, 0.3)."""
    db, emb = tree
    assert run(db, emb, "--max_seconds", "0.3", "--batch_size", "1") == 2
    model = load_extractor("GE2E")
    full = db.parent / "full"
    run(db, full, "--batch_size", "1")
    for rel in GOOD:
        audio, _ = read_audio(db / rel)
        crops = torch.from_numpy(make_crops(audio[:4800], eval_frames=20, num_eval=3))
        with torch.inference_mode():
            expected = model(crops).numpy()
        embedding = np.load(output_path(emb, Path(rel)))
        np.testing.assert_array_equal(embedding, expected)
        if len(audio) > 4800:
            assert not np.allclose(embedding, np.load(output_path(full, Path(rel))), atol=1e-3)
    seconds = {utt: min(value, 0.3) for utt, value in written_seconds().items()}
    assert (emb / "utt2dur").read_text() == utt2dur_of(seconds)
    assert json.loads((emb / "manifest.json").read_text())["max_seconds"] == 0.3


def git_head() -> str | None:
    """The project's commit as git itself names it; None without git."""
    if shutil.which("git") is None:
        return None
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def test_manifest_records_the_weights_and_settings(tree, tmp_path):
    """The weights file and the sha256 of its bytes, the crop settings, what ran, the project's commit."""
    db, emb = tree
    checkpoint = tmp_path / "ge2e.pt"
    torch.manual_seed(3)
    torch.save(GE2E().state_dict(), checkpoint)
    assert run(db, emb, "--initial_model", str(checkpoint), "--max_seconds", "2") == 2
    manifest = json.loads((emb / "manifest.json").read_text())
    created = manifest.pop("created")
    assert abs((datetime.fromisoformat(created) - datetime.now().astimezone()).total_seconds()) < 600
    assert manifest == {
        "extractor": "GE2E",
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "eval_frames": 20,
        "num_eval": 3,
        "sample_rate": 16000,
        "max_seconds": 2.0,
        "mixedprec": False,
        "git_commit": git_head(),
    }
    packaged = db.parent / "packaged"
    run(db, packaged)
    manifest = json.loads((packaged / "manifest.json").read_text())
    assert manifest["checkpoint"] == str(packaged_weights())
    assert manifest["checkpoint_sha256"] == hashlib.sha256(packaged_weights().read_bytes()).hexdigest()
    random = db.parent / "random"
    run(db, random, "--model", "ResNetSE34V2", "--random_init")
    manifest = json.loads((random / "manifest.json").read_text())
    assert manifest["extractor"] == "ResNetSE34V2" and manifest["checkpoint"] is None
    assert manifest["checkpoint_sha256"] is None and manifest["max_seconds"] is None


@pytest.mark.parametrize(
    ("extra", "differs"),
    [
        (["--num_eval", "2"], "num_eval 3 (this run: 2)"),
        (["--max_seconds", "1"], "max_seconds None (this run: 1.0)"),
        (["--model", "ResNetSE34V2", "--random_init"], "extractor 'GE2E' (this run: 'ResNetSE34V2')"),
    ],
)
def test_a_tree_made_with_other_settings_is_refused_unless_overwrite(tree, extra, differs):
    db, emb = tree
    run(db, emb)
    before = npy_files(emb)
    manifest = (emb / "manifest.json").read_text()
    with pytest.raises(
        UserError,
        match=re.escape(
            f"{emb / 'manifest.json'}: the embeddings in {emb} were made with other settings: {differs}"
        ),
    ):
        run(db, emb, *extra)
    assert npy_files(emb) == before and (emb / "manifest.json").read_text() == manifest
    assert run(db, emb, *extra, "--overwrite") == 2
    after = npy_files(emb)
    assert all(after[rel] != before[rel] for rel in expected_outputs())
    rewritten = json.loads((emb / "manifest.json").read_text())
    assert [rewritten[key] for key in ("num_eval", "max_seconds", "extractor")] != [
        json.loads(manifest)[key] for key in ("num_eval", "max_seconds", "extractor")
    ]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_names_the_checked_out_commit(tmp_path):
    """A checkout's HEAD, a detached HEAD, and None for a folder that is no checkout (even one inside
    a checkout)."""
    root = tmp_path / "project"
    root.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    assert m_gen_embs.git_commit(root) is None
    git("init", "-q")
    assert m_gen_embs.git_commit(root) is None
    (root / "a").write_text("a")
    git("add", "a")
    git("commit", "-q", "-m", "one")
    first = git("log", "-1", "--format=%H")
    assert len(first) == 40 and m_gen_embs.git_commit(root) == first
    (root / "a").write_text("b")
    git("commit", "-q", "-am", "two")
    second = git("log", "-1", "--format=%H")
    assert second != first and m_gen_embs.git_commit(root) == second
    git("checkout", "-q", first)
    assert m_gen_embs.git_commit(root) == first
    (root / "sub").mkdir()
    assert m_gen_embs.git_commit(root / "sub") is None and m_gen_embs.git_commit(tmp_path) is None


def test_manifest_keeps_the_run_that_began_the_tree(tree, monkeypatch, caplog):
    """A re-run with the same settings from another commit keeps the manifest (and says so); --overwrite,
    which remakes every file, records the run that remade them."""
    db, emb = tree
    run(db, emb)
    manifest = (emb / "manifest.json").read_text()
    monkeypatch.setattr(m_gen_embs, "git_commit", lambda: "c" * 40)
    caplog.set_level(logging.INFO)
    run(db, emb)
    assert (emb / "manifest.json").read_text() == manifest
    assert "the manifest keeps the run that began the tree" in caplog.text
    run(db, emb, "--overwrite")
    assert json.loads((emb / "manifest.json").read_text())["git_commit"] == "c" * 40
