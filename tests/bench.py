#!/usr/bin/env python3
"""Speed and memory benchmark (issue 6): the data path, training, scoring and extraction.

    python tests/bench.py --out bench_out                  # realistic default size (make bench)
    python tests/bench.py --out /tmp/b --utterances 300 --speakers 10 --dim 32 ...   # toy size
    python tests/bench.py --out /tmp/b --stages decode_wav decode_m4a --audio_files 200  # some stages

Builds a synthetic embedding tree `<spk>/<session>/<nnnnn>.npy` with its speaker files and lists
under OUT/data (once; a re-run of the same size reuses it), then runs every stage in its own forked
process, so that each stage's peak memory is its own. A stage times the project's way (the project's
own code) and, in the same process, a baseline on the same files: a re-creation of how the original
repository did the same work (one file per sample, a per-trial loop, one utterance a pass). The audio
stages compare formats instead: decoding .wav and .m4a files of the same audio, and m_gen_embs' whole
path on each. Prints one table, writes it as a JSON list of records, and prints the JSON path last.

The scale stages of issue 19 have data of their own (every size a --vox2_* / --blink_* flag):
pack_vox2 and store_open a VoxCeleb2-shaped tree (1,092,009 files of (10, 256), 5,994 speakers,
145,000 videos: 12.5 GiB, written once by --vox2_processes processes), train_vox2_steps a
VoxBlink2-sized float16 store (9,904,382 x 256, 5 GB) and a 100,000-row one, written block by block.
Those of issue 25 (--vox1h_* flags) a VoxCeleb2-sized float32 store (--vox2_utterances x --vox2_dim,
written block by block), which train_vox2_epoch trains from, and a VoxCeleb1-shaped one with a trial
list of the H list's size, which check_vox1h runs `m_trainer.py --check` on.

This file is the table of stages and the run; the rest lives beside it, by concern: bench_data.py
(the data makers), bench_measure.py (timing, peak memory, the records), bench_baseline.py (the
original repository's way, re-created), bench_stages.py (the runners) and bench_goals.py (the goals).
A stage is one row of STAGES (a Stage: name, unit, runner, the data it needs, its goals, bf16) plus
its runner, a function (args, tree, meter) -> StageResult.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from bench_data import DATA_MAKERS, Tree
from bench_goals import (
    BOOTSTRAP_SHARE,
    CHECK_SECONDS,
    GPU_TRAIN_SLACK,
    MEMORY_FACTOR,
    STEP_GROWTH,
    STORE_OPEN_FACTOR,
    TRAIN_SLACK,
    AtMostGoal,
    Goal,
    GrowthGoal,
    MemoryBudget,
    MemoryGoal,
    RatioGoal,
    StepTimeGoal,
    memory_budget,
)
from bench_measure import (
    CHECK_KEY,
    COMPUTE_KEY,
    GPU_KEY,
    MODEL,
    PEAK_KEY,
    SHARE_KEY,
    PeakMeter,
    StageResult,
    in_child,
    say,
)
from bench_stages import (
    CPU_EXTRACT_FILES,
    stage_backend_asnorm,
    stage_check_vox1h,
    stage_data_path,
    stage_decode,
    stage_extract,
    stage_extract_m4a,
    stage_load,
    stage_pack_vox2,
    stage_score,
    stage_score_vox1e,
    stage_store_open,
    stage_train,
    stage_train_vox2_epoch,
    stage_train_vox2_steps,
)

from m_utils import Option, Options, add_options, bf16_is_native, resolve_device

Runner = Callable[[argparse.Namespace, "Tree | None", PeakMeter], StageResult]


@dataclass(frozen=True)
class Stage:
    """One stage: its record's name and unit, the runner that measures it (in its own forked process),
    the data written before any stage runs (`needs`: a key of DATA_MAKERS, or "none"), its goals,
    judged in this order, and `bf16`: it runs bfloat16, so a CPU without bfloat16 instructions
    skips it."""

    name: str
    unit: str
    runner: Runner
    needs: str = "none"
    goals: tuple[Goal, ...] = ()
    bf16: bool = False

    def memory_limit(self, budget: MemoryBudget) -> float | None:
        return next((goal.limit(budget) for goal in self.goals if isinstance(goal, MemoryGoal)), None)


MODEL_MEMORY = MemoryGoal(("matrix_mb", "parameters_mb"))
TRAINING_MEMORY = MemoryGoal(("matrix_mb", "training_state_mb"))
EPOCH_TIME = StepTimeGoal(cpu=TRAIN_SLACK, gpu=GPU_TRAIN_SLACK)
# On a CPU both extractors are bound by arithmetic with one utterance a pass (ResNetSE34V2 at about
# 80 % of a large matrix product's FLOP rate on 2 cores), so batching cannot give 1.5x there: the
# goal on a CPU is not to be slower than the baseline (BENCHMARK.md, "Tests and benchmark").
EXTRACT_SPEED = RatioGoal(gpu=1.5, cpu=1.0)
# Issue 25: the VoxCeleb2-sized epoch within 1.15x its limit on either device; --check on the H list
# within 90 s after the stores are open, the bootstrap at most 30 % of that.
VOX2_EPOCH_TIME = StepTimeGoal(cpu=TRAIN_SLACK, gpu=TRAIN_SLACK)
CHECK_TIME = AtMostGoal(
    CHECK_KEY, CHECK_SECONDS, "--check {value:.1f} s after the stores are open <= {limit:g} s"
)
BOOTSTRAP_PART = AtMostGoal(SHARE_KEY, BOOTSTRAP_SHARE, "bootstrap {value:.0%} of it <= {limit:.0%}")
# bfloat16 is meant for GPUs (a CPU without bfloat16 instructions emulates it): no goal on a CPU.
STAGES: tuple[Stage, ...] = (
    Stage("load", "utt/s", stage_load, "tree", (MODEL_MEMORY,)),
    Stage("data_path", "batch/s", stage_data_path, "tree", (RatioGoal(50.0, 50.0), MODEL_MEMORY)),
    Stage(
        "train_mse", "utt/s", stage_train("train_mse", "normal", "MSE"), "tree", (EPOCH_TIME, TRAINING_MEMORY)
    ),
    Stage(
        "train_da_mse",
        "utt/s",
        stage_train("train_da_mse", "distribution", "DA_MSE"),
        "tree",
        (EPOCH_TIME, TRAINING_MEMORY),
    ),
    Stage("score", "trial/s", stage_score, "tree", (RatioGoal(100.0, 100.0), MODEL_MEMORY)),
    Stage("score_vox1e", "trial/s", stage_score_vox1e, "vox1e", (MemoryGoal(("vox1e_mb",)),)),
    Stage(
        "backend_asnorm", "trial/s", stage_backend_asnorm, "vox1e", (MemoryGoal(("vox1e_mb", "cohort_mb")),)
    ),
    Stage("extract_ge2e", "utt/s", stage_extract("extract_ge2e", "GE2E"), goals=(EXTRACT_SPEED,)),
    Stage(
        "extract_resnetse34v2",
        "utt/s",
        stage_extract("extract_resnetse34v2", "ResNetSE34V2"),
        goals=(EXTRACT_SPEED,),
    ),
    Stage(
        "extract_ge2e_bf16",
        "utt/s",
        stage_extract("extract_ge2e_bf16", "GE2E", mixedprec=True),
        goals=(RatioGoal(gpu=20.0, cpu=None),),
        bf16=True,
    ),
    Stage(
        "extract_resnetse34v2_bf16",
        "utt/s",
        stage_extract("extract_resnetse34v2_bf16", "ResNetSE34V2", mixedprec=True),
        goals=(RatioGoal(gpu=4.0, cpu=None),),
        bf16=True,
    ),
    Stage("decode_wav", "file/s", stage_decode(".wav")),
    Stage("decode_m4a", "file/s", stage_decode(".m4a")),
    Stage("extract_resnetse34v2_m4a", "utt/s", stage_extract_m4a, goals=(RatioGoal(0.8, 0.8),)),
    Stage("pack_vox2", "file/s", stage_pack_vox2, "vox2"),
    Stage(
        "store_open",
        "utt/s",
        stage_store_open,
        "vox2",
        (RatioGoal(100.0, 100.0), MemoryGoal(("vox2_matrix_mb",), STORE_OPEN_FACTOR)),
    ),
    Stage(
        "train_vox2_steps",
        "step/s",
        stage_train_vox2_steps,
        "blink",
        (GrowthGoal(STEP_GROWTH), MemoryGoal(("step_limit_mb",), 1.0)),
    ),
    Stage("train_vox2_epoch", "utt/s", stage_train_vox2_epoch, "vox2_store", (VOX2_EPOCH_TIME,)),
    Stage("check_vox1h", "trial/s", stage_check_vox1h, "vox1h", (CHECK_TIME, BOOTSTRAP_PART)),
)
STAGE = {stage.name: stage for stage in STAGES}


def warm_up(device: torch.device) -> None:
    """One tiny training step on `device`: torch's lazy imports, one-time buffers (about 70 MB on
    the first Adam step) and a GPU's context then belong to the baseline, not to the stage."""
    layer = torch.nn.Linear(4, 4).to(device)
    optimizer = torch.optim.Adam(layer.parameters(), fused=True)
    layer(torch.ones(2, 4, device=device)).sum().backward()
    optimizer.step()


def stage_child(name: str, args: argparse.Namespace, tree: Tree | None) -> tuple[StageResult, float]:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    warm_up(args.device)
    meter = PeakMeter()
    result = STAGE[name].runner(args, tree, meter)
    return result, meter.base


def run_isolated(name: str, args: argparse.Namespace, tree: Tree | None) -> tuple[StageResult, float]:
    """Run one stage in a forked child (its own peak memory); returns its result and base RSS."""
    try:
        return in_child(lambda: stage_child(name, args, tree))  # (StageResult, base RSS)
    except RuntimeError as err:
        raise SystemExit(f"bench: stage {name} failed ({err})") from None


# ----------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(records: list[dict]) -> str:
    gpu = any(GPU_KEY in r for r in records)
    peak = any(PEAK_KEY in r for r in records)
    head = (
        f"{'name':<27}{'unit':>9}{'project/s':>14}{'baseline/s':>14}{'ratio':>9}"
        f"{'compute-only/s':>16}{'peak MB':>10}"
        + (f"{'GPU MB':>10}" if gpu else "")
        + (f"{'bf16 peak %':>13}" if peak else "")
    )
    lines = [head, "-" * len(head)]
    for r in records:
        fraction = r.get(PEAK_KEY)
        lines.append(
            f"{r['name']:<27}{STAGE[r['name']].unit:>9}{fmt(r['project_per_s']):>14}"
            f"{fmt(r['baseline_per_s']):>14}{fmt(r['ratio'], 2):>9}"
            f"{fmt(r.get(COMPUTE_KEY)):>16}{fmt(r['peak_rss_mb']):>10}"
            + (f"{fmt(r.get(GPU_KEY)):>10}" if gpu else "")
            + (f"{fmt(None if fraction is None else 100 * fraction, 2):>13}" if peak else "")
        )
    return "\n".join(lines)


def verdicts(records: list[dict], budget: MemoryBudget) -> list[str]:
    """One line per goal of the issue, met or not, in the order of each stage's goals."""
    lines = (goal.verdict(r, budget) for r in records for goal in STAGE[r["name"]].goals)
    return [line for line in lines if line is not None]


def machine_line(args: argparse.Namespace, seconds: float, load: tuple[float, float]) -> str:
    device = resolve_device(args.device)
    where = (
        f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
        if device.type == "cuda"
        else "CPU only"
    )
    threads = args.threads or torch.get_num_threads()
    return (
        f"machine: {where}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {threads} "
        f"intra-op threads, load average {load[0]:.1f} at start and {load[1]:.1f} at the end (other "
        f"processes may be running); bench wall time {seconds:.0f} s"
    )


def memory_goal_lines(args: argparse.Namespace, records: list[dict], budget: MemoryBudget) -> list[str]:
    """What the memory goals are, in numbers."""
    limit = {
        name: STAGE[name].memory_limit(budget)
        for name in ("load", "train_mse", "score_vox1e", "backend_asnorm")
    }
    lines = [
        f"memory goal: {MEMORY_FACTOR} x (reduced matrix {args.utterances} x {args.dim} float32 = "
        f"{budget.matrix_mb:.1f} MB + {MODEL} parameters {budget.parameters_mb:.1f} MB) = "
        f"{limit['load']:.1f} MB; while training the model counts with its gradients and Adam's two "
        f"moments (4 x the parameters): {limit['train_mse']:.1f} MB"
    ]
    if any(r["name"] == "store_open" for r in records):
        lines.append(
            f"memory goal of store_open: {STORE_OPEN_FACTOR} x the VoxCeleb2-shaped matrix "
            f"{args.vox2_utterances} x {args.vox2_dim} float32 = {budget.vox2_matrix_mb:.1f} MB: "
            f"{STAGE['store_open'].memory_limit(budget):.1f} MB; of train_vox2_steps: "
            f"{budget.step_limit_mb:.1f} MB (8 GB)"
        )
    if any(STAGE[r["name"]].needs == "vox1e" for r in records):
        lines.append(
            f"memory goal of the VoxCeleb1-E stages: {MEMORY_FACTOR} x (matrix "
            f"{args.vox1e_utterances} x {args.dim} float32 = {budget.vox1e_mb:.1f} MB, for AS-Norm "
            f"+ cohort {args.cohort_speakers} x {args.dim} = {budget.cohort_mb:.1f} MB) = "
            f"{limit['score_vox1e']:.1f} MB, {limit['backend_asnorm']:.1f} MB"
        )
    return lines


def report(
    args: argparse.Namespace,
    records: list[dict],
    notes: Iterable[str],
    base_rss: float,
    seconds: float,
    load: tuple[float, float],
) -> None:
    budget = memory_budget(args)
    print()
    print(table(records))
    print()
    print(machine_line(args, seconds, load))
    print(
        f"peak MB: peak RSS of the stage's project path above its process before the stage (torch and "
        f"the project imported, one tiny Adam step taken: {base_rss:.0f} MB); the stage's data counts"
        + (
            "; GPU MB: torch's peak GPU allocation in the project path"
            if any(GPU_KEY in r for r in records)
            else ""
        )
    )
    for line in memory_goal_lines(args, records, budget):
        print(line)
    for note in notes:
        print(f"note: {note}")
    print("goals:")
    print("\n".join(verdicts(records, budget)))


OPTIONS: Options = {
    "out": Option("bench_out", str, "folder of the synthetic data and the JSON"),
    "utterances": Option(50_000, int, "utterance files in the tree"),
    "speakers": Option(1_000, int, "speakers in the tree"),
    "sessions": Option(5, int, "sessions (categories) per speaker"),
    "crops": Option(10, int, "crops per utterance file"),
    "dim": Option(512, int, "embedding dimension"),
    "batch_size": Option(200, int, "training batch size"),
    "workers": Option(5, int, "nDataLoaderThread: loader threads and baseline workers"),
    "trials": Option(200_000, int, "trials to score"),
    "baseline_batches": Option(30, int, "batches or DA steps timed of the baseline"),
    "compute_batches": Option(100, int, "batches timed of the compute-only loop"),
    "baseline_trials": Option(20_000, int, "trials timed of the per-trial loop"),
    "vox1e_trials": Option(580_000, int, "trials of the VoxCeleb1-E-sized list"),
    "vox1e_utterances": Option(145_000, int, "utterances the VoxCeleb1-E-sized list pairs"),
    "cohort_speakers": Option(6_000, int, "AS-Norm cohort speakers (backend_asnorm)"),
    "audio_utterances": Option(16, int, "utterances of synthetic audio"),
    "audio_seconds": Option(12.0, float, "seconds per synthetic utterance"),
    "eval_frames": Option(400, int, "extraction crop length in frames"),
    "num_eval": Option(10, int, "extraction crops per utterance"),
    "extract_batch": Option(0, int, "utterances per extractor pass; 0: m_gen_embs' choice for the device"),
    "baseline_utterances": Option(4, int, "utterances timed one at a time"),
    "audio_files": Option(
        4000,
        int,
        f"files of each format (links to the synthetic utterances) in the decode and "
        f"m4a stages; the m4a stage takes at most {CPU_EXTRACT_FILES} of them on a CPU",
    ),
    "vox2_utterances": Option(1_092_009, int, "files of the VoxCeleb2-shaped tree"),
    "vox2_speakers": Option(5_994, int, "speakers of the VoxCeleb2-shaped tree"),
    "vox2_videos": Option(145_000, int, "videos (folders) of the VoxCeleb2-shaped tree"),
    "vox2_crops": Option(10, int, "crops per file of the VoxCeleb2-shaped tree"),
    "vox2_dim": Option(256, int, "dimension of the VoxCeleb2- and VoxBlink2-sized data"),
    "vox2_processes": Option(2, int, "processes writing the VoxCeleb2-shaped tree"),
    "file_part": Option(100_000, int, "files store_open reads and scales (per-file side)"),
    "blink_rows": Option(9_904_382, int, "rows of the VoxBlink2-sized float16 store"),
    "blink_speakers": Option(111_284, int, "speakers of the VoxBlink2-sized store"),
    "blink_small_rows": Option(100_000, int, "rows of train_vox2_steps' small store"),
    "steps": Option(500, int, "training steps timed by train_vox2_steps"),
    "step_batch": Option(
        1_000, int, "batch size of train_vox2_steps, train_vox2_epoch and check_vox1h's model"
    ),
    "vox1h_utterances": Option(153_516, int, "utterances of check_vox1h's VoxCeleb1-shaped store"),
    "vox1h_speakers": Option(1_251, int, "speakers of check_vox1h's VoxCeleb1-shaped store"),
    "vox1h_trial_speakers": Option(1_190, int, "speakers whose utterances check_vox1h's H-sized list pairs"),
    "vox1h_trials": Option(552_536, int, "trials of check_vox1h's H-sized list"),
    "check_resamples": Option(1_000, int, "bootstrap resamples of check_vox1h's --check (also timed with 1)"),
    "check_model_steps": Option(100, int, "training steps of check_vox1h's model before its --check"),
    "threads": Option(0, int, "torch intra-op threads (default: torch's, one a core)"),
    "min_seconds": Option(1.0, float, "repeat fast project timings this long"),
    "device": Option("auto", str, "auto, cpu or cuda: where every stage runs"),
    "stages": Option(tuple(stage.name for stage in STAGES), list, "stages to run (default: all, in order)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, OPTIONS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.stages if name not in STAGE]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGE)}")
    if args.utterances < 2 * args.speakers or args.sessions < 2:
        parser.error("need at least 2 utterances per speaker and 2 sessions")
    if (
        args.vox2_utterances < 2 * args.vox2_speakers
        or not 0 < args.file_part <= args.vox2_utterances
        or args.blink_rows < 2 * args.blink_speakers
        or args.blink_small_rows > args.blink_rows
        or args.blink_small_rows < args.step_batch
    ):
        parser.error(
            "need --vox2_utterances >= 2 x --vox2_speakers, 0 < --file_part <= "
            "--vox2_utterances, --blink_rows >= 2 x --blink_speakers, --step_batch <= "
            "--blink_small_rows <= --blink_rows"
        )
    for name in (
        "baseline_batches",
        "compute_batches",
        "baseline_trials",
        "baseline_utterances",
        "trials",
        "workers",
        "audio_files",
        "audio_utterances",
        "vox2_videos",
        "vox2_crops",
        "vox2_processes",
        "steps",
        "vox1h_trials",
        "check_resamples",
        "check_model_steps",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.vox1e_utterances < 4 or args.vox1e_trials < args.vox1e_utterances or args.cohort_speakers < 2:
        parser.error(
            "need --vox1e_utterances >= 4, --vox1e_trials >= --vox1e_utterances (each utterance "
            "enrols) and --cohort_speakers >= 2"
        )
    if (
        not 2 <= args.vox1h_trial_speakers <= args.vox1h_speakers
        or args.vox1h_utterances < 2 * args.vox1h_speakers
    ):
        parser.error(
            "need 2 <= --vox1h_trial_speakers <= --vox1h_speakers and --vox1h_utterances >= 2 x "
            "--vox1h_speakers"
        )
    return args


def skipped_bf16_stages(args: argparse.Namespace) -> list[str]:
    """The bfloat16 stages asked for that this machine skips: on a CPU without bfloat16 instructions."""
    device = resolve_device(args.device)
    if device.type != "cpu" or bf16_is_native(device):
        return []
    return [name for name in args.stages if STAGE[name].bf16]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    needs = {STAGE[name].needs for name in args.stages}
    made = {need: make(args) for need, make in DATA_MAKERS.items() if need in needs}
    tree = made.get("tree")
    records, notes, base_rss = [], [], 0.0
    for name in skipped_bf16_stages(args):
        notes.append(
            f"{name}: skipped: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), where "
            "bfloat16 is emulated and many times slower than float32 (m_gen_embs --mixedprec "
            "runs float32 there)"
        )
        args.stages = [stage for stage in args.stages if stage != name]
    for name in (stage.name for stage in STAGES if stage.name in args.stages):
        say(f"stage {name} ...")
        began = time.perf_counter()
        result, base_rss = run_isolated(name, args, tree)
        say(f"stage {name} done in {time.perf_counter() - began:.1f} s")
        records.append(result.record)
        notes += result.notes
    report(args, records, notes, base_rss, time.perf_counter() - started, (load_start, os.getloadavg()[0]))
    path = Path(args.out) / "bench.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
