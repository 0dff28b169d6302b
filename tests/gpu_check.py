"""One prepared check for a machine with a GPU: the CUDA path, DDP across processes, a timing.

    python tests/gpu_check.py [--out gpu_check_out]

1. Trains one config on the CPU, on CUDA, on CUDA with --distributed (NCCL, one process per
   visible GPU) and --mixedprec, and with --distributed over two CPU processes (Gloo) at half the
   per-process batch; prints each run's epoch times and final EER, and compares final weights.
2. --check on CUDA.
3. Trial scoring of a table held on the GPU against the CPU's, with timings.
4. Extraction: m_gen_embs with GE2E on the CPU and on CUDA from .wav and from .m4a files (files
   compared), ResNetSE34V2's forward pass on both, and both extractors under --mixedprec (bfloat16)
   against float32 on CUDA, per crop.
Prints one line per check and `gpu_check: N problem(s)` last; exits non-zero if any. Without CUDA
it runs the CPU parts only and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import yaml
from audio_files import voice_like, write_encoded
from conftest import make_embedding_tree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_measure import timed  # noqa: E402 (it imports the project's modules)

import models.GE2E  # noqa: E402
from m_comb_embs import combine  # noqa: E402
from m_gen_embs import Item, embed_batch, make_crops  # noqa: E402
from m_gen_list import make_lists  # noqa: E402
from m_network import parse_score_line  # noqa: E402
from models.GE2E import packaged_weights  # noqa: E402
from models.m_Extractors import load_extractor  # noqa: E402
from scoring.metrics import score_trials  # noqa: E402

EPOCHS = 3
CUDA = torch.device("cuda")
problems: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"  {'ok     ' if ok else 'PROBLEM'}  {name}: {detail}", flush=True)
    if not ok:
        problems.append(name)


def build_data(out: Path) -> Path:
    for name, seed, speakers in (("train", 0, 300), ("test", 1, 60)):
        tree = out / name
        if not tree.exists():
            make_embedding_tree(tree, speakers=speakers, sessions=4, utterances=8, dim=256, seed=seed)
            combine(tree)
            make_lists(tree, name, out / "lists", seed=10, kinds=("normal", "test"))
    config = out / "gpu_check.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "train_list": str(out / "lists" / "train_normal_list.txt"),
                "train_path": str(out / "train"),
                "test_list": str(out / "lists" / "test_test_list.txt"),
                "test_path": str(out / "test"),
                "nOut": 256,
                "batch_size": 200,
                "max_epoch": EPOCHS,
                "test_interval": 1,
                "trainfunc": "MSE_CS",
                "model": "MyLinearNetv2",
                "multiple_embedding_flag": "C",
            }
        )
    )
    return config


def run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-3000:])
    return result


def train(config: Path, save: Path, *options: str) -> tuple[float | None, dict | None]:
    """Run the trainer; prints epoch times and the last --Val-- line; returns its EER and the
    weights after the first epoch."""
    started = time.perf_counter()
    result = run(str(ROOT / "m_trainer.py"), "--config", str(config), "--save_path", str(save), *options)
    label = " ".join(options)
    if result.returncode:
        check(f"train {label}", False, f"exit code {result.returncode}")
        return None, None
    times = [float(t) for t in re.findall(r"epoch \d+: loss \S+, lr \S+, ([\d.]+) s", result.stdout)]
    vals = [line.split("INFO ")[-1] for line in result.stdout.splitlines() if "--Val--" in line]
    if not vals:
        print(result.stdout[-3000:], result.stderr[-3000:])
        check(f"train {label}", False, "no --Val-- line in its output")
        return None, None
    val = vals[-1]
    print(f"{label:<50} epochs {times} s, wall {time.perf_counter() - started:.1f} s\n    {val}", flush=True)
    state = torch.load(save / "model" / f"model{1:09d}.model", map_location="cpu", weights_only=True)
    return parse_score_line(val)[1]["VEER"], state["network"]


def weight_gap(a: dict, b: dict) -> float:
    return max(float((a[key].float() - b[key].float()).abs().max()) for key in a)


def check_same_training(config: Path, out: Path, cuda: bool) -> None:
    """One epoch of 8 steps (batch 1200): few enough that float rounding differences have not yet
    grown through Adam (after 50 steps they reach 1e-2 between thread counts or devices)."""
    one = ("--max_epoch", "1", "--batch_size", "1200")
    _, cpu = train(config, out / "same_cpu", "--device", "cpu", *one)
    _, gloo = train(
        config,
        out / "same_gloo2",
        "--device",
        "cpu",
        *one[:2],
        "--batch_size",
        "600",
        "--distributed",
        "--nprocs",
        "2",
        "--port",
        "29531",
    )
    if cpu and gloo:
        gap = weight_gap(cpu, gloo)
        check(
            "DDP 2 CPU processes (Gloo, batch 2x600) = 1 process (batch 1200)",
            gap < 1e-4,
            f"max weight difference after 8 steps {gap:.2e}",
        )
    if cuda:
        _, on_gpu = train(config, out / "same_cuda", "--device", "cuda", *one)
        if cpu and on_gpu:
            gap = weight_gap(cpu, on_gpu)
            check(
                "CUDA training = CPU training", gap < 1e-4, f"max weight difference after 8 steps {gap:.2e}"
            )


def check_training(out: Path, cuda: bool) -> None:
    config = build_data(out)
    check_same_training(config, out, cuda)
    cpu_eer, _ = train(config, out / "run_cpu", "--device", "cpu")
    if not cuda:
        return
    cuda_eer, _ = train(config, out / "run_cuda", "--device", "cuda")
    amp_eer, _ = train(
        config,
        out / "run_cuda_ddp_amp",
        "--device",
        "cuda",
        "--distributed",
        "--mixedprec",
        "--port",
        "29533",
    )
    if None not in (cpu_eer, cuda_eer, amp_eer):
        check(
            "3 epochs: EER on CPU, CUDA, CUDA DDP (NCCL) + mixed precision",
            max(cpu_eer, cuda_eer, amp_eer) < 1.0,
            f"EER {cpu_eer} / {cuda_eer} / {amp_eer} (original about 17)",
        )
    checked = run(
        str(ROOT / "m_trainer.py"),
        "--config",
        str(config),
        "--save_path",
        str(out / "run_cuda"),
        "--check",
        "--device",
        "cuda",
    )
    lines = [line.split("INFO ")[-1] for line in checked.stdout.splitlines() if "EER" in line]
    check("--check on CUDA", checked.returncode == 0 and bool(lines), " | ".join(lines[:2]))


def check_scoring() -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50_000, 512)).astype(np.float32)
    left, right = rng.integers(0, len(table), (2, 200_000))
    on_gpu = torch.from_numpy(table).cuda()
    for embedding_type in ("B", "C"):
        cosine = embedding_type == "C"
        cpu = score_trials(table, left, right, cosine)
        gpu = score_trials(on_gpu, left, right, cosine)
        cpu_s = min(timed(lambda m=cosine: score_trials(table, left, right, m)) for _ in range(3))
        gpu_s = min(timed(lambda m=cosine: score_trials(on_gpu, left, right, m)) for _ in range(3))
        gap = float(np.abs(cpu - gpu).max())
        check(
            f"scoring type {embedding_type} on the GPU = CPU",
            gap < 1e-3,
            f"max difference {gap:.2e}; 200,000 trials: CPU {cpu_s * 1e3:.1f} ms, GPU {gpu_s * 1e3:.1f} ms",
        )


def write_audio(folder: Path, count: int, suffix: str = ".wav") -> None:
    """`count` files of tones and noise, 2 to 6 s, as <spk>/<video>/<nnnnn><suffix> (.wav or .m4a)."""
    rng = np.random.default_rng(3)
    for k in range(count):
        path = folder / f"id1000{k % 2}" / "sess0000001" / f"{k:05d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(16000 * rng.uniform(2, 6))) / 16000
        tones = np.sin(2 * np.pi * rng.uniform(100, 2000, (3, 1)) * t).sum(0)
        audio = 0.1 * tones + 0.01 * rng.standard_normal(len(t))
        if suffix == ".wav":
            soundfile.write(path, audio, 16000)
        else:
            write_encoded(path, audio, 16000)


def min_crop_cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """The lowest cosine between matching crops of two (..., crops, D) embedding arrays."""
    return float(
        torch.nn.functional.cosine_similarity(
            torch.as_tensor(a).float(), torch.as_tensor(b).float(), dim=-1
        ).min()
    )


def check_ge2e_precision() -> None:
    """GE2E on CUDA against the CPU: as the project runs it (LSTM in full float32), and with
    cuDNN's default TF32 for RNNs, to show why."""
    model = load_extractor("GE2E")
    rng = np.random.default_rng(2)
    t = np.arange(16000 * 5) / 16000
    waves = [0.1 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(len(t)) for f in (150, 400, 900)]
    crops = torch.from_numpy(np.concatenate([make_crops(wave, 160, 5) for wave in waves]))
    with torch.inference_mode():
        cpu = model(crops)
        gpu_model, gpu_crops = load_extractor("GE2E").cuda(), crops.cuda()
        exact = gpu_model(gpu_crops).cpu()
        rnn = getattr(torch.backends.cudnn, "rnn", None)
        print(f"    cudnn.rnn.fp32_precision: {getattr(rnn, 'fp32_precision', 'absent')}")
        results = [("as run (fp32 LSTM)", exact)]
        if hasattr(rnn, "fp32_precision"):
            gpu_model.lstm.forward = functools.partial(tf32_lstm, gpu_model.lstm.forward)
            results.append(("cuDNN TF32 LSTM", gpu_model(gpu_crops).cpu()))
    for label, result in results:
        cosine = float(torch.nn.functional.cosine_similarity(cpu, result).min())
        print(
            f"    GE2E CUDA {label}: lowest cosine to CPU {cosine:.6f}, max difference "
            f"{float((cpu - result).abs().max()):.2e}"
        )
    check(
        "GE2E forward on CUDA = CPU",
        float((cpu - exact).abs().max()) < 1e-3,
        f"max difference {float((cpu - exact).abs().max()):.2e}",
    )


def tf32_lstm(forward, *args, **kwargs):
    """The LSTM's forward with cuDNN's RNN precision set to TF32 (inside the model's fp32 block)."""
    rnn = torch.backends.cudnn.rnn
    previous = rnn.fp32_precision
    rnn.fp32_precision = "tf32"
    try:
        return forward(*args, **kwargs)
    finally:
        rnn.fp32_precision = previous


def gen_embs(audio: Path, target: Path, device: str, *options: str) -> dict[Path, np.ndarray]:
    """m_gen_embs with GE2E on `device`: relative path -> embeddings of every file it wrote."""
    result = run(
        str(ROOT / "m_gen_embs.py"),
        "--model",
        "GE2E",
        "--db_path",
        str(audio),
        "--embed_dir",
        str(target),
        "--device",
        device,
        "--overwrite",
        "--eval_frames",
        "160",
        "--num_eval",
        "5",
        *options,
    )
    if result.returncode:
        check(f"m_gen_embs on {device} {' '.join(options)}", False, f"exit code {result.returncode}")
    return {p.relative_to(target): np.load(p) for p in sorted(target.rglob("*.npy"))}


def check_gen_embs(out: Path, suffix: str) -> None:
    """GE2E from `suffix` files: CUDA in float32 = CPU; CUDA --mixedprec within cosine 0.999 per crop."""
    audio = out / f"audio_{suffix.lstrip('.')}"
    write_audio(audio, 12, suffix)
    cpu = gen_embs(audio, out / f"emb_{suffix.lstrip('.')}_cpu", "cpu")
    cuda = gen_embs(audio, out / f"emb_{suffix.lstrip('.')}_cuda", "cuda")
    mixed = gen_embs(audio, out / f"emb_{suffix.lstrip('.')}_cuda_bf16", "cuda", "--mixedprec")
    if cpu and cpu.keys() == cuda.keys() == mixed.keys():
        gap = max(float(np.abs(cpu[k] - cuda[k]).max()) for k in cpu)
        check(
            f"m_gen_embs GE2E on CUDA = CPU ({suffix})",
            gap < 1e-3,
            f"{len(cpu)} files, max difference {gap:.2e}",
        )
        cosine = min(min_crop_cosine(cpu[k], mixed[k]) for k in cpu)
        check(
            f"m_gen_embs GE2E --mixedprec on CUDA ~ CPU float32 ({suffix})",
            cosine >= 0.999,
            f"lowest cosine per crop {cosine:.6f}",
        )
    else:
        check(f"m_gen_embs GE2E ({suffix})", False, "the runs wrote different files")


def check_mixedprec(
    model: torch.nn.Module, name: str, crops: torch.Tensor, utterances: int, device: torch.device = CUDA
) -> None:
    """`model` under bfloat16 autocast against float32 on `device`, per crop; and its speed with
    `utterances` utterances a pass."""
    items = [Item(0, crops)]
    with torch.inference_mode():
        exact = embed_batch(model, items, device)
        mixed = embed_batch(model, items, device, mixedprec=True)
        batch = [Item(i, crops) for i in range(utterances)]
        seconds = {
            mp: min(timed(lambda m=mp: embed_batch(model, batch, device, m)) for _ in range(3))
            for mp in (False, True)
        }
    cosine = min_crop_cosine(exact, mixed)
    check(
        f"{name} bfloat16 ~ float32 on {device.type}",
        cosine >= 0.999,
        f"lowest cosine per crop {cosine:.6f}; {utterances} utterances a pass: float32 "
        f"{utterances / seconds[False]:.0f} utt/s, bfloat16 {utterances / seconds[True]:.0f} utt/s",
    )


def bf16_lstm_cosine(model: torch.nn.Module, crops: torch.Tensor, device: torch.device = CUDA) -> float:
    """For information: the lowest cosine per crop between GE2E in float32 and GE2E under bfloat16
    autocast with its LSTM in bfloat16 too (the project keeps it in float32: on a CPU a bfloat16 LSTM
    moved embeddings to cosine 0.998)."""
    with torch.inference_mode():
        exact = embed_batch(model, [Item(0, crops)], device)
        kept = models.GE2E.full_precision
        models.GE2E.full_precision = lambda _: contextlib.nullcontext()
        try:
            mixed = embed_batch(model, [Item(0, crops)], device, mixedprec=True)
        finally:
            models.GE2E.full_precision = kept
    return min_crop_cosine(exact, mixed)


def check_extraction(out: Path) -> None:
    if packaged_weights() is None:
        check("GE2E extraction", False, "resemblyzer's weights not installed")
    else:
        for suffix in (".wav", ".m4a"):
            check_gen_embs(out, suffix)
        check_ge2e_precision()
        ge2e = load_extractor("GE2E").cuda()
        voice = torch.from_numpy(make_crops(voice_like(8.0), 160, 5))
        check_mixedprec(ge2e, "GE2E", voice, 64)
        print(
            f"    GE2E with a bfloat16 LSTM too on CUDA: lowest cosine per crop to float32 "
            f"{bf16_lstm_cosine(ge2e, voice):.6f}"
        )
    torch.manual_seed(0)
    model = load_extractor("ResNetSE34V2", random_init=True)
    crops = torch.from_numpy(make_crops(np.random.default_rng(1).standard_normal(16000 * 8) * 0.1, 400, 10))
    with torch.inference_mode():
        cpu = model(crops)
        gpu = model.cuda()(crops.cuda()).cpu()
        cosine = float(torch.nn.functional.cosine_similarity(cpu, gpu).min())
        per_pass = min(timed(lambda: model(torch.cat([crops] * 16).cuda())) for _ in range(3))
    check(
        "ResNetSE34V2 forward on CUDA = CPU",
        cosine > 0.999,
        f"lowest cosine {cosine:.6f} (cuDNN may "
        f"use TF32); 16 utterances x 10 crops in {per_pass * 1e3:.0f} ms",
    )
    check_mixedprec(model, "ResNetSE34V2", crops, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check_out")
    out = Path(parser.parse_args().out)
    cuda = torch.cuda.is_available()
    print(
        f"torch {torch.__version__}, CUDA available: {cuda}, "
        f"devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}",
        flush=True,
    )
    check_training(out, cuda)
    if cuda:
        check_scoring()
        check_extraction(out)
    else:
        print("no CUDA device: only the CPU paths were checked")
    print(f"gpu_check: {len(problems)} problem(s){': ' + ', '.join(problems) if problems else ''}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
