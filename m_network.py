"""The network (enhancement model + loss) and the trainer object; trial scoring is in m_scoring."""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from loss.m_Losses import get_loss
from m_DataLoader import EmbeddingData, TrialSet
from m_scoring import score_trials
from m_utils import SINGLE, DistContext, UserError, torch_save_atomic, unknown_name
from models.m_Models import get_model

log = logging.getLogger("m_network")

CHECKPOINT_NAME = "model{:09d}.model"
CHECKPOINT_PATTERN = re.compile(r"^model(\d{9})\.model$")



class SpeakerNet(nn.Module):
    """An enhancement model and its loss; `forward(batch)` returns (loss, accuracy)."""

    def __init__(self, model: str, trainfunc: str, **kwargs):
        super().__init__()
        self.model = get_model(model, **kwargs)
        self.loss = get_loss(trainfunc, **kwargs)

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(self.model(batch.inputs), batch)

    @torch.no_grad()
    def enhance(self, x: torch.Tensor) -> torch.Tensor:
        """Processed embeddings, L2-normalised per vector where the loss scores them so."""
        out = self.model(x)
        return nn.functional.normalize(out, dim=1) if self.loss.normalize_for_test else out


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULERS = ("steplr", "cosine", "none")


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise unknown_name("optimizer", name, OPTIMIZERS)
    # The fused Adam kernels (CPU and CUDA) update every parameter in one pass: faster, and without
    # the foreach path's temporary copy of the optimiser state at each step.
    extra = {"momentum": 0.9} if name == "sgd" else {"fused": True}
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, **extra)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, test_interval: int,
                   lr_decay: float, max_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch. steplr: x lr_decay every test_interval epochs."""
    if name == "steplr":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=test_interval, gamma=lr_decay)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epoch)
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    raise unknown_name("scheduler", name, SCHEDULERS)


def checkpoints(model_dir: str | Path) -> dict[int, Path]:
    """Complete checkpoints in `model_dir` by epoch (temporary files never match)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {}
    found = {}
    for path in model_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(Path(path), map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as err:
        raise UserError(f"{path}: not a readable checkpoint, truncated or foreign "
                        f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a checkpoint of this project")
    return state


def clear_gradients(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Zero the gradients before a step. On a CPU they are zeroed in place: dropping them
    (set_to_none) makes every backward pass allocate them afresh, a page fault per 4 KB (9,000 a
    step for MyLinearNetv2), which costs more than the zeroing. A GPU's caching allocator has no
    such cost, and there set_to_none saves the zeroing."""
    optimizer.zero_grad(set_to_none=device.type != "cpu")


class Trainer:
    """Trains a SpeakerNet, alone or as one rank of a DistributedDataParallel group."""

    def __init__(self, net: SpeakerNet, device: torch.device, ctx: DistContext = SINGLE, *,
                 optimizer: str = "adam", scheduler: str = "steplr", lr: float = 1e-3,
                 lr_decay: float = 0.95, weight_decay: float = 0.0, test_interval: int = 5,
                 max_epoch: int = 100, mixedprec: bool = False):
        self.net = net.to(device)
        self.device = device
        self.ctx = ctx
        self.module = net
        if ctx.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        self.optimizer = make_optimizer(optimizer, self.net.parameters(), lr, weight_decay)
        self.scheduler = make_scheduler(scheduler, self.optimizer, test_interval, lr_decay,
                                        max_epoch)
        self.mixedprec = mixedprec and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.mixedprec)

    def _autocast(self):
        if self.mixedprec:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return nullcontext()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_epoch(self, data: EmbeddingData, epoch: int, batch_size: int, seed: int,
                    **sampling) -> float:
        """One epoch; returns the mean training loss over this rank's samples (all ranks)."""
        torch.manual_seed(seed + epoch)
        self.module.train()
        # Summed on the device: reading the loss back every step would stall a GPU once per batch.
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for batch in data.epoch(batch_size, seed, epoch, self.ctx, **sampling):
            clear_gradients(self.optimizer, self.device)
            with self._autocast():
                loss, _ = self.module(batch)
            self.scaler.scale(loss * batch.weight).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach().double() * batch.size
            count += batch.size
        self.scheduler.step()
        total = self.all_reduce(torch.tensor([loss_sum.item(), count], dtype=torch.float64))
        return float(total[0] / max(total[1], 1))

    @torch.no_grad()
    def validate(self, data: EmbeddingData, batch_size: int, seed: int,
                 **sampling) -> tuple[float, float]:
        """Mean loss and accuracy over a whole list, gathered across ranks."""
        self.net.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        sampling = {**sampling, "shuffle": False}
        for batch in data.epoch(batch_size, seed, 0, self.ctx, **sampling):
            with self._autocast():
                loss, accuracy = self.net(batch)
            sums += torch.stack([loss.double(), accuracy.double(),
                                 torch.ones((), dtype=torch.float64, device=self.device)]) * batch.size
        sums = self.all_reduce(sums.cpu())
        return float(sums[0] / max(sums[2], 1)), float(sums[1] / max(sums[2], 1))

    @torch.no_grad()
    def enhance(self, embeddings: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        """Processed embeddings of every row; under DDP each rank computes a shard, all gather."""
        self.net.eval()
        parts = np.array_split(np.arange(len(embeddings)), self.ctx.world_size)
        mine = parts[self.ctx.rank]
        rows = [self.net.enhance(torch.as_tensor(embeddings[mine[i:i + chunk]], device=self.device))
                .float() for i in range(0, len(mine), chunk)]
        local = torch.cat(rows) if rows else torch.zeros((0, embeddings.shape[1]), device=self.device)
        if not self.ctx.distributed:
            return local.cpu().numpy()
        longest = max(len(p) for p in parts)
        padded = torch.zeros((longest, local.shape[1]), device=self.device)
        padded[:len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[:len(p)] for g, p in zip(gathered, parts, strict=True)]).cpu().numpy()

    def original_scores(self, trials: TrialSet, embedding_type: str) -> np.ndarray:
        return score_trials(trials.embeddings, trials.left, trials.right, embedding_type)

    def processed_scores(self, trials: TrialSet, embedding_type: str) -> np.ndarray:
        return score_trials(self.enhance(trials.embeddings), trials.left, trials.right, embedding_type)

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        if not self.ctx.distributed:
            return values
        on_device = values.to(self.device)
        dist.all_reduce(on_device)
        return on_device.cpu()

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, path: str | Path, epoch: int, extra: dict | None = None) -> None:
        state = {"epoch": epoch, "network": self.net.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), **(extra or {})}
        torch_save_atomic(state, path)

    def load(self, path: str | Path, weights_only: bool = False) -> int:
        """Restore a checkpoint; all of it for a resume, the network alone with weights_only."""
        state = read_checkpoint(path, self.device)
        if "network" not in state:
            raise UserError(f"{path}: not a checkpoint of this project (no 'network' entry)")
        try:
            self.net.load_state_dict(state["network"])
        except RuntimeError as err:
            trained = state.get("options", {})
            hint = (f"it was trained with model {trained.get('model')}, loss "
                    f"{trained.get('trainfunc')}, nOut {trained.get('nOut')}; " if trained else "")
            detail = " ".join(str(err).split())[:300]
            raise UserError(f"{path}: does not fit this model/loss ({hint}{detail})") from None
        if weights_only:
            return 0
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return int(state["epoch"])
