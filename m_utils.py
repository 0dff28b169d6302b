"""Plumbing shared by every script; no domain format lives here. It holds:

- user-facing errors: UserError, unknown_name, run_main, setup_logging, reading a user's text file
  (read_user_text, user_text_lines);
- options: Option and the Options table type, HARDWARE_OPTIONS, add_options, check_options,
  options_taken (hyper-parameters by name), parse_bool;
- atomic writes: atomic_write, save_npy_atomic, write_text_atomic, torch_save_atomic, append_line,
  write_error (a failed write as a UserError);
- folder locks: folder_lock, run_lock (one run at a time writes into a folder), and
  remove_leftovers (the temporaries of a killed run, removed by the next one);
- fault injection for tests: fault_point (a named point where a test can stop a run hard);
- device and process group: resolve_device, bf16_is_native, DistContext, launch (one helper for the
  trainer and the extractor);

Domain formats live with their domain: voxceleb_trainer's checkpoint layout in models/m_Checkpoints.py,
the scores.txt line format with the training loop in m_network.py.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from difflib import get_close_matches
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("m_utils")


class UserError(Exception):
    """A problem with the user's input or setup: printed as one clear message, exit code 2."""


def setup_logging(verbose: bool = False) -> None:
    """Log to stdout. Under torchrun every rank runs the whole script: ranks other than 0 log
    warnings and errors only, so that each run-level line is written once."""
    quiet = launched_by_torchrun() and os.environ["RANK"] != "0"
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main; a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        status = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(status or 0))


def hyper_parameters(cls: type) -> list[str]:
    """The parameters of `cls`'s constructor that have a default: a model's, a loss', a back-end's
    or the Trainer's hyper-parameters, each set by the option of the same name."""
    return [
        name
        for name, param in inspect.signature(cls).parameters.items()
        if param.default is not inspect.Parameter.empty
    ]


def options_taken(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """The entries of `options` that `cls` takes by name (its hyper_parameters), so that a new
    hyper-parameter needs only its OPTIONS row."""
    return {name: options[name] for name in hyper_parameters(cls) if name in options}


def unknown_name(kind: str, name: str, known: Iterable[str], source: str | None = None) -> UserError:
    """The error for a name that is not in a registry; lists the known names and the closest ones.
    `source` says where the name was given (`--model`, `configs/x.yaml:3: model`)."""
    known = sorted(known)
    close = get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    where = f"{source}: " if source else ""
    return UserError(f"{where}unknown {kind} '{name}'{hint}; known: {', '.join(known)}")


def read_user_text(path: str | os.PathLike, what: str, maker: str = "") -> str:
    """The text of a user's file, read at once, or a UserError naming it (`what`: "list file", ...)."""
    return "".join(user_text_lines(path, what, maker))


def user_text_lines(path: str | os.PathLike, what: str, maker: str = "") -> Iterator[str]:
    """The UTF-8 lines of a user's file, read as they are consumed (a long list is never held
    whole), or a UserError naming it (`what`: "list file", ...) and the line of a byte that is not
    UTF-8."""
    with (
        user_file_errors(path, what, maker),
        Path(path).open(encoding="utf-8", errors="surrogateescape") as file,
    ):
        for lineno, line in enumerate(file, start=1):
            if not line.isascii():
                check_utf8(line, f"{path}:{lineno}")
            yield line


def check_utf8(line: str, where: str) -> None:
    """A line read with errors="surrogateescape" holds no undecodable byte, else a UserError
    naming `where` (file and line), the byte and its column."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(line[err.start]) & 0xFF
        raise UserError(f"{where}: not UTF-8 text (byte 0x{byte:02x} at column {err.start + 1})") from None


@contextmanager
def user_file_errors(path: str | os.PathLike, what: str, maker: str = "") -> Iterator[None]:
    """A missing or unreadable user's file as a UserError naming it (and `maker`, who writes it)."""
    try:
        yield
    except FileNotFoundError:
        hint = f" ({maker} writes it)" if maker else ""
        raise UserError(f"{path}: {what} not found{hint}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err})") from None


# ----------------------------------------------------------------------------------------------
# Options: a script's OPTIONS table maps each name (`--name` on the command line, `name:` in a
# config file) to its Option.


@dataclass(frozen=True)
class Option:
    """One option: its default (None: unset), type (int, float, str, bool, or list: names, with a
    tuple default), help text and the values it allows: `choices`, or `bounds` (the least and the
    most; None leaves that side open)."""

    default: Any
    type: type
    help: str
    choices: tuple[str, ...] = ()
    bounds: tuple[float | None, float | None] = (None, None)

    def check(self, name: str, value: Any, source: str = "") -> None:
        """A UserError when `value` is outside the choices or the bounds, naming where it was set:
        `source` is a config file, COMMAND_LINE or "" (a default, a constructor's argument). An
        unset value (None) passes."""
        if value is None:
            return
        prefix = f"{source}: " if source not in ("", COMMAND_LINE) else ""
        subject = f"--{name}" if source == COMMAND_LINE else f"option '{name}'"
        if self.choices and value not in self.choices:
            where = f"--{name}" if source == COMMAND_LINE else f"{source}: {name}" if source else None
            raise unknown_name(name, value, self.choices, where)
        least, most = self.bounds
        if least is not None and not least <= value:
            bound = "0 or more" if least == 0 else f"at least {least}"
            raise UserError(f"{prefix}{subject} must be {bound}, found {value}")
        if most is not None and not value <= most:
            raise UserError(f"{prefix}{subject} must be at most {most}, found {value}")


Options = dict[str, Option]
COMMAND_LINE = "the command line"  # the source of an option given as --name

# Where the work runs; m_trainer and m_gen_embs both take these.
HARDWARE_OPTIONS: Options = {
    "device": Option(
        "auto", str, "where the work runs (auto: CUDA when present)", choices=("auto", "cpu", "cuda")
    ),
    "mixedprec": Option(False, bool, "mixed precision (autocast) on CUDA"),
    "distributed": Option(False, bool, "one process per GPU (or --nprocs CPU processes)"),
    "nprocs": Option(2, int, "CPU processes for --distributed without CUDA", bounds=(1, None)),
    "port": Option(8888, int, "MASTER_PORT of the process group", bounds=(1, 65535)),
}


def check_options(args: argparse.Namespace, options: Options, sources: dict[str, str] | None = None) -> None:
    """Every option's value within its choices and bounds (Option.check); `sources` names where
    each was set (a config file or COMMAND_LINE; by default every one from the command line)."""
    for name, option in options.items():
        source = COMMAND_LINE if sources is None else sources.get(name, "")
        option.check(name, getattr(args, name), source)


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")


def allowed_text(option: Option) -> str:
    """What an option allows, for its help: ` (one of a, b)`, ` (at least 1)`, or nothing."""
    least, most = option.bounds
    parts = [f"one of {', '.join(option.choices)}"] if option.choices else []
    parts += [f"at least {least}"] if least is not None else []
    parts += [f"at most {most}"] if most is not None else []
    return f" ({', '.join(parts)})" if parts else ""


def add_options(parser: argparse.ArgumentParser, options: Options, with_defaults: bool = True) -> None:
    """One `--name` per option; a bool option is a flag that also takes true/false. Choices and bounds
    are checked by check_options, which names the config file or the flag that set a value."""
    for name, option in options.items():
        default, kind, text = option.default, option.type, option.help + allowed_text(option)
        keep = {"default": default} if with_defaults else {}
        if kind is bool:
            parser.add_argument(f"--{name}", nargs="?", const=True, type=parse_bool, help=text, **keep)
        elif kind is list:
            keep = {"default": None if default is None else list(default)} if with_defaults else {}
            parser.add_argument(f"--{name}", nargs="+", metavar=name.upper(), help=text, **keep)
        else:
            parser.add_argument(f"--{name}", type=kind, help=text, **keep)


# ----------------------------------------------------------------------------------------------
# Atomic writes: a file either has its complete new content or does not exist under its name.
# A failed write (a full disk most often) is a UserError naming the file; the file keeps its
# earlier content and no temporary file is left behind.

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_error(path: str | os.PathLike, err: OSError) -> UserError:
    """The UserError of a failed write of `path`: a full disk (or quota) said plainly."""
    if err.errno in DISK_FULL:
        return UserError(
            f"{path}: the disk is full (no space left while writing it); earlier files "
            "are intact, free some space and run again"
        )
    return UserError(f"{path}: cannot write it ({err.strerror or err})")


def os_error_behind(err: BaseException) -> OSError | None:
    """The OSError that caused `err`, if any: torch.save turns a failed write into a RuntimeError
    whose context is the OSError."""
    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, UserError):
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ if seen.__cause__ or seen.__suppress_context__ else seen.__context__
    return None


@cache
def current_umask() -> int:
    """This process's umask (read once: a run does not change it), without changing it where Linux
    shows it (/proc/self/status), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(folder: bool = False) -> int:
    """The mode a new file (or folder) gets under the umask, as any Unix tool creates it;
    tempfile's files (0600) and folders (0700) are given it before they take their final name."""
    return (0o777 if folder else 0o666) & ~current_umask()


def temporary_beside(path: Path) -> tuple[int, str]:
    """An open, new, hidden temporary file in path's folder, with the umask's mode: (descriptor,
    name). Its name is TEMPORARY_NAME's: `.<path's name>.<8 random characters>.tmp`."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
    except OSError:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
        raise
    return fd, name


def temporary_folder_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new, hidden temporary folder in path's folder, with the umask's mode:
    `.<path's name>.<8 random characters><suffix>` (suffix .tmp or .old, see TEMPORARY_NAME)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    os.chmod(folder, new_file_mode(folder=True))
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write `path` by `write(handle)` into a temporary file beside it, synced, then renamed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_beside(path)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = os_error_behind(err) if isinstance(err, Exception) else None
        if cause is not None:
            raise write_error(path, cause) from None
        raise


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, array))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text), mode="w")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and flush it to disk, so a crash never leaves half a record; a failed
    write (a full disk) cuts the file back to its earlier content."""
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
    except OSError as err:
        raise write_error(path, err) from None
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, start)
            raise write_error(path, err) from None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Folder locks: one run at a time writes into a save_path or an embed_dir.

LOCK_NAME = ".m_lock"
# The locks this process holds: (device, inode) of the lock file -> its holder, as written in it.
# A POSIX record lock does not conflict with its own process, which must refuse itself.
_held_locks: dict[tuple[int, int], str] = {}


def lock_holder(fd: int) -> str:
    """Who holds the lock of open lock file `fd`, as its holder wrote it."""
    record = os.pread(fd, 4096, 0).decode(errors="replace").split("\n")[0].split("\t", 2)
    if len(record) < 3 or not record[0].isdigit():  # not written yet
        return "another process"
    pid, host, command = record
    return f"process {pid} ({command}) on {host}"


def lock_file_is_current(fd: int, lock_path: Path) -> bool:
    """Whether `fd` is still the file named lock_path (a holder removes the name on release)."""
    try:
        return os.stat(lock_path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def held_here(lock_path: Path) -> str | None:
    """The holder of lock_path when this process holds it; found without opening the file (closing
    any descriptor of a file drops this process's record locks on it)."""
    try:
        found = os.stat(lock_path)
    except OSError:
        return None
    return _held_locks.get((found.st_dev, found.st_ino))


def in_use(folder: Path, holder: str, what: str) -> UserError:
    return UserError(f"{folder} is in use by {holder}; wait for it or use another {what}")


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold `folder` (which must exist) for this process, or raise a UserError naming the holder.

    An exclusive POSIX record lock (fcntl.lockf) on the hidden file folder/<name> (.m_lock), which
    holds the holder's PID, host and command. Such a lock belongs to the process that took it: the
    processes it forks (decoding workers) do not inherit it, and the kernel drops it when its
    process dies, so a killed run never blocks the next one, whatever its workers still do (the
    file stays and is reused). The holder removes the file on release; a process that locked a file
    just removed tries again on the new one. Without fcntl (Windows) there is no lock. `what` names
    the option that chose the folder (save_path, embed_dir).
    """
    folder = Path(folder)
    if fcntl is None:
        log.debug("%s: no fcntl on this system, the folder is not locked", folder)
        yield
        return
    lock_path = folder / name
    while True:
        holder = held_here(lock_path)
        if holder is not None:
            raise in_use(folder, holder, what)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UserError(f"{lock_path}: cannot create the lock file of {what} ({err.strerror})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks
                log.warning(
                    "%s: cannot be locked (%s); make sure no other run writes into it", folder, err.strerror
                )
                os.close(fd)
                unlockable = True
                break
            holder = lock_holder(fd)
            os.close(fd)
            raise in_use(folder, holder, what) from None
        unlockable = False
        if lock_file_is_current(fd, lock_path):
            break
        os.close(fd)
    if unlockable:  # outside the except clause: the run's own errors must not chain to the lock's
        yield
        return
    identity = os.fstat(fd)
    try:
        pid, host, command = os.getpid(), socket.gethostname(), shlex.join(run_command())[:500]
        record = f"{pid}\t{host}\t{command}\n".encode()
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))
        _held_locks[(identity.st_dev, identity.st_ino)] = f"process {pid} ({command}) on {host}"
        yield
    finally:
        _held_locks.pop((identity.st_dev, identity.st_ino), None)
        Path(lock_path).unlink(missing_ok=True)
        os.close(fd)


def run_command() -> list[str]:
    """This process's command line as a user typed it: python script.py options."""
    return [Path(sys.executable).name, *sys.argv]


def run_lock(folder: str | os.PathLike, what: str, name: str = LOCK_NAME) -> AbstractContextManager:
    """The folder_lock of a script's whole run. Under torchrun only rank 0 takes it (every rank
    runs the script; a second job's rank 0 is refused before it joins its group, so its other
    ranks never start work and torchrun stops them)."""
    if launched_by_torchrun() and os.environ["RANK"] != "0":
        return nullcontext()
    return folder_lock(folder, what, name)


# The hidden temporaries this project writes, named by tempfile: `.<target>.<8 random characters>`
# then `.tmp` (an atomic write's file, a packed store being built) or `.old` (a store being
# replaced). A killed run leaves them behind; the next run into the folder removes them.
TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.(?:tmp|old)")


def remove_leftovers(folders: Iterable[str | os.PathLike], targets: str) -> int:
    """Remove from each folder (not below it) the temporaries (TEMPORARY_NAME) of the files this run
    writes there, whose names match the pattern `targets`; returns how many were removed. Call it
    holding the folders' lock: a temporary there is a dead run's."""
    wanted = re.compile(targets)
    removed = 0
    for folder in folders:
        try:
            entries = list(os.scandir(os.fspath(folder)))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            match = TEMPORARY_NAME.fullmatch(entry.name)
            if match is None or not wanted.fullmatch(match["target"]):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def clear_leftovers(folders: Iterable[str | os.PathLike], targets: str, where: str | os.PathLike) -> int:
    """remove_leftovers in the process that holds the run's lock (run_lock; under torchrun rank 0),
    saying how many it removed (below `where`)."""
    if launched_by_torchrun() and os.environ["RANK"] != "0":
        return 0
    removed = remove_leftovers(folders, targets)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", removed, where)
    return removed


# ----------------------------------------------------------------------------------------------
# Fault injection: tests stop a script hard at a named point, as kill -9 would, and check what
# the next run makes of it.

FAULT_VARIABLE = "EMBENHANCE_FAULT"
FAULT_EXIT_STATUS = 86  # what a run stopped by fault_point exits with
_fault_counts: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """A named point where a test can stop this process as kill -9 would.

    With EMBENHANCE_FAULT=exit_after:<point>:<n> in the environment, the n-th time (n >= 1) this
    process reaches the point named <point> it ends at once with os._exit(FAULT_EXIT_STATUS): no
    cleanup, no finally blocks, no flushing; its temporaries stay and the kernel drops its locks, as
    after a kill. Its child processes (decoding workers) are left running. Unset, it does nothing.
    The points: gen_embs.file (an embedding file written), comb_embs.speaker (a speaker's B and C
    files asked for), store.block (a block of a packed store's rows written), trainer.epoch (an
    epoch trained, before its scores line), trainer.checkpoint (a checkpoint and its scores line
    written), generate.entry (an entry of --generate's tree written)."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return
    point, count = parse_fault(spec)
    if point != name:
        return
    _fault_counts[name] += 1
    if _fault_counts[name] >= count:
        os._exit(FAULT_EXIT_STATUS)


def parse_fault(spec: str) -> tuple[str, int]:
    """(point, n) of an EMBENHANCE_FAULT value, or a UserError naming the variable."""
    action, _, rest = spec.partition(":")
    point, _, count = rest.rpartition(":")
    if action != "exit_after" or not point or not count.isdigit() or int(count) < 1:
        raise UserError(f"{FAULT_VARIABLE}: expected exit_after:<point>:<n> (n at least 1), found {spec!r}")
    return point, int(count)


# ----------------------------------------------------------------------------------------------
# Device and process group


def resolve_device(name: str = "auto", local_rank: int = 0):
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is an error."""
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise unknown_name("device", name, ["auto", "cpu", "cuda"])
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def bf16_is_native(device) -> bool:
    """Whether bfloat16 autocast is fast on `device`: always on CUDA; on a CPU only with bfloat16
    instructions (AVX512-BF16 or AMX) that oneDNN may use (its own check honours ONEDNN_MAX_CPU_ISA).
    Elsewhere oneDNN emulates bfloat16 slowly or has no primitive for it (GE2E's LSTM)."""
    import torch

    if torch.device(device).type == "cuda":
        return True
    try:
        instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(instructions and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in its group; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_process_group(
    rank: int, world_size: int, local_rank: int, backend: str, port: int | None = None
) -> DistContext:
    """Join (or form) the default process group; MASTER_ADDR/PORT default to localhost/`port`."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "localhost")
    if port is not None:
        os.environ.setdefault("MASTER_PORT", str(port))
    if backend == "nccl":
        import torch

        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_in_group(ctx: DistContext, fn: Callable[..., Any], args: tuple) -> None:
    """Run fn on this rank; ranks wait for each other before the group is torn down (a rank that
    leaves while rank 0 still writes can abort Gloo)."""
    import torch.distributed as dist

    try:
        fn(ctx, *args)
        dist.barrier()
    finally:
        destroy_process_group()


def _reporting_user_errors(ctx: DistContext, fn: Callable[..., Any], args: tuple, errors: Any) -> None:
    """fn(ctx, *args); a UserError is first put on the queue `errors`, while the group still stands:
    the other ranks fail once this one leaves, and the parent must know whose failure came first."""
    try:
        fn(ctx, *args)
    except UserError as err:
        errors.put(f"{err} (distributed process {ctx.rank})")
        raise


def _spawned_worker(
    local_rank: int,
    world_size: int,
    backend: str,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    errors: Any,
) -> None:
    ctx = init_process_group(local_rank, world_size, local_rank, backend, port)
    try:
        _run_in_group(ctx, _reporting_user_errors, (fn, args, errors))
    except UserError:
        sys.exit(2)  # the parent reports it


def launch(
    fn: Callable[..., Any], args: tuple, *, distributed: bool, device: str, nprocs: int, port: int
) -> None:
    """Run `fn(ctx, *args)` once, or in every process of a group.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) this process joins that group. Otherwise,
    with `distributed`, it spawns one process per visible CUDA device (NCCL) or, without CUDA,
    `nprocs` CPU processes (Gloo), all on localhost:`port`.
    """
    import torch

    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if launched_by_torchrun():
        ctx = init_process_group(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), backend
        )
        _run_in_group(ctx, fn, args)
        return
    if not distributed:
        fn(SINGLE, *args)
        return
    world_size = torch.cuda.device_count() if use_cuda else nprocs
    if world_size < 1:
        raise UserError("--distributed needs at least one process (see --nprocs)")
    log.info(
        "distributed: %d %s process(es), backend %s, port %d",
        world_size,
        "GPU" if use_cuda else "CPU",
        backend,
        port,
    )
    os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR", "localhost")
    os.environ["MASTER_PORT"] = str(port)
    errors = torch.multiprocessing.get_context("spawn").SimpleQueue()
    failed = (torch.multiprocessing.ProcessExitedException, torch.multiprocessing.ProcessRaisedException)
    try:
        torch.multiprocessing.spawn(
            _spawned_worker, args=(world_size, backend, port, fn, args, errors), nprocs=world_size, join=True
        )
    except failed as err:
        # Whichever process the join saw fail first, a UserError of any one is the cause.
        if not errors.empty():
            raise UserError(errors.get()) from None
        if isinstance(err, torch.multiprocessing.ProcessRaisedException):
            raise
        raise UserError(
            f"distributed process {err.error_index} stopped with exit code "
            f"{err.exit_code} (its message is above)"
        ) from None
