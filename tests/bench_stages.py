"""The bench's stages (tests/bench.py): each a runner (args, tree, meter) -> StageResult, run in
its own forked process, timing the project's way and, where there is one, the baseline."""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from bench_baseline import original_trial_parse, per_file_loader, per_trial_metrics, per_trial_scores
from bench_data import (
    EMBEDDING_TYPE,
    StoreData,
    Tree,
    Vox1h,
    Vox2,
    blink_of,
    blink_sizes,
    ensure_audio_trees,
    make_trials,
    synthetic_audio,
    vox1e_of,
    vox1h_of,
    vox2_of,
    vox2_store_of,
)
from bench_measure import (
    CHECK_KEY,
    MB,
    PEAK_KEY,
    SEED,
    SHARE_KEY,
    PeakMeter,
    StageResult,
    batch_to,
    in_child,
    make_record,
    new_trainer,
    repeated_rate,
    sampled_epoch_seconds,
    say,
    status_mb,
    timed,
    train_step,
)
from torch.utils.flop_counter import FlopCounterMode

import m_trainer
from m_comb_embs import THREADS, combine
from m_DataLoader import Batch, EmbeddingData, Sampling, TrialSet, load_embeddings, read_list
from m_gen_embs import (
    Item,
    Job,
    batch_size_for,
    embed_batch,
    extract,
    find_audio,
    make_crops,
    prepare_device,
    read_audio,
    workers_for,
)
from m_network import Trainer
from m_utils import DistContext
from models.GE2E import packaged_weights
from models.m_Extractors import load_extractor
from scoring.backends import make_backend
from scoring.metrics import evaluate_scores, score_trials
from stores.fresh import check_store
from stores.kinds import store_path_of
from stores.open import forget_freshness, tree_hash_of
from stores.packed import is_packed_store
from stores.stamps import TREE_STORE, tree_sources

# Dense bfloat16 tensor-core peak in TFLOP/s by a fragment of the CUDA device's name (first match).
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)
# The m4a stage runs ResNetSE34V2 on at most this many files of each format on a CPU (about 0.3 s an
# utterance there); on a GPU on all --audio_files.
CPU_EXTRACT_FILES = 32
STEP_MODEL = "MyResidualNet"  # the model of the VoxCeleb2 training runs of issues 19 and 25
VOX1E_TYPE = "B"  # scored by L2 distance, as the score stage (type C would copy the table to normalise it)
ASNORM_TOPK = 300


def load_list(args: argparse.Namespace, tree: Tree, kind: str) -> EmbeddingData:
    return EmbeddingData(
        tree.list_path(kind),
        tree.embed_dir,
        kind,
        EMBEDDING_TYPE[kind],
        args.dim,
        args.device,
        threads=args.workers,
    )


def stage_load(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
    meter.start()
    start = time.perf_counter()
    data = load_list(args, tree, "normal")
    seconds = time.perf_counter() - start
    return StageResult(
        make_record("load", len(data) / seconds, None, meter.peaks()),
        [
            "load: first load of the normal list (page cache warm); the baseline has no "
            "load step (it read files every epoch: see data_path), so no ratio"
        ],
    )


def stage_data_path(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
    data = load_list(args, tree, "normal")
    meter.start()
    sampling = Sampling(batch_size=args.batch_size, seed=SEED)
    batches = sum(1 for _ in data.batches(1, sampling))
    project = repeated_rate(lambda: sum(1 for _ in data.batches(1, sampling)), batches, args.min_seconds)
    peak = meter.peaks()
    loader = per_file_loader(args, tree, "normal")
    baseline = len(loader) / sampled_epoch_seconds(loader, args.baseline_batches, lambda batch: None)
    return StageResult(
        make_record("data_path", project, baseline, peak),
        [sampled_note("data_path", args.baseline_batches, len(loader), "batches")],
    )


def sampled_note(name: str, sample: int, total: int, what: str) -> str:
    if sample >= total:
        return f"{name}: baseline timed over the whole epoch ({total} {what})"
    return f"{name}: baseline timed on its first {sample} of {total} {what}, extrapolated to the epoch"


@dataclass
class EpochRates:
    """An epoch's rows, its rows/s (the better of epochs 1 and 2), its arithmetic limit (compute-only
    rows/s), the peak of epoch 1 and the notes saying how they were timed."""

    rows: int
    rows_per_s: float
    compute_per_s: float
    peak: dict[str, float]
    notes: list[str]


def epoch_rates(
    name: str,
    data: EmbeddingData,
    trainer: Trainer,
    sampling: Sampling,
    compute_batches: int,
    meter: PeakMeter,
) -> EpochRates:
    """Two epochs of `trainer` on `data` and, twice, its arithmetic limit: some of the epoch's
    batches, built beforehand, pushed through the same model and optimiser."""
    sizes = [batch.size for batch in data.batches(1, sampling)]
    rows = sum(sizes)

    def epoch_time(epoch: int) -> float:
        return timed(lambda: trainer.train_epoch(data, epoch, sampling))

    meter.start()
    first_epoch = epoch_time(1)
    peak = meter.peaks()  # epoch 1 also builds the optimiser state: the peak epoch
    # Spread over the epoch: DA steps differ in size (one speaker's pairs each).
    total = len(sizes)
    stride = max(1, total // compute_batches)
    batches = list(islice(data.batches(1, sampling), 0, None, stride))
    batches = batches[:compute_batches]

    def compute_time() -> float:
        return timed(lambda: [train_step(trainer.net, trainer.optimizer, batch) for batch in batches])

    # Each the better of two runs, the two kinds alternating: the first epoch also pays one-time
    # costs (optimiser state, a GPU's lazily loaded kernels), and this machine's speed drifts.
    compute_seconds = [compute_time()]
    seconds = min(first_epoch, epoch_time(2))
    compute_seconds.append(compute_time())
    compute = sum(batch.size for batch in batches) / min(compute_seconds)
    notes = [
        f"{name}: project time is the better of epochs 1 and 2, compute-only the better of "
        f"two runs, one after each epoch",
        f"{name}: compute-only timed on {len(batches)} of the epoch's {total} batches (every "
        f"{stride}th), built beforehand, pushed through the project epoch's model and optimiser",
    ]
    return EpochRates(rows, rows / seconds, compute, peak, notes)


def stage_train(name: str, kind: str, loss: str) -> Callable[..., StageResult]:
    """One epoch of MODEL with `loss` on the `kind` list: project, compute only, baseline."""

    def run(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
        data = load_list(args, tree, kind)
        trainer = new_trainer(loss, args.dim, args.device)
        sampling = Sampling(batch_size=args.batch_size, seed=SEED)
        rates = epoch_rates(name, data, trainer, sampling, args.compute_batches, meter)
        baseline = new_trainer(loss, args.dim, args.device)
        loader = per_file_loader(args, tree, kind)
        baseline_seconds = sampled_epoch_seconds(
            loader,
            args.baseline_batches,
            lambda batch: train_step(baseline.net, baseline.optimizer, batch_to(batch, args.device), True),
        )
        notes = [sampled_note(name, args.baseline_batches, len(loader), "steps"), *rates.notes]
        return StageResult(
            make_record(
                name, rates.rows_per_s, rates.rows / baseline_seconds, rates.peak, rates.compute_per_s
            ),
            notes,
        )

    return run


def stage_score(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
    records = read_list(tree.list_path("normal"), "normal")
    matrix = load_embeddings(
        tree.embed_dir, [rel for _, rel in records], args.dim, args.workers, show_progress=False
    )
    index = {spk: i for i, spk in enumerate(sorted({spk for spk, _ in records}))}
    speaker = np.array([index[spk] for spk, _ in records], np.int64)
    left, right, labels = make_trials(speaker, args.trials, np.random.default_rng(SEED))
    # Held where training keeps its embeddings: on the GPU when there is one.
    table = matrix if args.device.type == "cpu" else torch.from_numpy(matrix).to(args.device)
    meter.start()
    project = repeated_rate(
        lambda: evaluate_scores(score_trials(table, left, right, cosine=False), labels),
        args.trials,
        args.min_seconds,
    )
    peak = meter.peaks()
    scores = score_trials(table, left, right, cosine=False)
    sample = min(args.baseline_trials, args.trials)
    loop = timed(lambda: per_trial_scores(matrix, left[:sample], right[:sample], args.device))
    metrics = timed(lambda: per_trial_metrics(scores, labels))
    baseline = args.trials / (loop * args.trials / sample + metrics)
    note = (
        f"score: baseline per-trial loop timed on {sample} of {args.trials} trials and extrapolated, "
        f"its EER/minDCF on all {args.trials}"
        + ("; on CPU its per-trial device transfer is a no-op" if args.device.type == "cpu" else "")
    )
    return StageResult(make_record("score", project, baseline, peak), [note])


def vox1e_trial_set(args: argparse.Namespace, matrix: np.ndarray) -> TrialSet:
    """The VoxCeleb1-E-sized TrialSet as --check builds it (the list parsed, its files indexed), with
    the embeddings supplied from `matrix` instead of read from 145,000 files."""
    data = vox1e_of(args)
    return TrialSet(data.list_path, data.root, args.dim, load=lambda files: matrix)


def on_device(matrix: np.ndarray, device: torch.device) -> np.ndarray | torch.Tensor:
    """The table where training keeps its embeddings: on the GPU when there is one."""
    return matrix if device.type == "cpu" else torch.from_numpy(matrix).to(device)


def stage_score_vox1e(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    data = vox1e_of(args)
    matrix = np.load(data.matrix_path)  # what reading the embedding files would give; not timed
    meter.start()
    start = time.perf_counter()
    trials = vox1e_trial_set(args, matrix)
    table = on_device(trials.embeddings, args.device)
    scores = score_trials(table, trials.left, trials.right, VOX1E_TYPE == "C")
    evaluate_scores(scores, trials.labels)
    seconds = time.perf_counter() - start
    peak = meter.peaks()
    parse = timed(lambda: original_trial_parse(data.list_path))
    sample = min(args.baseline_trials, len(trials))
    loop = timed(
        lambda: per_trial_scores(trials.embeddings, trials.left[:sample], trials.right[:sample], args.device)
    )
    metrics = timed(lambda: per_trial_metrics(scores, trials.labels))
    baseline = len(trials) / (parse + loop * len(trials) / sample + metrics)
    notes = [
        f"score_vox1e: {len(trials)} trials over {len(trials.files)} utterances ({args.dim}-dim, type "
        f"{VOX1E_TYPE}); project: the list parsed and indexed by TrialSet (embeddings supplied from one "
        f"matrix, loaded before the timing, counted in the peak), scored, EER and minDCF; baseline: the "
        f"list read whole and split, the per-trial loop timed on {sample} trials and extrapolated, its "
        f"EER/minDCF"
    ]
    return StageResult(make_record("score_vox1e", len(trials) / seconds, baseline, peak), notes)


def stage_backend_asnorm(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    rng = np.random.default_rng(SEED)
    matrix = np.load(vox1e_of(args).matrix_path)
    meter.start()
    trials = vox1e_trial_set(args, matrix)
    table = on_device(trials.embeddings, args.device)
    # Training embeddings: two utterances of each cohort speaker.
    speakers = np.repeat(np.arange(args.cohort_speakers), 2)
    training = rng.standard_normal((args.cohort_speakers, args.dim), dtype=np.float32)[speakers]
    training += rng.standard_normal(training.shape, dtype=np.float32)
    backend = make_backend("asnorm", VOX1E_TYPE == "C", asnorm_topk=ASNORM_TOPK)
    fit = timed(partial(backend.fit, on_device(training, args.device), speakers))
    del training
    score = timed(lambda: backend.score(table, trials.left, trials.right))
    peak = meter.peaks()
    note = (
        f"backend_asnorm: AS-Norm (top {ASNORM_TOPK}) of {len(trials)} trials over {len(trials.files)} "
        f"utterances against {args.cohort_speakers} cohort speakers (fitted on 2 utterances each in "
        f"{fit:.2f} s); time: the scoring; peak: the trial set, the fit and the scoring; no baseline"
    )
    return StageResult(make_record("backend_asnorm", len(trials) / score, None, peak), [note])


def bf16_peak_flops(device: torch.device) -> float | None:
    """The card's dense bfloat16 peak in FLOP/s, from BF16_PEAK_TFLOPS; None for a CPU or another card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for fragment, tflops in BF16_PEAK_TFLOPS if fragment in name), None)


def flops_per_utterance(model: torch.nn.Module, item: Item, device: torch.device) -> float:
    """Floating-point operations of one utterance's pass (matrix products and convolutions, counted by
    torch's FlopCounterMode; the STFT is not among them)."""
    with FlopCounterMode(display=False) as counter:
        embed_batch(model, [item], device)
    return float(counter.get_total_flops())


def stage_extract(name: str, extractor: str, mixedprec: bool = False) -> Callable[..., StageResult]:
    """`extractor` on synthetic audio: m_gen_embs' batches of utterances (under bfloat16 autocast with
    `mixedprec`, as --mixedprec) vs one utterance a pass in float32."""

    def run(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
        notes = []
        random_init = extractor != "GE2E" or packaged_weights() is None
        model = load_extractor(extractor, random_init=random_init).to(args.device)
        if random_init:
            notes.append(f"{name}: random weights (the speed does not depend on them)")
        items = [
            Item(i, torch.from_numpy(make_crops(audio, args.eval_frames, args.num_eval)))
            for i, audio in enumerate(synthetic_audio(args.audio_utterances, args.audio_seconds))
        ]
        sample = items[: args.baseline_utterances]
        size = batch_size_for(args.extract_batch, args.device, args.eval_frames, args.num_eval, mixedprec)
        with torch.inference_mode():
            # The baseline first: m_gen_embs then changes how this process's malloc keeps memory (on
            # a CPU) or lets cuDNN autotune (on CUDA).
            embed_batch(model, items[:1], args.device)
            baseline = len(sample) / timed(
                lambda: [embed_batch(model, [item], args.device) for item in sample]
            )
            prepare_device(args.device)
            notes.append(
                f"{name}: the project's passes run with m_gen_embs' settings for the device "
                + ("(cuDNN's autotuner)" if args.device.type == "cuda" else "(malloc keeps freed memory)")
            )
            embed_batch(model, items[:size], args.device, mixedprec)
            meter.start()
            project = len(items) / timed(
                lambda: [
                    embed_batch(model, items[i : i + size], args.device, mixedprec)
                    for i in range(0, len(items), size)
                ]
            )
            peak = meter.peaks()
            flops = flops_per_utterance(model, items[0], args.device) if extractor == "ResNetSE34V2" else None
        notes.append(
            f"{name}: {len(items)} utterances of {args.audio_seconds:g} s, {args.num_eval} crops of "
            f"{args.eval_frames} frames each, {min(size, len(items))} utterance(s) per pass"
            f"{' in bfloat16 autocast' if mixedprec else ''}; baseline (one utterance per pass, "
            f"float32) timed on {len(sample)} of them"
        )
        record = make_record(name, project, baseline, peak)
        if flops is not None:
            peak_flops = bf16_peak_flops(args.device)
            record[PEAK_KEY] = None if peak_flops is None else round(project * flops / peak_flops, 4)
            notes.append(
                f"{name}: {flops / 1e9:.1f} GFLOP per utterance (FlopCounterMode), "
                + (
                    f"{project * flops / 1e12:.1f} TFLOP/s of the card's {peak_flops / 1e12:g}"
                    if peak_flops
                    else "no bfloat16 peak known for this device"
                )
            )
        return StageResult(record, notes)

    return run


def stage_decode(suffix: str) -> Callable[..., StageResult]:
    """m_gen_embs' decoding (read_audio: decode, mix to mono, check) of --audio_files `suffix` files of
    the same audio in this one process: files/s per core."""

    def run(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
        root = ensure_audio_trees(args)[suffix]
        paths = [root / rel for rel in find_audio(root)]

        def decode_all() -> None:
            for path in paths:
                read_audio(path)  # each result dropped before the next, as a worker hands it on

        read_audio(paths[0])
        meter.start()
        rate = len(paths) / timed(decode_all)
        name = f"decode_{suffix.lstrip('.')}"
        return StageResult(
            make_record(name, rate, None, meter.peaks()),
            [
                f"{name}: {len(paths)} files of {args.audio_seconds:g} s, decoded one after the "
                f"other in one process on one core (the crops excluded); no baseline"
            ],
        )

    return run


def stage_extract_m4a(args: argparse.Namespace, tree: Tree, meter: PeakMeter) -> StageResult:
    """m_gen_embs' whole path (DataLoader workers decoding and cropping, passes, atomic writes) with
    ResNetSE34V2 on .m4a files against the same on .wav files of the same audio: the ratio says whether
    decoding keeps up."""
    trees = ensure_audio_trees(args)
    count = args.audio_files if args.device.type == "cuda" else min(args.audio_files, CPU_EXTRACT_FILES)
    mixedprec = args.device.type == "cuda"
    model = load_extractor("ResNetSE34V2", random_init=True)
    logging.getLogger("m_gen_embs").setLevel(logging.WARNING)
    failed = multiprocessing.Value("i", 0)

    def files_per_second(suffix: str, files: int) -> float:
        root = trees[suffix]
        job = Job(
            db_path=root,
            embed_dir=root.parent / f"embeddings_{root.name}",
            files=tuple(find_audio(root)[:files]),
            eval_frames=args.eval_frames,
            num_eval=args.num_eval,
            batch_size=args.extract_batch,
            device=args.device.type,
            overwrite=True,
            mixedprec=mixedprec,
        )
        return files / timed(lambda: extract(DistContext(), job, model, failed))

    size = batch_size_for(args.extract_batch, args.device, args.eval_frames, args.num_eval, mixedprec)
    # cuDNN's autotuning and lazy loading, not timed: a full pass and the timed runs' last, shorter one
    files_per_second(".wav", size + count % size)
    meter.start()
    m4a = files_per_second(".m4a", count)
    peak = meter.peaks()
    wav = files_per_second(".wav", count)
    if failed.value:
        raise RuntimeError(f"extract_resnetse34v2_m4a: {failed.value} file(s) failed")
    workers = workers_for(None, args.device)
    return StageResult(
        make_record("extract_resnetse34v2_m4a", m4a, wav, peak),
        [
            f"extract_resnetse34v2_m4a: m_gen_embs' path on {count} .m4a files (project) and "
            f"the same on .wav files of the same audio (baseline): {workers} decoding workers, "
            f"random weights{', --mixedprec' if mixedprec else ''}; ratio = m4a / wav"
        ],
    )


def ready_seconds(list_path: Path, root: Path, dim: int, threads: int) -> tuple[float, float, int]:
    """(seconds, peak MB above the start, rows) for a run to have every training embedding of the
    list ready: the trainer's EmbeddingData, every row of its table read once (numpy's sum)."""
    forget_freshness()
    meter = PeakMeter()
    meter.start()
    start = time.perf_counter()
    data = EmbeddingData(list_path, root, "normal", "B", dim, "cpu", threads=threads)
    np.sum(data.table.numpy(), dtype=np.float64)
    return time.perf_counter() - start, meter.peak_mb(), len(data)


def read_through(paths: Iterable[Path]) -> None:
    """Read files once (untimed): the page cache holds them, as after the runs before."""
    for path in paths:
        with open(path, "rb") as file:
            while file.read(1 << 24):
                pass


def evict(paths: Iterable[Path]) -> None:
    """Drop these files (only these) from the page cache (POSIX_FADV_DONTNEED): the next read
    comes from the disk, as on a machine where they have not been read since they were written."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def store_is_fresh(embed_dir: Path) -> bool:
    """Whether the tree's packed store exists and matches its files (no process cache involved)."""
    store = store_path_of(embed_dir)
    return (
        is_packed_store(store) and check_store(store, tree_sources(embed_dir), tree_hash_of(embed_dir)).fresh
    )


def open_times(data: Vox2, args: argparse.Namespace, cache: str) -> dict[str, tuple[float, float, int]]:
    """ready_seconds of the packed store, the tree's path and the files' part, each in a fresh
    process, with the page cache `warm` (every file read once before) or `cold` (evicted)."""
    store = store_path_of(data.embed_dir)
    part_files = [data.part_dir / line.split()[1] for line in data.part_list.read_text().splitlines()]
    sides = {
        "store": (data.list_path, store, [*store.iterdir(), data.list_path]),
        "tree": (data.list_path, data.embed_dir, [*store.iterdir(), data.list_path]),
        "files": (data.part_list, data.part_dir, [*part_files, data.part_list]),
    }
    times = {}
    for side, (list_path, root, files) in sides.items():
        (read_through if cache == "warm" else evict)(files)
        times[side] = in_child(partial(ready_seconds, list_path, root, args.vox2_dim, args.workers))
    return times


def stage_store_open(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    """Every training embedding of the VoxCeleb2-shaped list ready: the packed store vs the files
    (a --file_part part of the tree, scaled), each side in its own fresh process; the record with
    the page cache cold (these files evicted), the warm figures in the notes."""
    data = vox2_of(args)
    if not store_is_fresh(data.embed_dir):
        say("store_open: packing the tree first (m_comb_embs, untimed)")
        combine(data.embed_dir, THREADS, pack=True)
    notes = []
    for cache in ("warm", "cold"):
        times = open_times(data, args, cache)
        (packed, peak, rows), (via_tree, _, _), (files, _, part_rows) = times.values()
        scaled = files * rows / part_rows
        notes.append(
            f"store_open ({cache} page cache): {rows} utterances ({args.vox2_speakers} speakers, "
            f"{args.vox2_dim}-dim): packed store (train_path = {TREE_STORE}) "
            f"{packed:.2f} s, peak {peak:.0f} MB; the tree's path (its freshness check stats every "
            f"file) {via_tree:.2f} s; files: a {part_rows}-file part {files:.2f} s ({args.workers} "
            f"reader threads), scaled linearly to {rows}: {scaled:.1f} s; ratios "
            f"{scaled / packed:.1f}x (store), {scaled / via_tree:.1f}x (tree's path)"
        )
    notes.append(
        "store_open: each side in a fresh process (no store or freshness cache); ready = the "
        "trainer's EmbeddingData plus every row read once; record: the cold run"
    )
    return StageResult(
        make_record("store_open", rows / packed, part_rows / files, {"peak_rss_mb": round(peak, 1)}), notes
    )


def stage_pack_vox2(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    """m_comb_embs (combine, packing on) over the VoxCeleb2-shaped tree: files/s."""
    data = vox2_of(args)
    meter.start()
    seconds = timed(lambda: combine(data.embed_dir, THREADS, pack=True))
    peak = meter.peaks()
    store = store_path_of(data.embed_dir)
    header = json.loads((store / "header.json").read_text())
    speaker_files = [name for name in os.listdir(data.embed_dir) if name.endswith(".npy")]
    if header["utterances"] != args.vox2_utterances or len(speaker_files) != 2 * args.vox2_speakers:
        raise RuntimeError(f"pack_vox2: {header['utterances']} rows, {len(speaker_files)} B/C files")
    size = sum(path.stat().st_size for path in store.iterdir()) / MB
    return StageResult(
        make_record("pack_vox2", args.vox2_utterances / seconds, None, peak),
        [
            f"pack_vox2: m_comb_embs.combine(pack=True, {THREADS} reader threads) over "
            f"{args.vox2_utterances} files of ({args.vox2_crops}, {args.vox2_dim}) float32, "
            f"{args.vox2_speakers} speakers, {args.vox2_videos} videos: {seconds:.1f} s; wrote "
            f"{len(speaker_files)} B/C files and the {header['dtype']} store ({size:.0f} MB); "
            f"no baseline"
        ],
    )


def endless_batches(data: EmbeddingData, batch_size: int) -> Iterator[Batch]:
    """Batches of epoch after epoch (a small store's 500 steps span several)."""
    epoch = 1
    while True:
        yield from data.batches(epoch, Sampling(batch_size=batch_size, seed=SEED))
        epoch += 1


class Stepper:
    """Training steps of a fresh STEP_MODEL (MSE) from `data`; one untimed step when made."""

    def __init__(self, args: argparse.Namespace, data: EmbeddingData):
        self.trainer = new_trainer("MSE", args.vox2_dim, args.device, STEP_MODEL)
        self.batches = endless_batches(data, args.step_batch)
        self.seconds: list[float] = []
        self.run(1)
        self.seconds.clear()

    def run(self, steps: int) -> None:
        """Time `steps` more steps (one entry of `seconds`)."""
        start = time.perf_counter()
        for batch in islice(self.batches, steps):
            train_step(self.trainer.net, self.trainer.optimizer, batch)
        self.seconds.append(time.perf_counter() - start)


class AnonPeak:
    """The peak of RssAnon (the process's own memory, not mapped file pages), sampled every 20 ms
    on a thread while in the `with` block."""

    def __enter__(self) -> AnonPeak:
        self.peak, self.done = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while True:
            self.peak = max(self.peak, status_mb("RssAnon") or 0.0)
            if self.done.wait(0.02):
                return

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


STEP_ROUNDS = 10  # the big and the small store's steps alternate in rounds: the machine's drift cancels


def stage_train_vox2_steps(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    """--steps steps from the VoxBlink2-sized float16 store against the same from the small one, in
    alternating rounds: the cost of a step must not grow with the store."""
    blink = blink_of(args)
    read_through([blink.store(size) / "embeddings.npy" for size in ("small", "big")])

    def stepper(size: str) -> Stepper:
        return Stepper(
            args,
            EmbeddingData(
                blink.list_path(size),
                blink.store(size),
                "normal",
                "B",
                args.vox2_dim,
                args.device,
                threads=args.workers,
            ),
        )

    small = stepper("small")
    base_anon = status_mb("RssAnon") or 0.0
    meter.start()
    with AnonPeak() as anon:
        started = time.perf_counter()
        big = stepper("big")
        ready = time.perf_counter() - started
        for k in range(STEP_ROUNDS):
            steps = args.steps // STEP_ROUNDS + (k < args.steps % STEP_ROUNDS)
            small.run(steps)
            big.run(steps)
    peak = meter.peaks()
    file_mb = status_mb("RssFile") or 0.0
    rows = {size: rows for size, (rows, _) in blink_sizes(args).items()}

    def per_step(stepper: Stepper) -> str:
        return ", ".join(f"{1000 * t * STEP_ROUNDS / args.steps:.1f}" for t in stepper.seconds)

    notes = [
        f"train_vox2_steps: {args.steps} steps of {STEP_MODEL} (MSE, batch {args.step_batch}) "
        f"from a {rows['big']} x {args.vox2_dim} float16 store and from a {rows['small']}-row one, "
        f"alternating in {STEP_ROUNDS} rounds; ms a step by round: big {per_step(big)}; small "
        f"{per_step(small)}; page cache warm (the stores read once before)",
        f"train_vox2_steps: the big store's EmbeddingData (its list of {rows['big']} lines "
        f"resolved, or read back from the store's list cache, the store mapped) took {ready:.0f} s; "
        f"peak RSS {peak['peak_rss_mb']:.0f} MB above the start, of which the process's own "
        f"(anonymous) memory peaked at {anon.peak - base_anon:.0f} MB; at the end {file_mb:.0f} MB "
        f"of RSS were the store's pages mapped from the page cache (shared, reclaimable; the "
        f"kernel maps 64 KB around each faulting row, so a few hundred random batches map nearly "
        f"the whole file)",
    ]
    rates = (args.steps / sum(big.seconds), args.steps / sum(small.seconds))
    record = make_record("train_vox2_steps", *rates, peak)
    return StageResult(record, notes)


# ----------------------------------------------------------------------------------------------
# VoxCeleb-sized stages of issue 25: an epoch from the VoxCeleb2-sized store, --check on the H list

VOX2_LOSS = "MSE_CS"  # the loss of the VoxCeleb2 training run
CHECK_BACKENDS = ("none", "mean", "asnorm", "plda")


def store_data(args: argparse.Namespace, data: StoreData) -> EmbeddingData:
    """The trainer's EmbeddingData of a bench store's normal list (type B)."""
    return EmbeddingData(
        data.list_path, data.store, "normal", "B", args.vox2_dim, args.device, threads=args.workers
    )


def stage_train_vox2_epoch(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    """One whole epoch of STEP_MODEL (VOX2_LOSS, --step_batch) from the VoxCeleb2-sized store
    against its arithmetic limit, as train_mse measures it."""
    data = store_data(args, vox2_store_of(args))
    trainer = new_trainer(VOX2_LOSS, args.vox2_dim, args.device, STEP_MODEL)
    sampling = Sampling(batch_size=args.step_batch, seed=SEED)
    rates = epoch_rates("train_vox2_epoch", data, trainer, sampling, args.compute_batches, meter)
    note = (
        f"train_vox2_epoch: an epoch of {STEP_MODEL} ({VOX2_LOSS}, batch {args.step_batch}) from a "
        f"{len(data)} x {args.vox2_dim} float32 store of {args.vox2_speakers} speakers; no baseline"
    )
    record = make_record("train_vox2_epoch", rates.rows_per_s, None, rates.peak, rates.compute_per_s)
    return StageResult(record, [note, *rates.notes])


def trained_model(args: argparse.Namespace, train: StoreData, path: Path) -> Path:
    """A checkpoint of STEP_MODEL (VOX2_LOSS) after --check_model_steps steps from the training store."""
    trainer = new_trainer(VOX2_LOSS, args.vox2_dim, args.device, STEP_MODEL)
    for batch in islice(endless_batches(store_data(args, train), args.step_batch), args.check_model_steps):
        train_step(trainer.net, trainer.optimizer, batch)
    trainer.save(path, 1)
    return path


def check_argv(
    args: argparse.Namespace, data: Vox1h, model: Path, save_path: Path, resamples: int
) -> list[str]:
    """The options of m_trainer.py --check on the H-sized list with a back-end of each kind."""
    return [
        "--check",
        "--model",
        STEP_MODEL,
        "--trainfunc",
        VOX2_LOSS,
        "--nOut",
        str(args.vox2_dim),
        "--backends",
        *CHECK_BACKENDS,
        "--bootstrap",
        str(resamples),
        "--test_list",
        str(data.trial_list),
        "--test_path",
        str(data.test.store),
        "--train_list",
        str(data.train.list_path),
        "--train_path",
        str(data.train.store),
        "--initial_model",
        str(model),
        "--save_path",
        str(save_path),
        "--result_tag",
        f"r{resamples}",
        "--device",
        args.device.type,
        "--nDataLoaderThread",
        str(args.workers),
    ]


@dataclass(frozen=True)
class CheckRun:
    """One --check: wall seconds, CPU seconds (user and system, all its threads: on a busy machine
    what the check itself used) and peak RSS in MB above its start."""

    seconds: float
    cpu_seconds: float
    peak_mb: float


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_check(argv: list[str], log_path: Path) -> CheckRun:
    """m_trainer's main on `argv`, run as `m_trainer.py` would be (in a child process: call through
    in_child), its output written to `log_path`."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    meter = PeakMeter()
    meter.start()
    cpu = cpu_seconds()
    seconds = timed(lambda: m_trainer.main(argv))
    sys.stdout.flush()
    return CheckRun(seconds, cpu_seconds() - cpu, meter.peak_mb())


def open_seconds(args: argparse.Namespace, data: Vox1h) -> float:
    """Seconds to open what --check opens before it scores: the trial list's TrialSet and the
    training list's EmbeddingData (the back-ends' training embeddings; its resolution already kept
    in the store by trained_model, as the checks find it)."""
    start = time.perf_counter()
    TrialSet(data.trial_list, data.test.store, args.vox2_dim, args.workers)
    store_data(args, data.train)
    return time.perf_counter() - start


def stage_check_vox1h(args: argparse.Namespace, tree: Tree | None, meter: PeakMeter) -> StageResult:
    """m_trainer.py --check of a trained model on the H-sized list, back-ends CHECK_BACKENDS fitted
    on the VoxCeleb2-sized store, with --check_resamples resamples and with 1, each in a fresh
    process: its seconds after the stores are open (less open_seconds) and the bootstrap's share
    of them (the difference of the two checks)."""
    data = vox1h_of(args)
    work = Path(args.out) / "check_vox1h"
    work.mkdir(parents=True, exist_ok=True)
    model = in_child(partial(trained_model, args, data.train, work / "model.model"))
    opened = in_child(partial(open_seconds, args, data))
    runs = {
        resamples: in_child(
            partial(
                timed_check, check_argv(args, data, model, work, resamples), work / f"check_r{resamples}.log"
            )
        )
        for resamples in (1, args.check_resamples)
    }
    once, full = runs[1], runs[args.check_resamples]
    after_open = full.seconds - opened
    record = make_record(
        "check_vox1h", args.vox1h_trials / after_open, None, {"peak_rss_mb": round(full.peak_mb, 1)}
    )
    bootstrap = full.seconds - once.seconds
    record.update({CHECK_KEY: round(after_open, 2), SHARE_KEY: round(bootstrap / after_open, 4)})
    notes = [
        f"check_vox1h: m_trainer.py --check of {STEP_MODEL} ({VOX2_LOSS}, trained "
        f"{args.check_model_steps} steps of {args.step_batch}) on {args.vox1h_trials} trials over the "
        f"utterances of {args.vox1h_trial_speakers} speakers of a {args.vox1h_utterances} x "
        f"{args.vox2_dim} float32 store; back-ends {', '.join(CHECK_BACKENDS)} fitted on the "
        f"{args.vox2_utterances}-row store; each run in a fresh process, page cache warm, "
        f"output in {work}",
        f"check_vox1h: opening the stores (TrialSet of the list, EmbeddingData of the training list) "
        f"{opened:.1f} s; the check with {args.check_resamples} resamples {full.seconds:.1f} s "
        f"({after_open:.1f} s after the opening), with 1 resample {once.seconds:.1f} s: the bootstrap "
        f"{bootstrap:.1f} s; peak RSS (the {args.check_resamples}-resample check) "
        f"{full.peak_mb:.0f} MB",
        f"check_vox1h: CPU time (user + system, all threads) of the checks: {full.cpu_seconds:.1f} s "
        f"with "
        f"{args.check_resamples} resamples, {once.cpu_seconds:.1f} s with 1 (on a busy machine the wall "
        f"times include waiting for a core; these do not)",
    ]
    return StageResult(record, notes)
