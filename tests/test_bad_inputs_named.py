"""Bad input as the scripts meet it: exit status 2, one `error: ...` line naming the file (and line),
no traceback, the user's files untouched. One test per case of issue 27's list: non-float and
string embeddings, an embedding of another dimension, a list that is not UTF-8, a .scp key listed
twice, a utt2spk without a key of its .scp, unknown model, loss and extractor names, unreadable
audio (extract the rest, list the failed files, exit 2, a re-run embeds only them)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import config, make_embedding_tree, make_experiment_data, run_script

import m_comb_embs
import m_gen_embs
import m_trainer
from m_utils import run_main
from stores.write import write_kaldi

GEN_FAST = ["--eval_frames", "20", "--num_eval", "2", "--nDataLoaderThread", "0", "--batch_size", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Small train / test / LibriSpeech trees with their lists, nOut 24."""
    return make_experiment_data(tmp_path_factory.mktemp("data"), 8, 4, 4)


def script_error(main: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a script's main as its command line does (run_main); it must exit with status 2 and end
    its stderr with one `error: ` line, no traceback. Returns the message."""
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: "), err
    return last[len("error: ") :]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """The bytes of every file below root, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Embedding files


@pytest.mark.parametrize(
    "array, found",
    [
        (np.ones((3, 24), np.int32), "int32"),
        (np.ones((3, 24), np.int64), "int64"),
        (np.full((3, 24), "x"), "<U1"),
    ],
)
def test_embeddings_that_are_not_floating_point_name_the_file(tmp_path, capsys, array, found):
    root = make_embedding_tree(tmp_path / "emb", speakers=3, dim=24)
    bad = root / "id10001" / "sess0000001" / "00002.npy"
    np.save(bad, array)
    before = bad.read_bytes()
    error = script_error(m_comb_embs.main, ["--embed_dir", str(root)], capsys)
    assert error == f"{bad}: embeddings must be floating point, found {found} values"
    assert bad.read_bytes() == before and not (root / "embeddings.store").exists()


@pytest.mark.parametrize(
    "odd",
    [["00002.npy"], ["00001.npy", "00002.npy", "00003.npy", "00004.npy"]],
    ids=["one file", "every file of a session"],
)
def test_an_embedding_of_another_dimension_names_the_file(tmp_path, capsys, odd):
    root = make_embedding_tree(tmp_path / "emb", speakers=3, sessions=1, dim=24)
    for name in odd:
        np.save(root / "id10001" / "sess0000000" / name, np.ones((3, 16), np.float32))
    before = tree_bytes(root)
    error = script_error(m_comb_embs.main, ["--embed_dir", str(root)], capsys)
    first = root / "id10000" / "sess0000000" / "00001.npy"
    assert error == (
        f"{root / 'id10001' / 'sess0000000' / odd[0]}: embedding dimension 16 does not "
        f"match 24, the dimension of {first}"
    )
    assert all(tree_bytes(root)[rel] == content for rel, content in before.items())
    assert not (root / "embeddings.store").exists()


# ----------------------------------------------------------------------------------------------
# Text files


@pytest.mark.parametrize("option", ["train_list", "config"])
def test_a_file_that_is_not_utf8_names_its_line(data, tmp_path, capsys, option):
    cfg = config(data, tmp_path, max_epoch=1)
    if option == "train_list":
        bad = tmp_path / "train.txt"
        lines = (data / "lists" / "train_normal_list.txt").read_bytes().splitlines(keepends=True)
        bad.write_bytes(b"".join(lines[:2]) + b"id10000 caf\xe9/00001.npy\n" + b"".join(lines[2:]))
        argv = ["--config", str(cfg), "--train_list", str(bad)]
    else:
        bad = cfg
        bad.write_bytes(cfg.read_bytes() + b"# r\xe9sum\xe9\n")
        argv = ["--config", str(cfg)]
    before = bad.read_bytes()
    line = before.split(b"\n").index(next(x for x in before.split(b"\n") if b"\xe9" in x)) + 1
    column = next(x for x in before.split(b"\n") if b"\xe9" in x).index(b"\xe9") + 1
    error = script_error(m_trainer.main, [*argv, "--save_path", str(tmp_path / "exp")], capsys)
    assert error == f"{bad}:{line}: not UTF-8 text (byte 0xe9 at column {column})"
    assert bad.read_bytes() == before


def kaldi_embeddings(folder: Path, speakers: int = 2, utterances: int = 3) -> tuple[Path, list[str]]:
    """An xvector.scp and its .ark of `spk-sess-utt` keys; returns the .scp and the keys."""
    keys = [f"spk{s}-sess-{u}" for s in range(speakers) for u in range(utterances)]
    matrix = np.random.default_rng(0).standard_normal((len(keys), 8)).astype(np.float32)
    return write_kaldi(folder / "xvector.scp", keys, matrix), keys


def test_a_scp_key_listed_twice_names_both_lines(tmp_path, capsys):
    scp, _ = kaldi_embeddings(tmp_path / "kaldi")
    lines = scp.read_text().splitlines(keepends=True)
    scp.write_text("".join(lines[:4]) + lines[1] + "".join(lines[4:]))
    before = tree_bytes(scp.parent)
    error = script_error(m_comb_embs.main, ["--embed_dir", str(scp)], capsys)
    assert error == f"{scp}:5: utterance spk0-sess-1 is listed twice (first on line 2)"
    assert tree_bytes(scp.parent) == before  # no store written, nothing changed


def test_a_utt2spk_without_a_key_of_the_scp_names_both_files_and_the_key(tmp_path, capsys):
    scp, keys = kaldi_embeddings(tmp_path / "kaldi")
    utt2spk = scp.parent / "utt2spk"
    utt2spk.write_text("".join(f"{key} {key.split('-')[0]}\n" for key in keys if key != "spk1-sess-0"))
    before = tree_bytes(scp.parent)
    error = script_error(m_comb_embs.main, ["--embed_dir", str(scp)], capsys)
    assert error == f"{utt2spk}: no speaker for utterance spk1-sess-0 of {scp}:4"
    assert tree_bytes(scp.parent) == before


# ----------------------------------------------------------------------------------------------
# Names


def config_line(path: Path, key: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(f"{key}:"))


@pytest.mark.parametrize(
    "option, kind",
    [
        ("model", "model"),
        ("trainfunc", "loss (trainfunc)"),
        ("optimizer", "optimizer"),
        ("scheduler", "scheduler"),
    ],
)
@pytest.mark.parametrize("given_by", ["config", "flag"])
def test_an_unknown_name_says_where_it_was_given(data, tmp_path, capsys, option, kind, given_by):
    save = tmp_path / "exp"
    if given_by == "config":
        cfg = config(data, tmp_path, **{option: "Nope"})
        where = f"{cfg}:{config_line(cfg, option)}: {option}"
        argv = ["--config", str(cfg), "--save_path", str(save)]
    else:
        cfg = config(data, tmp_path, **{option: "AlsoNot"})  # the flag wins over the config
        where = f"--{option}"
        argv = ["--config", str(cfg), "--save_path", str(save), f"--{option}", "Nope"]
    error = script_error(m_trainer.main, argv, capsys)
    assert error.startswith(f"{where}: unknown {kind} 'Nope'") and "; known: " in error
    assert not save.exists()


def test_an_unknown_extractor_names_its_flag(tmp_path, capsys):
    write_wav(tmp_path / "db" / "s" / "v" / "1.wav", tone(0.1, 0))
    error = script_error(
        m_gen_embs.main,
        ["--db_path", str(tmp_path / "db"), "--embed_dir", str(tmp_path / "emb"), "--model", "ResNet34"],
        capsys,
    )
    assert error == (
        "--model: unknown extractor 'ResNet34' (did you mean ResNetSE34V2?); known: GE2E, ResNetSE34V2"
    )
    assert not (tmp_path / "emb").exists()


# ----------------------------------------------------------------------------------------------
# Unreadable audio: every readable file is embedded, the failed ones are listed, exit status 2


def tone(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, 16000)
    return path


def not_audio(path: Path) -> None:
    path.write_text("these are notes, not audio\n")


def zero_length(path: Path) -> None:
    path.write_bytes(b"")


def no_samples(path: Path) -> None:
    soundfile.write(path, np.zeros(0, np.float32), 16000)


GOOD = ["id00001/v/00001.wav", "id00001/v/00003.wav", "id00002/w/00001.wav"]


def audio_tree(db: Path) -> None:
    for seed, rel in enumerate(GOOD):
        write_wav(db / rel, tone(0.3, seed))


def npy_mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*.npy")}


@pytest.mark.parametrize(
    "spoil, reason",
    [(not_audio, "cannot decode"), (zero_length, "cannot decode"), (no_samples, "no samples")],
)
def test_unreadable_audio_is_listed_and_the_run_exits_2(tmp_path, capsys, caplog, spoil, reason):
    db, emb = tmp_path / "db", tmp_path / "emb"
    audio_tree(db)
    bad = db / "id00001" / "v" / "00002.wav"
    spoil(bad)
    before = bad.read_bytes()
    caplog.set_level(logging.INFO)
    error = script_error(m_gen_embs.main, ["--db_path", str(db), "--embed_dir", str(emb), *GEN_FAST], capsys)
    assert error.startswith(
        "1 audio file(s) could not be read (the log above says why) and have no "
        f"embedding; {emb / 'failed_audio.txt'} lists them"
    )
    assert (emb / "failed_audio.txt").read_text() == f"{bad}\n"
    assert f"failed: {bad}: {reason}" in caplog.text
    assert set(npy_mtimes(emb)) == {rel.replace(".wav", ".npy") for rel in GOOD}
    assert bad.read_bytes() == before


def test_a_rerun_embeds_only_the_failed_files_once_they_are_fixed(tmp_path, capsys):
    db, emb = tmp_path / "db", tmp_path / "emb"
    audio_tree(db)
    broken, empty = db / "id00001" / "v" / "00002.wav", db / "id00002" / "w" / "00002.wav"
    not_audio(broken)
    zero_length(empty)
    argv = ["--db_path", str(db), "--embed_dir", str(emb), *GEN_FAST]
    assert script_error(m_gen_embs.main, argv, capsys).startswith("2 audio file(s) could not be read")
    listed = emb / "failed_audio.txt"
    assert listed.read_text() == f"{broken}\n{empty}\n"
    first = npy_mtimes(emb)
    # Run again unchanged: the same two fail, nothing is rewritten.
    assert script_error(m_gen_embs.main, argv, capsys).startswith("2 audio file(s) could not be read")
    assert npy_mtimes(emb) == first and listed.read_text() == f"{broken}\n{empty}\n"
    # Fix one, remove the other: the run embeds the fixed one only, and the list goes.
    write_wav(broken, tone(0.3, 7))
    empty.unlink()
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: m_gen_embs.main(argv))
    assert exited.value.code == 0
    after = npy_mtimes(emb)
    assert set(after) == set(first) | {"id00001/v/00002.npy"}
    assert all(after[rel] == mtime for rel, mtime in first.items())
    assert not listed.exists()
    assert "id00002/w/00002" not in (emb / "utt2dur").read_text()


def test_the_script_itself_exits_2_naming_the_list(tmp_path):
    db, emb = tmp_path / "db", tmp_path / "emb"
    audio_tree(db)
    zero_length(db / "id00001" / "v" / "00002.wav")
    result = run_script(
        "m_gen_embs.py", "--db_path", str(db), "--embed_dir", str(emb), *GEN_FAST, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith(
        f"error: 1 audio file(s) could not be read (the log above says why) and have no "
        f"embedding; {emb / 'failed_audio.txt'} lists them"
    )
