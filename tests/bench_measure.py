"""How the bench measures (tests/bench.py): peak memory, timings, training steps, a child process
per measurement, and the record each stage returns."""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from m_DataLoader import Batch
from m_network import SpeakerNet, Trainer, clear_gradients

RECORD_KEYS = ("name", "project_per_s", "baseline_per_s", "ratio", "peak_rss_mb")
COMPUTE_KEY = "compute_only_per_s"
GPU_KEY = "peak_gpu_mb"
PEAK_KEY = "bf16_peak_fraction"  # ResNetSE34V2's FLOP rate over the card's dense bfloat16 peak
CHECK_KEY = "check_seconds"  # check_vox1h: seconds of --check after the stores are open
SHARE_KEY = "bootstrap_share"  # check_vox1h: the bootstrap's share of them
MODEL = "MyLinearNetv2"
SEED = 10
MB = 2**20


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMeter:
    """Peak resident memory above this process's size when the meter was made.

    `start()` resets the kernel's high-water mark (5 into /proc/self/clear_refs), so a setup
    transient before it does not count; where that is impossible the lifetime peak is used.
    """

    def __init__(self):
        self.base = status_mb("VmRSS") or 0.0

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> dict[str, float]:
        """The record's peak fields since start(): host RSS, and GPU memory where CUDA is in use."""
        peaks = {"peak_rss_mb": round(self.peak_mb(), 1)}
        if torch.cuda.is_initialized():
            peaks[GPU_KEY] = round(torch.cuda.max_memory_allocated() / MB, 1)
        return peaks

    def peak_mb(self) -> float:
        peak = status_mb("VmHWM")
        if peak is None:
            scale = 1 if sys.platform == "darwin" else 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB
        return peak - self.base


def timed(work: Callable[[], object]) -> float:
    """Seconds of `work`, its GPU kernels finished."""
    start = time.perf_counter()
    work()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def repeated_rate(work: Callable[[], object], units: float, min_seconds: float) -> float:
    """units/s of `work`, run again until `min_seconds` have passed (at least once)."""
    runs, elapsed = 0, 0.0
    while runs == 0 or elapsed < min_seconds:
        elapsed += timed(work)
        runs += 1
    return units * runs / elapsed


def sampled_epoch_seconds(loader: DataLoader, sample: int, step: Callable[[Batch], None]) -> float:
    """Seconds of one epoch of `loader` (a fresh iterator, as each epoch of the original repository),
    from its first `sample` batches: the time to the first one, plus the mean time of the others for each
    batch left. Exact when `sample` covers the epoch."""
    total = len(loader)
    start, first, taken = time.perf_counter(), 0.0, 0
    iterator = iter(loader)
    for batch in iterator:
        step(batch)
        taken += 1
        if taken == 1:
            first = time.perf_counter() - start
        if taken >= sample:
            break
    elapsed = time.perf_counter() - start
    del iterator
    if taken >= total:
        return elapsed
    per_batch = (elapsed - first) / (taken - 1) if taken > 1 else first
    return first + per_batch * (total - 1)


def train_step(
    net: SpeakerNet, optimizer: torch.optim.Optimizer, batch: Batch, baseline: bool = False
) -> None:
    """One optimiser step of `net` on `batch`, and nothing else. The baseline zeroes gradients with
    torch's default (set_to_none), as the original repository did; the project as its Trainer does."""
    if baseline:
        optimizer.zero_grad(set_to_none=True)
    else:
        clear_gradients(optimizer, batch.inputs.device)
    loss, _ = net(batch)
    loss.backward()
    optimizer.step()


def new_trainer(loss: str, dim: int, device: torch.device, model: str = MODEL) -> Trainer:
    torch.manual_seed(SEED)
    return Trainer(SpeakerNet(model, loss, nOut=dim), device)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors moved to `device`, as the original repository moved each batch (.cuda())."""
    return replace(
        batch,
        **{
            f.name: getattr(batch, f.name).to(device)
            for f in fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        },
    )


def in_child(work: Callable[[], object]) -> object:
    """`work()` in a forked process: nothing it opens or caches (stores, freshness) outlives it."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=lambda: send.send(work()))
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = None
    process.join()
    if process.exitcode != 0 or result is None:
        raise RuntimeError(f"bench: a timed child process failed (exit code {process.exitcode})")
    return result


@dataclass
class StageResult:
    record: dict
    notes: list[str]


def make_record(
    name: str,
    project: float,
    baseline: float | None,
    peaks: dict[str, float],
    compute_only: float | None = None,
) -> dict:
    record = {
        "name": name,
        "project_per_s": round(project, 3),
        "baseline_per_s": None if baseline is None else round(baseline, 3),
        "ratio": None if baseline is None else round(project / baseline, 2),
        **peaks,
    }
    if compute_only is not None:
        record[COMPUTE_KEY] = round(compute_only, 3)
    return record
