"""Shared folders and full disks: one run at a time writes into a save_path or an embed_dir (a lock
the kernel drops when its holder dies), and a write that fails for lack of space stops the script
with the file's name, leaving every earlier file as it was and no temporary file behind."""

from __future__ import annotations

import errno
import os
import re
import shutil
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
from m_utils import (
    LOCK_NAME,
    UserError,
    append_line,
    atomic_write,
    folder_lock,
    run_main,
    torch_save_atomic,
    write_text_atomic,
)
from stores.write import write_embeddings


def disk_full(path: Path) -> str:
    """The message of a write of `path` that found the disk full."""
    return (
        f"{path}: the disk is full (no space left while writing it); earlier files are intact, "
        "free some space and run again"
    )


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
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)],
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
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
        result = run_script(
            "m_trainer.py", "--config", str(cfg), "--save_path", str(save), "--max_epoch", "2", check=False
        )
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
        return write(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(os, "write", half_then_full)
    scores = save / "result" / "scores.txt"
    error = script_error(
        lambda: m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--max_epoch", "2"]), capsys
    )
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
    args = [
        "--db_path",
        str(db),
        "--embed_dir",
        str(emb),
        *GEN_FAST,
        "--overwrite",
        "--distributed",
        "--nprocs",
        "2",
        "--port",
        str(port),
    ]
    error = script_error(lambda: m_gen_embs.main(args), capsys)
    assert error == f"error: {blocked}: cannot write it (Is a directory) (distributed process 0)"
    assert not (emb / LOCK_NAME).exists()


def test_a_folder_that_cannot_be_locked_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    """A file system without locks (ENOLCK on some network mounts): the run goes on, unlocked, with
    a warning, and an error of the run itself is not reported as raised while handling the lock's."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(m_utils.fcntl, "lockf", no_locks)
    with pytest.raises(ValueError, match="the run's own error") as raised:
        with folder_lock(tmp_path, "save_path"):
            raise ValueError("the run's own error")
    assert raised.value.__context__ is None
    assert "cannot be locked" in caplog.text and str(tmp_path) in caplog.text


# ----------------------------------------------------------------------------------------------
# Fault injection (m_utils.fault_point) and what the next run makes of a run stopped hard

REACH_POINT = """
import sys
from m_utils import fault_point
for count in range(1, 6):
    print(count, flush=True)
    fault_point(sys.argv[1])
print("done", flush=True)
"""


def faulty(point: str, count: int) -> dict[str, str]:
    """The environment of a run stopped hard the `count`-th time it reaches `point`."""
    return {m_utils.FAULT_VARIABLE: f"exit_after:{point}:{count}"}


def run_with_fault(point: str, count: int, *args: str) -> subprocess.CompletedProcess:
    """run_script with the fault `faulty(point, count)` set, whatever it does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(m_utils.FAULT_VARIABLE, f"exit_after:{point}:{count}")
        return run_script(*args, check=False)


def run_faulty(point: str, count: int, *args: str) -> subprocess.CompletedProcess:
    """A script run (as run_script) that fault_point stops at `point`; checks that it did."""
    result = run_with_fault(point, count, *args)
    assert result.returncode == m_utils.FAULT_EXIT_STATUS, result.stderr
    return result


def test_fault_point_stops_the_process_the_nth_time(monkeypatch):
    result = run_faulty("here", 3, "-c", REACH_POINT, "here")
    assert result.stdout.split() == ["1", "2", "3"]
    assert run_faulty("here", 1, "-c", REACH_POINT, "here").stdout.split() == ["1"]
    assert run_with_fault("here", 1, "-c", REACH_POINT, "elsewhere").stdout.split()[-1] == "done"
    monkeypatch.setenv(m_utils.FAULT_VARIABLE, "exit_after:here:0")
    with pytest.raises(UserError, match=r"EMBENHANCE_FAULT: expected exit_after:<point>:<n>"):
        m_utils.fault_point("here")


LOCK_AND_FORK = """
import os, sys
from m_utils import fault_point, folder_lock
with folder_lock(sys.argv[1], "embed_dir"):
    if os.fork() == 0:  # a worker, as a DataLoader's: it lives on until its stdin closes
        print(os.getpid(), flush=True)
        sys.stdin.read()
        os._exit(0)
    os.wait() if sys.argv[2] == "wait" else fault_point("locked")
"""


def test_the_lock_of_a_run_killed_hard_dies_with_it_whatever_its_workers_do(tmp_path):
    """The process that locked a folder forked a worker, then stopped hard; the worker is still
    alive (blocked on its stdin, which this test holds open), and the folder is free."""
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_AND_FORK, str(tmp_path), "stop"],
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **faulty("locked", 1)},
    )
    worker = int(child.stdout.readline())
    assert child.wait() == m_utils.FAULT_EXIT_STATUS
    try:
        os.kill(worker, 0)  # alive
        with folder_lock(tmp_path, "embed_dir"):
            assert (tmp_path / LOCK_NAME).read_text().startswith(f"{os.getpid()}\t")
    finally:
        child.stdin.close()


def test_a_worker_does_not_hold_its_parents_lock(tmp_path):
    """While the run that took the lock lives, it holds it (a worker of it changes nothing)."""
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_AND_FORK, str(tmp_path), "wait"],
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        child.stdout.readline()
        with (
            pytest.raises(UserError, match=f"is in use by process {child.pid} "),
            folder_lock(tmp_path, "embed_dir"),
        ):
            pass
    finally:
        child.stdin.close()
        child.wait()
    with folder_lock(tmp_path, "embed_dir"):
        pass


def temporaries(root: Path) -> list[str]:
    """The project's temporaries (m_utils.TEMPORARY_NAME) below root."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob(".*") if m_utils.TEMPORARY_NAME.fullmatch(p.name)
    )


USER_LOOKALIKES = (".notes.tmp", ".mine.npy.1234.tmp", ".id10000.npy.backup.tmp", ".x.abcdefgh.tmp.keep")


def plant_lookalikes(folder: Path) -> None:
    """A user's hidden files whose names look like the project's temporaries but are not."""
    for name in USER_LOOKALIKES:
        (folder / name).write_text("the user's")


def test_a_gen_embs_run_stopped_with_its_workers_alive_is_finished_by_the_next(tmp_path, caplog):
    """m_gen_embs.py stopped hard after its second file, its two decoding workers left running: the
    immediate re-run gets the folder's lock and finishes the tree; every file equals an
    uninterrupted run's."""
    db = make_audio(tmp_path / "db", count=8)
    args = [*GEN_FAST, "--nDataLoaderThread", "2", "--batch_size", "1"]
    reference = tmp_path / "reference"
    assert m_gen_embs.main(["--db_path", str(db), "--embed_dir", str(reference), *args]) == 0
    emb = tmp_path / "emb"
    command = [sys.executable, "m_gen_embs.py", "--db_path", str(db), "--embed_dir", str(emb), *args]
    stopped = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1", **faulty("gen_embs.file", 2)},
        start_new_session=True,
    )
    try:
        assert stopped.wait() == m_utils.FAULT_EXIT_STATUS
        assert len(list(emb.rglob("*.npy"))) == 2
        caplog.set_level("INFO")
        assert m_gen_embs.main(["--db_path", str(db), "--embed_dir", str(emb), *args]) == 0
    finally:
        try:
            os.killpg(stopped.pid, signal.SIGKILL)  # the workers, where they still run
        except ProcessLookupError:
            pass
    assert "2 already done, 6 to extract" in caplog.text
    assert contents(emb).keys() == contents(reference).keys()
    for path in reference.rglob("*.npy"):
        np.testing.assert_allclose(np.load(emb / path.relative_to(reference)), np.load(path), atol=1e-5)
    assert not temporaries(emb)


def test_comb_embs_stopped_hard_while_packing_leaves_nothing_after_the_next_run(tmp_path, caplog):
    """m_comb_embs.py stopped after the store's second block (a half-built hidden store folder
    left): the next run removes that, keeps the user's look-alike files, and writes the files an
    uninterrupted run writes."""
    tree = make_embedding_tree(tmp_path / "emb", speakers=4)
    reference = make_embedding_tree(tmp_path / "reference", speakers=4)
    m_comb_embs.main(["--embed_dir", str(reference)])
    run_faulty("store.block", 2, "m_comb_embs.py", "--embed_dir", str(tree))
    left = temporaries(tree)
    assert any(name.startswith(".embeddings.store.") and name.endswith(".tmp") for name in left)
    plant_lookalikes(tree)
    caplog.set_level("INFO")
    m_comb_embs.main(["--embed_dir", str(tree)])
    assert not temporaries(tree)
    assert (
        f"removed {len([n for n in left if '/' not in n])} temporary file(s) left by an interrupted run"
        in caplog.text
    )
    assert all((tree / name).read_text() == "the user's" for name in USER_LOOKALIKES)
    ours, theirs = contents(tree), contents(reference)
    assert ours.keys() - set(USER_LOOKALIKES) == theirs.keys()
    for rel in theirs:
        if rel.endswith(".npy") or rel.endswith(".txt"):
            assert ours[rel] == theirs[rel], rel


def test_training_stopped_hard_leaves_no_temporaries_after_the_next_run(data, tmp_path, caplog):
    """A training run stopped after its first checkpoint, with a dead run's temporaries of a
    checkpoint and of scores.txt beside it: the next run removes those (and says so), keeps a
    --check's temporary (a --check may run beside training) and the user's look-alikes."""
    cfg = config(data, tmp_path, max_epoch=3)
    save = tmp_path / "exp"
    run_faulty("trainer.checkpoint", 1, "m_trainer.py", "--config", str(cfg), "--save_path", str(save))
    assert sorted(checkpoints(save / "model")) == [1]
    dead = [
        save / "model" / ".model000000002.model.k2j4_x9a.tmp",
        save / "result" / ".scores.txt.a1b2c3d4.tmp",
    ]
    live = save / "result" / ".trials_test.npz.abcd1234.tmp"
    for path in [*dead, live]:
        path.write_bytes(b"partial")
    plant_lookalikes(save / "model")
    caplog.set_level("INFO")
    m_trainer.main(["--config", str(cfg), "--save_path", str(save)])
    assert sorted(checkpoints(save / "model")) == [1, 2, 3]
    assert not any(path.exists() for path in dead) and live.exists()
    assert all((save / "model" / name).read_text() == "the user's" for name in USER_LOOKALIKES)
    assert "removed 1 temporary file(s) left by an interrupted run" in caplog.text
    reference = tmp_path / "reference"
    m_trainer.main(["--config", str(cfg), "--save_path", str(reference)])
    assert (save / "result" / "scores.txt").read_text() == (reference / "result" / "scores.txt").read_text()


@pytest.mark.parametrize("gen_format, point", [("packed", "store.block"), ("tree", "generate.entry")])
def test_generate_stopped_hard_is_finished_by_the_next_run(data, tmp_path, gen_format, point):
    """--generate stopped hard (in its store's first block; after its third file): the re-run leaves
    no temporary and writes what an uninterrupted one writes."""
    cfg = config(
        data,
        tmp_path,
        gen_list=str(data / "lists" / "libri_normal_list.txt"),
        gen_path=str(data / "libri"),
        gen_format=gen_format,
    )
    save = tmp_path / "exp"
    m_trainer.main(["--config", str(cfg), "--save_path", str(save)])
    run_faulty(
        point,
        1 if gen_format == "packed" else 3,
        "m_trainer.py",
        "--config",
        str(cfg),
        "--save_path",
        str(save),
        "--generate",
    )
    assert bool(temporaries(save)) == (gen_format == "packed")
    m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--generate"])
    assert not temporaries(save)
    reference = tmp_path / "reference"
    shutil.copytree(save / "model", reference / "model")
    m_trainer.main(["--config", str(cfg), "--save_path", str(reference), "--generate"])
    target = "enhanced.store" if gen_format == "packed" else "enhanced"
    ours, theirs = contents(save / target), contents(reference / target)
    assert ours.keys() == theirs.keys() and len(ours) > 3
    assert all(ours[rel] == theirs[rel] for rel in ours if rel != "header.json")


def test_two_generates_into_one_folder_are_refused(data, tmp_path, capsys):
    cfg = config(
        data, tmp_path, gen_list=str(data / "lists" / "libri_normal_list.txt"), gen_path=str(data / "libri")
    )
    save = tmp_path / "exp"
    m_trainer.main(["--config", str(cfg), "--save_path", str(save)])
    (save / "enhanced").mkdir()
    with folder_lock(save / "enhanced", "gen_target_dir"):
        error = script_error(
            lambda: m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--generate"]), capsys
        )
    assert error.startswith(f"error: {save / 'enhanced'} is in use by process {os.getpid()} (")
    assert not list((save / "enhanced").rglob("*.npy"))


# ----------------------------------------------------------------------------------------------
# Modes of new files: the user's umask, as any Unix tool


@pytest.fixture
def umask():
    """Sets this process's umask for a test (m_utils reads it once), then puts the earlier one back."""

    def set_umask(mask: int) -> None:
        os.umask(mask)
        m_utils.current_umask.cache_clear()

    earlier = os.umask(0o022)
    yield set_umask
    set_umask(earlier)


@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_files_and_stores_are_created_with_the_umask(tmp_path, umask, mask):
    umask(mask)
    write_text_atomic(tmp_path / "list.txt", "a b\n")
    torch_save_atomic({"epoch": 1}, tmp_path / "model.model")
    tree = make_embedding_tree(tmp_path / "emb", speakers=2)
    combine(tree, pack=True)
    write_embeddings(tmp_path / "gen" / "xvector.scp", ["a", "b"], np.ones((2, 3), np.float32))
    with folder_lock(tmp_path, "save_path"):
        lock = (tmp_path / LOCK_NAME).stat().st_mode & 0o777
    files = [
        tmp_path / "list.txt",
        tmp_path / "model.model",
        tree / "id10000.npy",
        tree / "embeddings.store" / "embeddings.npy",
        tmp_path / "gen" / "xvector.ark",
        tmp_path / "gen" / "xvector.scp",
    ]
    assert {path.name: path.stat().st_mode & 0o777 for path in files} == {
        path.name: 0o666 & ~mask for path in files
    }
    assert (tree / "embeddings.store").stat().st_mode & 0o777 == 0o777 & ~mask
    assert lock == 0o666 & ~mask
