"""`make voxceleb` end to end on the demo corpus laid out as VoxCeleb as distributed (VoxCeleb2 dev
as .m4a under aac/, VoxCeleb1 as .wav under wav/) with an official-format trial list, ResNetSE34V2
with random weights (CKPT=random): the files each step writes, the results table against its
check.json, and a second run that redoes nothing."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import demo_corpus
import numpy as np
import pytest
import soundfile as sf
from audio_files import missing_encoder, write_encoded
from conftest import ROOT, make_embedding_tree
from test_tables import expected_cells, markdown_rows

import m_gen_list

SIZES = demo_corpus.CorpusSizes(
    train_speakers=4,
    train_sessions=2,
    test_speakers=3,
    test_sessions=2,
    libri_speakers=0,
    utterances=2,
    calib_speakers=2,
    calib_sessions=2,
)
PARAMS = demo_corpus.SynthParams(utt_seconds=(1.0, 1.3), calib_seconds=(1.0, 1.3))
TRAIN_FLAGS = (
    "--max_epoch 1 --test_interval 1 --batch_size 16 --bootstrap 20 --nDataLoaderThread 0 "
    "--device cpu --backends none asnorm qmf"
)


def voxceleb_layout(root: Path) -> tuple[Path, Path, Path]:
    """The demo corpus as VoxCeleb is distributed: vox2/aac/<id>/<video>/<n>.m4a (vox_train),
    vox1/wav/<id>/<video>/<n>.wav (vox_test, the trial list's speakers, and vox_calib, held out),
    and an official-format trial list of every pair of vox_test files."""
    demo_corpus.generate(root / "demo", SIZES, seed=0, workers=1, params=PARAMS, progress=False)
    aac = root / "vox2" / "aac"
    for wav in sorted((root / "demo" / "vox_train").rglob("*.wav")):
        samples, rate = sf.read(wav, dtype="float32")
        write_encoded(aac / wav.relative_to(root / "demo" / "vox_train").with_suffix(".m4a"), samples, rate)
    wav_root = root / "vox1" / "wav"
    wav_root.mkdir(parents=True)
    for speaker in [*(root / "demo" / "vox_test").iterdir(), *(root / "demo" / "vox_calib").iterdir()]:
        speaker.rename(wav_root / speaker.name)
    tests = sorted(p.relative_to(wav_root).as_posix() for p in wav_root.glob("id9*/*/*.wav"))
    trials = root / "veri_test2.txt"
    trials.write_text(
        "".join(
            f"{int(a.split('/')[0] == b.split('/')[0])} {a} {b}\n"
            for a, b in itertools.combinations(tests, 2)
        )
    )
    return aac, wav_root, trials


def make_voxceleb(root: Path, *variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "voxceleb",
            "INSTALL=",
            f"PY={sys.executable}",
            f"VOXOUT={root / 'out'}",
            "VOX_EMBED_FLAGS=--eval_frames 50 --num_eval 2 --nDataLoaderThread 0",
            f"VOX_TRAIN_FLAGS={TRAIN_FLAGS}",
            *variables,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def stamps(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_held_out_lists_leave_out_every_speaker_of_the_trial_lists(tmp_path):
    tree = make_embedding_tree(tmp_path / "vox1", speakers=6, sessions=2, utterances=2)
    speakers = sorted(p.name for p in tree.iterdir())
    official = tmp_path / "veri_test2.txt"  # VoxCeleb's format, speakers 0 and 1
    official.write_text(f"1 {speakers[0]}/sess0000000/00001.wav {speakers[0]}/sess0000001/00001.wav\n")
    wespeaker = tmp_path / "vox1_x.kaldi"  # WeSpeaker's format, speaker 1 and 2
    wespeaker.write_text(
        f"{speakers[1]}/sess0000000/00001.wav {speakers[2]}/sess0000000/00002.wav nontarget\n"
    )
    lists = tmp_path / "lists"
    base = ["--embed_dir", str(tree), "--list_dir", str(lists), "--lists", "normal", "test"]
    m_gen_list.main([*base, "--filename", "held", "--exclude_speakers_of", str(official), str(wespeaker)])
    normal = (lists / "held_normal_list.txt").read_text().splitlines()
    assert {line.split()[0] for line in normal} == set(speakers[3:]) and len(normal) == 3 * 4
    trials = (lists / "held_test_list.txt").read_text().split()
    assert trials and {path.split("/")[0] for path in trials if "/" in path} <= set(speakers[3:])
    # every speaker named: the lists are written empty (the recipe then neither validates nor calibrates)
    every = tmp_path / "list_test_all2.txt"
    pairs = zip(speakers, speakers[1:], strict=False)
    every.write_text("".join(f"0 {a}/sess0000000/00001.wav {b}/sess0000000/00001.wav\n" for a, b in pairs))
    m_gen_list.main([*base, "--filename", "none", "--exclude_speakers_of", str(every)])
    assert (lists / "none_normal_list.txt").read_text() == (lists / "none_test_list.txt").read_text() == ""


def test_make_voxceleb_refuses_without_a_checkpoint(tmp_path):
    result = make_voxceleb(tmp_path, "VOX1=x", "VOX2=y")
    assert result.returncode == 2
    assert "CKPT=baseline_v2_ap.model" in result.stderr and "CKPT=random" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(missing_encoder(".m4a") is not None, reason="no AAC encoder in this PyAV build")
def test_make_voxceleb_end_to_end_and_resumes(tmp_path):
    aac, wav, trials = voxceleb_layout(tmp_path)
    variables = (f"VOX1={wav}", f"VOX2={aac}", "CKPT=random", f"TRIALS={trials}")
    first = make_voxceleb(tmp_path, *variables)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    out = tmp_path / "out"
    emb, lists, run = out / "embeddings", out / "lists", out / "voxceleb"

    # 1-2. embeddings (with utt2dur and the manifest of the untrained extractor) and stores
    for tree, count, speakers in (("voxceleb2", 4 * 2 * 2, 4), ("voxceleb1", 5 * 2 * 2, 5)):
        utterances = list((emb / tree).glob("*/*/*.npy"))
        assert len(utterances) == count and np.load(utterances[0]).shape == (2, 512)
        assert len(list((emb / tree).glob("*_type2.npy"))) == speakers
        assert json.loads((emb / tree / "manifest.json").read_text())["extractor"] == "ResNetSE34V2"
        assert len((emb / tree / "utt2dur").read_text().splitlines()) == count
        assert (emb / tree / "embeddings.store" / "header.json").is_file()
    # 3. lists: the held-out speakers are those the trial list does not name (vox_calib's)
    held_out = {line.split()[0] for line in (lists / "vox1_heldout_normal_list.txt").read_text().splitlines()}
    assert held_out == {p.name for p in wav.glob("id8*")} and len(held_out) == 2
    assert (lists / "vox1_heldout_test_list.txt").stat().st_size > 0
    assert len((lists / "vox1_normal_list.txt").read_text().splitlines()) == 20
    assert len((lists / "vox2_normal_list.txt").read_text().splitlines()) == 16
    # 4. training, 5. --check of the trial list, 6. --generate with its side files
    assert (run / "result" / "scores.txt").read_text().startswith("Epoch 1, TLOSS")
    assert len(list((run / "model").glob("model*.model"))) == 1
    check = json.loads((run / "result" / "check.json").read_text())
    sources = next(r["sources"] for r in check if r["trials"] is None)
    assert sources["test"]["path"] == str(trials) and sources["test"]["count"] == 66
    assert sources["calib"]["path"].endswith("vox1_heldout_test_list.txt")
    assert len(list((run / "enhanced").rglob("*.npy"))) == 20
    manifest = json.loads((run / "enhanced" / "manifest.json").read_text())
    assert manifest["extractor"] == "ResNetSE34V2" and manifest["enhanced_from"] == str(emb / "voxceleb1")
    assert (run / "enhanced" / "utt2dur").read_text() == (emb / "voxceleb1" / "utt2dur").read_text()
    # 7. the table, against the check.json it is read from, and the figures
    header, *rows = markdown_rows((run / "result" / "results.md").read_text())
    assert header[1] == "veri_test2 EER orig."
    assert [row[0] for row in rows] == ["none", "asnorm", "qmf"]
    for row in rows:
        assert row[1:] == expected_cells(check, "test", row[0])
    tex = (run / "result" / "results.tex").read_text()
    assert r"\toprule" in tex and r"\multicolumn{5}{c}{veri\_test2}" in tex and r"\bottomrule" in tex
    for png in ("fig.png", "fig2.png", "det.png", "dist_hist.png"):
        assert (run / "result" / png).stat().st_size > 10_000, png

    before = stamps(out)
    second = make_voxceleb(tmp_path, *variables)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    log = second.stdout + second.stderr
    assert log.count("0 to extract") == 2 and log.count("up to date (no file changed") == 2
    assert "check.json: up to date" in log and "enhanced: up to date" in log
    assert "resuming after epoch 1" in log
    after = stamps(out)
    redone = {
        path
        for path, stamp in before.items()
        if after.get(path) != stamp and path.suffix in (".npy", ".model", ".json", ".ark", ".scp")
    }
    assert redone == set()
