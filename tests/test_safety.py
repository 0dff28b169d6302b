"""Shared folders and full disks: one run at a time writes into a save_path or an embed_dir (a lock
the kernel drops when its holder dies), and a write that fails for lack of space stops the script
with the file's name, leaving every earlier file as it was and no temporary file behind."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import ROOT, make_embedding_tree, make_experiment_data, run_script
from conftest import config as experiment_config

import m_comb_embs
import m_gen_embs
import m_trainer
import m_utils
from m_comb_embs import combine
from m_gen_list import make_lists
from m_network import SpeakerNet, Trainer, checkpoints
from m_utils import LOCK_NAME, UserError, append_line, atomic_write, folder_lock, run_main, write_text_atomic


def disk_full(path: Path) -> str:
    """The message of a write of `path` that found the disk full."""
    return (f"{path}: the disk is full (no space left while writing it); earlier files are intact, "
            "free some space and run again")
GEN_FAST = ["--eval_frames", "20", "--num_eval", "2", "--nDataLoaderThread", "0", "--batch_size", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_experiment_data(tmp_path_factory.mktemp("data"), 8, 6, 4)


def config(data: Path, tmp_path: Path, **options) -> Path:
    """test_trainer's experiment config, at this module's small size."""
    return experiment_config(data, tmp_path, **{"batch_size": 16, "max_epoch": 1, "nClasses": 8, **options})


def contents(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file below root (hidden ones too)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


def script_error(main, capsys) -> str:
    """Run a script's main as its command line does; checks exit status 2 and returns the last line
    on stderr (progress bars come before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_main(main)
    assert stopped.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# Folder locks

HOLD_LOCK = """
import sys
from m_utils import folder_lock
with folder_lock(sys.argv[1], "save_path"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def lock_holder_process(folder: Path) -> subprocess.Popen:
    """A child process that holds folder's lock until its stdin closes (or it is killed)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == "locked"
    return child


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_lock_names_its_holder_and_is_released(tmp_path):
    with folder_lock(tmp_path, "save_path"):
        record = (tmp_path / LOCK_NAME).read_text()
        assert record.startswith(f"{os.getpid()}\t")
        with pytest.raises(UserError) as refused:
            with folder_lock(tmp_path, "save_path"):
                pass
        assert str(refused.value).startswith(f"{tmp_path} is in use by process {os.getpid()} (")
        assert str(refused.value).endswith("; wait for it or use another save_path")
    assert not (tmp_path / LOCK_NAME).exists()
    with folder_lock(tmp_path, "embed_dir"):
        pass


def test_second_trainer_is_refused_and_the_first_run_untouched(data, tmp_path, capsys):
    cfg = config(data, tmp_path)
    save = tmp_path / "exp"
    m_trainer.main(["--config", str(cfg), "--save_path", str(save)])
    before = contents(save)
    with folder_lock(save, "save_path"):  # this test process plays the first run, still going
        result = run_script("m_trainer.py", "--config", str(cfg), "--save_path", str(save),
                            "--max_epoch", "2", check=False)
        assert result.returncode == 2
        assert f"error: {save} is in use by process {os.getpid()} (" in result.stderr
        assert "use another save_path" in result.stderr and "Traceback" not in result.stderr
        assert contents(save) == {**before, LOCK_NAME: (save / LOCK_NAME).read_bytes()}
        # A look at the run while it trains (--check) is not refused.
        capsys.readouterr()
        m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--check"])
        assert "[testset original EER]" in capsys.readouterr().out
    checked = ("result/trials_", "result/check.json")  # what --check writes
    assert {rel: data for rel, data in contents(save).items() if not rel.startswith(checked)} == before


def test_lock_of_a_killed_trainer_does_not_block(data, tmp_path):
    cfg = config(data, tmp_path)
    save = tmp_path / "exp"
    save.mkdir()
    kill(lock_holder_process(save))
    assert (save / LOCK_NAME).is_file()  # left behind, naming a dead process
    m_trainer.main(["--config", str(cfg), "--save_path", str(save)])
    assert sorted(checkpoints(save / "model")) == [1]
    assert not (save / LOCK_NAME).exists()


def make_audio(db: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        path = db / f"id{index % 2:05d}" / "sess" / f"{index:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, (0.1 * rng.standard_normal(4000)).astype(np.float32), 16000)
    return db


def test_second_extraction_is_refused_and_a_killed_ones_lock_does_not_block(tmp_path, capsys):
    db, emb = make_audio(tmp_path / "db"), tmp_path / "emb"
    emb.mkdir()
    args = ["--db_path", str(db), "--embed_dir", str(emb), *GEN_FAST]
    holder = lock_holder_process(emb)
    error = script_error(lambda: m_gen_embs.main(args), capsys)
    assert f"{emb} is in use by process {holder.pid} (" in error and "use another embed_dir" in error
    assert not list(emb.rglob("*.npy"))
    kill(holder)
    assert m_gen_embs.main(args) == 0
    assert len(list(emb.rglob("*.npy"))) == 4
    assert not (emb / LOCK_NAME).exists()


def test_combining_is_refused_while_the_tree_is_written(tmp_path, capsys):
    tree = make_embedding_tree(tmp_path / "emb", speakers=2)
    with folder_lock(tree, "embed_dir"):
        error = script_error(lambda: m_comb_embs.main(["--embed_dir", str(tree)]), capsys)
    assert f"{tree} is in use by process {os.getpid()}" in error
    assert not (tree / "id10000.npy").exists()


# ----------------------------------------------------------------------------------------------
# Full disks


def fill_disk(monkeypatch) -> None:
    """From now on every atomic write goes to /dev/full, where each write fails with ENOSPC as on a
    full disk; its temporary file is still made, so that its removal is checked."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    make_temporary = m_utils.temporary_beside

    def temporary_on_full_disk(path: Path) -> tuple[int, str]:
        fd, name = make_temporary(path)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return fd, name

    monkeypatch.setattr(m_utils, "temporary_beside", temporary_on_full_disk)


def test_full_disk_while_writing_a_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(SpeakerNet("MyLinearNetv2", "MSE", nOut=24), torch.device("cpu"))
    model_dir = tmp_path / "model"
    for epoch in (1, 2):
        trainer.save(model_dir / f"model{epoch:09d}.model", epoch)
    before = contents(model_dir)
    fill_disk(monkeypatch)
    target = model_dir / "model000000002.model"
    with pytest.raises(UserError, match=f"^{re.escape(disk_full(target))}$"):
        trainer.save(target, 2)
    assert contents(model_dir) == before
    assert sorted(checkpoints(model_dir)) == [1, 2]


def test_full_disk_while_writing_speaker_files(tmp_path, monkeypatch):
    tree = make_embedding_tree(tmp_path / "emb", speakers=3)
    combine(tree)
    before = contents(tree)
    fill_disk(monkeypatch)
    with pytest.raises(UserError, match=f"^{re.escape(disk_full(tree / 'id10000.npy'))}$"):
        combine(tree)
    assert contents(tree) == before and not temporary_files(tree)


def test_full_disk_while_writing_a_list(tmp_path, monkeypatch):
    tree = make_embedding_tree(tmp_path / "emb", speakers=3)
    lists = tmp_path / "lists"
    make_lists(tree, "x", lists, seed=1, kinds=("test",))
    before = contents(lists)
    fill_disk(monkeypatch)
    with pytest.raises(UserError, match=f"^{re.escape(disk_full(lists / 'x_normal_list.txt'))}$"):
        make_lists(tree, "x", lists, seed=1)
    assert contents(lists) == before and not temporary_files(lists)


def test_full_disk_while_writing_an_embedding_stops_the_script(tmp_path, monkeypatch, capsys):
    db, emb = make_audio(tmp_path / "db"), tmp_path / "emb"
    args = ["--db_path", str(db), "--embed_dir", str(emb), *GEN_FAST]
    assert m_gen_embs.main(args) == 0
    before = contents(emb)
    fill_disk(monkeypatch)
    error = script_error(lambda: m_gen_embs.main([*args, "--overwrite"]), capsys)
    assert error == f"error: {disk_full(emb / 'id00000' / 'sess' / '00000.npy')}"
    assert contents(emb) == before and not temporary_files(emb)


def test_full_disk_while_appending_to_scores_stops_training(data, tmp_path, monkeypatch, capsys):
    cfg = config(data, tmp_path)
    save = tmp_path / "exp"
    m_trainer.main(["--config", str(cfg), "--save_path", str(save)])
    before = contents(save)
    write = os.write
    cut: list[int] = []  # the descriptor that took half the epoch-2 line

    def half_then_full(fd: int, data) -> int:
        """The epoch-2 line: half its bytes are stored, then the disk is full."""
        if fd in cut:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if not bytes(data).startswith(b"Epoch 2,"):
            return write(fd, data)
        cut.append(fd)
        return write(fd, bytes(data[:len(data) // 2]))

    monkeypatch.setattr(os, "write", half_then_full)
    scores = save / "result" / "scores.txt"
    error = script_error(lambda: m_trainer.main(["--config", str(cfg), "--save_path", str(save),
                                                 "--max_epoch", "2"]), capsys)
    assert error == f"error: {disk_full(scores)}"
    assert len(cut) == 1
    assert contents(save) == before  # the half epoch-2 line cut back off, the lock released


def test_append_line_cuts_a_failed_line_back(tmp_path, monkeypatch):
    path = tmp_path / "scores.txt"
    append_line(path, "Epoch 1, TLOSS 0.5, LR 0.001")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "quota")))
    with pytest.raises(UserError, match=f"^{re.escape(disk_full(path))}$"):
        append_line(path, "Epoch 2, TLOSS 0.4, LR 0.001")
    assert path.read_text() == "Epoch 1, TLOSS 0.5, LR 0.001\n"


def test_other_write_failures_name_the_file_and_other_errors_pass(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("user data")
    with pytest.raises(UserError, match=f"^{blocker / 'out.txt'}: cannot write it \\("):
        write_text_atomic(blocker / "out.txt", "text")
    target = tmp_path / "kept.txt"
    target.write_text("before")

    def failing_writer(handle) -> None:
        handle.write(b"half")
        raise ValueError("not an I/O problem")

    with pytest.raises(ValueError, match="not an I/O problem"):
        atomic_write(target, failing_writer)
    assert target.read_text() == "before" and not temporary_files(tmp_path)


def test_a_full_disk_behind_another_error_is_found(tmp_path):
    """torch.save reports a failed write as a RuntimeError raised while handling the OSError."""
    target = tmp_path / "model.model"

    def torch_like_writer(handle) -> None:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # noqa: B904 (as torch)

    with pytest.raises(UserError, match=f"^{re.escape(disk_full(target))}$"):
        atomic_write(target, torch_like_writer)
    assert not target.exists() and not temporary_files(tmp_path)


def test_a_write_failure_in_a_distributed_extraction_stops_it_with_the_message(tmp_path, capsys):
    """Whichever process the parent sees fail first (the one with the error, or a peer whose group
    it left), the script ends with that error and exit status 2."""
    db, emb = make_audio(tmp_path / "db"), tmp_path / "emb"
    blocked = emb / "id00001" / "sess" / "00001.npy"  # the second file of rank 0
    blocked.mkdir(parents=True)  # a folder where an embedding should go
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    args = ["--db_path", str(db), "--embed_dir", str(emb), *GEN_FAST, "--overwrite", "--distributed",
            "--nprocs", "2", "--port", str(port)]
    error = script_error(lambda: m_gen_embs.main(args), capsys)
    assert error == f"error: {blocked}: cannot write it (Is a directory) (distributed process 0)"
    assert not (emb / LOCK_NAME).exists()


def test_a_folder_that_cannot_be_locked_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    """A file system without flock (ENOLCK on some network mounts): the run goes on, unlocked, with
    a warning, and an error of the run itself is not reported as raised while handling the flock's."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(m_utils.fcntl, "flock", no_locks)
    with pytest.raises(ValueError, match="the run's own error") as raised:
        with folder_lock(tmp_path, "save_path"):
            raise ValueError("the run's own error")
    assert raised.value.__context__ is None
    assert "cannot be locked" in caplog.text and str(tmp_path) in caplog.text
