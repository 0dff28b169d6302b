"""The bench's goals (tests/bench.py): what a stage's record must show, each judged as one
`met` / `NOT met` line naming the stage. A goal is a RatioGoal (project/baseline, per device), a
StepTimeGoal (an epoch against its arithmetic limit), a GrowthGoal (a step against the same step
from a smaller store), an AtMostGoal (a field of the record at most a limit) or a MemoryGoal (a
factor, MEMORY_FACTOR unless given, x a sum of MemoryBudget's sizes; a new size is one field of
MemoryBudget)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from bench_measure import COMPUTE_KEY, GPU_KEY, MB, MODEL

from models.m_Models import get_model

TRAIN_SLACK = 1.15
GPU_TRAIN_SLACK = 1.10  # an epoch on a GPU (set for the chunked batch path, since removed: to re-measure)
MEMORY_FACTOR = 1.5
STORE_OPEN_FACTOR = 1.2  # store_open: peak RSS within 1.2x the (N, D) float32 matrix
STEP_GROWTH = 1.15  # train_vox2_steps: a step from the VoxBlink2-sized store within 1.15x the small one's
STEP_RSS_BYTES = 8e9  # train_vox2_steps: peak RSS under 8 GB
CHECK_SECONDS = 90.0  # check_vox1h: --check within 90 s after the stores are open
BOOTSTRAP_SHARE = 0.30  # check_vox1h: the bootstrap at most 30 % of those seconds


def goal_line(text: str, met: bool) -> str:
    return f"  {'met    ' if met else 'NOT met'}  {text}"


@dataclass(frozen=True)
class MemoryBudget:
    """The sizes in MB that memory goals are factors of: the reduced (N, D) float32 matrix, MODEL's
    parameters and its training state (parameters, gradients and Adam's two moments), the
    VoxCeleb1-E-sized (utterances, D) matrix and AS-Norm's (cohort speakers, D) cohort, the
    VoxCeleb2-shaped (utterances, D) float32 matrix, and train_vox2_steps' fixed limit (8 GB)."""

    matrix_mb: float
    parameters_mb: float
    vox1e_mb: float
    cohort_mb: float
    vox2_matrix_mb: float
    step_limit_mb: float = STEP_RSS_BYTES / MB

    @property
    def training_state_mb(self) -> float:
        return 4 * self.parameters_mb


def memory_budget(args: argparse.Namespace) -> MemoryBudget:
    parameters = sum(p.numel() for p in get_model(MODEL, nOut=args.dim).parameters())
    return MemoryBudget(
        args.utterances * args.dim * 4 / MB,
        parameters * 4 / MB,
        args.vox1e_utterances * args.dim * 4 / MB,
        args.cohort_speakers * args.dim * 4 / MB,
        args.vox2_utterances * args.vox2_dim * 4 / MB,
    )


@dataclass(frozen=True)
class RatioGoal:
    """project / baseline at least `gpu` where the stage ran on a GPU, `cpu` on a CPU (None: no goal)."""

    gpu: float | None
    cpu: float | None

    def verdict(self, record: dict, budget: MemoryBudget) -> str | None:
        goal = self.gpu if GPU_KEY in record else self.cpu
        if goal is None or record["ratio"] is None:
            return None
        return goal_line(f"{record['name']} ratio {record['ratio']:.2f} >= {goal:g}", record["ratio"] >= goal)


@dataclass(frozen=True)
class StepTimeGoal:
    """An epoch at most `cpu` (`gpu` on a GPU) times its arithmetic limit: the record's COMPUTE_KEY,
    the rate of the same batches, built beforehand, pushed through the model and optimiser."""

    cpu: float
    gpu: float

    def verdict(self, record: dict, budget: MemoryBudget) -> str | None:
        if COMPUTE_KEY not in record:
            return None
        slowdown = record[COMPUTE_KEY] / record["project_per_s"]
        slack = self.gpu if GPU_KEY in record else self.cpu
        return goal_line(
            f"{record['name']} epoch at {slowdown:.3f}x its arithmetic limit <= {slack}", slowdown <= slack
        )


@dataclass(frozen=True)
class MemoryGoal:
    """Peak memory at most `factor` (MEMORY_FACTOR unless given) x the sum of `sizes` (MemoryBudget's
    sizes, by name). Judged where the data lives: on the GPU when the stage ran there, else in the
    process's RSS."""

    sizes: tuple[str, ...]
    factor: float = MEMORY_FACTOR

    def limit(self, budget: MemoryBudget) -> float:
        return self.factor * sum(getattr(budget, size) for size in self.sizes)

    def verdict(self, record: dict, budget: MemoryBudget) -> str | None:
        where, peak = ("GPU", record[GPU_KEY]) if GPU_KEY in record else ("RSS", record["peak_rss_mb"])
        limit = self.limit(budget)
        return goal_line(f"{record['name']} peak {where} {peak:.0f} MB <= {limit:.0f} MB", peak <= limit)


@dataclass(frozen=True)
class GrowthGoal:
    """A step at most `limit` times as long as the baseline's (the same steps from a smaller store):
    baseline_per_s / project_per_s."""

    limit: float

    def verdict(self, record: dict, budget: MemoryBudget) -> str | None:
        growth = record["baseline_per_s"] / record["project_per_s"]
        return goal_line(
            f"{record['name']} step time {growth:.3f}x the small store's <= {self.limit}",
            growth <= self.limit,
        )


@dataclass(frozen=True)
class AtMostGoal:
    """The record's field `key` at most `limit`; `text` says what it is, formatted with `value` and
    `limit` (no line where the record has no such field)."""

    key: str
    limit: float
    text: str

    def verdict(self, record: dict, budget: MemoryBudget) -> str | None:
        if self.key not in record:
            return None
        value = record[self.key]
        return goal_line(
            f"{record['name']} {self.text.format(value=value, limit=self.limit)}", value <= self.limit
        )


Goal = RatioGoal | StepTimeGoal | MemoryGoal | GrowthGoal | AtMostGoal
