"""One prepared check for a machine with a GPU: the CUDA path, DDP across processes, a timing.

    python tests/gpu_check.py [--out gpu_check_out]

Builds a small synthetic embedding tree, then trains the same config on the CPU, on CUDA, and on
CUDA with --distributed (one process per visible GPU) and --mixedprec, printing each run's epoch
time and final EER; the CPU and CUDA runs must agree to float tolerance. Without CUDA it runs the
CPU part only and says so.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import make_embedding_tree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m_comb_embs import combine  # noqa: E402
from m_gen_list import make_lists  # noqa: E402


def build_data(out: Path) -> Path:
    for name, seed, speakers in (("train", 0, 300), ("test", 1, 60)):
        tree = out / name
        if not tree.exists():
            make_embedding_tree(tree, speakers=speakers, sessions=4, utterances=8, dim=256, seed=seed)
            combine(tree)
            make_lists(tree, name, out / "lists", seed=10, kinds=("normal", "test"))
    config = out / "gpu_check.yaml"
    config.write_text(yaml.safe_dump({
        "train_list": str(out / "lists" / "train_normal_list.txt"), "train_path": str(out / "train"),
        "test_list": str(out / "lists" / "test_test_list.txt"), "test_path": str(out / "test"),
        "nOut": 256, "batch_size": 200, "max_epoch": 3, "test_interval": 3, "trainfunc": "MSE_CS",
        "model": "MyLinearNetv2", "multiple_embedding_flag": "C"}))
    return config


def train(config: Path, save: Path, *options: str) -> tuple[float, str]:
    """Run the trainer; returns the mean epoch time (s) and the final --Val-- line."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "m_trainer.py"), "--config", str(config),
                             "--save_path", str(save), *options], capture_output=True, text=True)
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-3000:])
        raise SystemExit(f"trainer failed with {options}")
    times = [float(t) for t in re.findall(r"epoch \d+: loss \S+, lr \S+, ([\d.]+) s", result.stdout)]
    val = [line for line in result.stdout.splitlines() if "--Val--" in line][-1]
    wall = time.perf_counter() - started
    print(f"{' '.join(options) or 'default':<45} epochs {times} s (wall {wall:.1f} s)")
    print(f"    {val.split('INFO ')[-1]}")
    return sum(times) / len(times), val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check_out")
    out = Path(parser.parse_args().out)
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
          f"devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
    config = build_data(out)
    _, cpu_val = train(config, out / "run_cpu", "--device", "cpu")
    if not torch.cuda.is_available():
        print("no CUDA device: only the CPU path was checked")
        return
    _, cuda_val = train(config, out / "run_cuda", "--device", "cuda")
    train(config, out / "run_cuda_ddp_amp", "--device", "cuda", "--distributed", "--mixedprec",
          "--port", "29533")
    eer = [float(re.search(r"VEER ([\d.]+)", v).group(1)) for v in (cpu_val, cuda_val)]
    print(f"EER cpu {eer[0]:.4f} vs cuda {eer[1]:.4f}: {'agree' if abs(eer[0] - eer[1]) < 0.5 else 'DIFFER'}")
    checked = subprocess.run([sys.executable, str(ROOT / "m_trainer.py"), "--config", str(config),
                              "--save_path", str(out / "run_cuda"), "--check", "--device", "cuda"],
                             capture_output=True, text=True)
    print(checked.stdout.strip().splitlines()[0] if checked.returncode == 0 else checked.stderr)


if __name__ == "__main__":
    main()
