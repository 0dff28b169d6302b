"""Pieces shared by every script: user-facing errors, atomic file writes, device choice and
the process group (one helper for the trainer and the extractor)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("m_utils")


class UserError(Exception):
    """A problem with the user's input or setup: printed as one clear message, exit code 2."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
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


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserError:
    """The error for a name that is not in a registry; lists the known names and the closest ones."""
    known = sorted(known)
    close = get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"unknown {kind} '{name}'{hint}; known: {', '.join(known)}")


def read_user_text(path: str | os.PathLike, what: str, maker: str = "") -> str:
    """The text of a user's file, or a UserError naming it (`what`: "list file", ...)."""
    return "".join(user_text_lines(path, what, maker))


def user_text_lines(path: str | os.PathLike, what: str, maker: str = "") -> Iterator[str]:
    """The lines of a user's file, read as they are consumed (a long list is never held whole),
    or a UserError naming it (`what`: "list file", ...)."""
    path = Path(path)
    try:
        with path.open() as file:
            yield from file
    except FileNotFoundError:
        hint = f" ({maker} writes it)" if maker else ""
        raise UserError(f"{path}: {what} not found{hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the {what} ({err})") from None


# ----------------------------------------------------------------------------------------------
# Options: name -> (default, type, help). Types: int, float, str, bool; a None default is "unset".

Options = dict[str, tuple[Any, type, str]]

# Where the work runs; m_trainer and m_gen_embs both take these.
HARDWARE_OPTIONS: Options = {
    "device": ("auto", str, "auto, cpu or cuda (auto: CUDA when present)"),
    "mixedprec": (False, bool, "mixed precision (autocast) on CUDA"),
    "distributed": (False, bool, "one process per GPU (or --nprocs CPU processes)"),
    "nprocs": (2, int, "CPU processes for --distributed without CUDA"),
    "port": (8888, int, "MASTER_PORT of the process group"),
}


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")


def add_options(parser: argparse.ArgumentParser, options: Options, with_defaults: bool = True) -> None:
    """One `--name` per option; a bool option is a flag that also takes true/false."""
    for name, (default, kind, text) in options.items():
        keep = {"default": default} if with_defaults else {}
        if kind is bool:
            parser.add_argument(f"--{name}", nargs="?", const=True, type=parse_bool, help=text, **keep)
        else:
            parser.add_argument(f"--{name}", type=kind, help=text, **keep)


# ----------------------------------------------------------------------------------------------
# Atomic writes: a file either has its complete new content or does not exist under its name.


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, array))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text), mode="w")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and flush it to disk, so a crash never leaves half a record."""
    with open(path, "a") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


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


def init_process_group(rank: int, world_size: int, local_rank: int, backend: str,
                       port: int | None = None) -> DistContext:
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


def _spawned_worker(local_rank: int, world_size: int, backend: str, port: int,
                    fn: Callable[..., Any], args: tuple) -> None:
    ctx = init_process_group(local_rank, world_size, local_rank, backend, port)
    try:
        _run_in_group(ctx, fn, args)
    except UserError as err:
        print(f"error (rank {local_rank}): {err}", file=sys.stderr)
        sys.exit(2)


def launch(fn: Callable[..., Any], args: tuple, *, distributed: bool, device: str,
           nprocs: int, port: int) -> None:
    """Run `fn(ctx, *args)` once, or in every process of a group.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) this process joins that group. Otherwise,
    with `distributed`, it spawns one process per visible CUDA device (NCCL) or, without CUDA,
    `nprocs` CPU processes (Gloo), all on localhost:`port`.
    """
    import torch

    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if launched_by_torchrun():
        ctx = init_process_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                                 int(os.environ["LOCAL_RANK"]), backend)
        _run_in_group(ctx, fn, args)
        return
    if not distributed:
        fn(SINGLE, *args)
        return
    world_size = torch.cuda.device_count() if use_cuda else nprocs
    if world_size < 1:
        raise UserError("--distributed needs at least one process (see --nprocs)")
    log.info("distributed: %d %s process(es), backend %s, port %d", world_size,
             "GPU" if use_cuda else "CPU", backend, port)
    os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR", "localhost")
    os.environ["MASTER_PORT"] = str(port)
    try:
        torch.multiprocessing.spawn(_spawned_worker, args=(world_size, backend, port, fn, args),
                                    nprocs=world_size, join=True)
    except torch.multiprocessing.ProcessExitedException as err:
        raise UserError(f"distributed process {err.error_index} stopped with exit code "
                        f"{err.exit_code} (its message is above)") from None
