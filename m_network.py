"""The network (enhancement model + loss), the trainer object, and trial scoring (EER, minDCF)."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from loss.m_Losses import get_loss
from m_DataLoader import EmbeddingData, TrialSet, l2_normalize
from m_utils import SINGLE, DistContext, UserError, torch_save_atomic, unknown_name
from models.m_Models import get_model

log = logging.getLogger("m_network")

CHECKPOINT_NAME = "model{:09d}.model"
CHECKPOINT_PATTERN = re.compile(r"^model(\d{9})\.model$")
SCORE_CHUNK = 1024


# ----------------------------------------------------------------------------------------------
# Scoring


def score_trials(embeddings: np.ndarray | torch.Tensor, left: np.ndarray, right: np.ndarray,
                 metric: str) -> np.ndarray:
    """Score trials (left[i], right[i]) between rows of `embeddings` -> float32 scores.

    metric B: -||a - b|| (L2 distance); metric C: -(1 - cos(a, b)) (cosine distance).
    A table on a GPU is scored there. On a CPU the time goes into fetching rows from memory: the
    trials are visited in order of their left row (each left row is then read from memory once,
    not once per trial), in cache-sized chunks spread over torch's intra-op threads.
    """
    if metric not in ("B", "C"):
        raise UserError(f"multiple_embedding_flag must be B or C, found {metric!r}")
    left, right = np.asarray(left, np.int64), np.asarray(right, np.int64)
    if isinstance(embeddings, torch.Tensor) and embeddings.device.type != "cpu":
        return _score_on_device(embeddings.detach().float(), left, right, metric)
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().float().numpy()
    table = np.ascontiguousarray(embeddings, np.float32)
    if metric == "C":
        table = l2_normalize(table).astype(np.float32)
    if len(left) and (min(left.min(), right.min()) < 0 or max(left.max(), right.max()) >= len(table)):
        raise UserError(f"trial rows must lie in 0..{len(table) - 1}")
    # Each row as one opaque item: take() then copies whole rows, faster than float-wise indexing.
    rows = table.view(np.dtype((np.void, table.shape[1] * table.itemsize))).reshape(-1)
    order, left = _sorted_with_order(left)
    right = right[order]
    out = np.empty(len(left), np.float32)
    starts = range(0, len(left), SCORE_CHUNK)
    threads = max(1, min(torch.get_num_threads(), len(starts)))
    # Each thread gathers into its own two buffers, allocated once: fresh memory for every chunk
    # costs a page fault per 4 KB, which took most of the time.
    buffers = np.empty((threads, 2, SCORE_CHUNK), rows.dtype)

    def score_part(part: int) -> None:
        for start in starts[part::threads]:
            stop = min(start + SCORE_CHUNK, len(left))
            # mode="clip" (rows were checked above) lets take() write straight into the buffer
            a = rows.take(left[start:stop], out=buffers[part, 0, :stop - start], mode="clip")
            b = rows.take(right[start:stop], out=buffers[part, 1, :stop - start], mode="clip")
            a, b = (x.view(np.float32).reshape(stop - start, -1) for x in (a, b))
            if metric == "B":
                a -= b
                out[start:stop] = -np.sqrt(np.einsum("ij,ij->i", a, a))
            else:
                out[start:stop] = np.einsum("ij,ij->i", a, b) - 1

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(score_part, range(threads)))
    else:
        score_part(0)
    scores = np.empty_like(out)
    scores[order] = out
    return scores


def _sorted_with_order(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, indices[order]) with `indices` (non-negative int64) sorted, stably. Index and
    position are packed into one int64 key: a plain sort of it is several times faster than argsort."""
    position_bits = max(1, (len(indices) - 1).bit_length())
    if len(indices) == 0 or int(indices.max()).bit_length() + position_bits > 62:
        order = np.argsort(indices, kind="stable")
        return order, indices[order]
    keys = np.sort((indices << position_bits) | np.arange(len(indices)))
    return keys & ((1 << position_bits) - 1), keys >> position_bits


def _score_on_device(table: torch.Tensor, left: np.ndarray, right: np.ndarray, metric: str) -> np.ndarray:
    """score_trials on the table's GPU, in chunks of about 4 MB of gathered rows each."""
    if metric == "C":
        table = nn.functional.normalize(table, dim=1)
    left_rows = torch.from_numpy(left).to(table.device)
    right_rows = torch.from_numpy(right).to(table.device)
    chunk = max(SCORE_CHUNK, 2 ** 20 // max(1, table.shape[1]))
    out = torch.empty(len(left), dtype=table.dtype, device=table.device)
    for start in range(0, len(left), chunk):
        a = table[left_rows[start:start + chunk]]
        b = table[right_rows[start:start + chunk]]
        out[start:start + len(a)] = -(a - b).norm(dim=1) if metric == "B" else (a * b).sum(dim=1) - 1
    return out.cpu().numpy()


def score_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct score as a threshold (accept score >= threshold), highest first, with the
    number of target and non-target trials accepted there. One sort serves EER and minDCF."""
    ordered, ordered_labels = _sorted_descending(np.asarray(scores), np.asarray(labels).astype(bool))
    last_of_each = np.append(np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1)
    targets = np.cumsum(ordered_labels)[last_of_each]
    return ordered[last_of_each], targets, last_of_each + 1 - targets


def _sorted_descending(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores sorted highest first, with their labels (in any order among equal scores).

    float32 scores (what score_trials gives) go through one plain sort of int64 keys: the score's
    bits mapped to an order-preserving integer, with the label as the lowest bit. That is several
    times faster than an argsort followed by two gathers."""
    if scores.dtype != np.float32 or not np.isfinite(scores).all():
        order = np.argsort(scores)[::-1]
        return scores[order], labels[order]
    bits = scores.view(np.int32).astype(np.int64)  # -0.0 lands next to +0.0; equal as floats below
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats: larger magnitude -> smaller integer
    keys = np.sort((bits << 1) | labels)[::-1]
    bits = keys >> 1
    bits ^= (bits >> 31) & 0x7FFFFFFF
    return bits.astype(np.int32).view(np.float32), (keys & 1).astype(bool)


def _eer_of_curve(thresholds: np.ndarray, targets: np.ndarray,
                  nontargets: np.ndarray) -> tuple[float, float]:
    """voxceleb_trainer's EER: on sklearn's ROC curve (whose interior points on straight runs are
    dropped, and which starts at threshold +inf), the point where |FNR - FPR| is smallest,
    EER = max(FPR, FNR)."""
    if len(thresholds) > 2:
        bends = np.logical_or(np.diff(nontargets, 2), np.diff(targets, 2))
        kept = np.flatnonzero(np.concatenate([[True], bends, [True]]))
        thresholds, targets, nontargets = thresholds[kept], targets[kept], nontargets[kept]
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.concatenate([[0], targets]) / targets[-1]
        fpr = np.concatenate([[0], nontargets]) / nontargets[-1]
    fnr = 1 - tpr
    best = int(np.nanargmin(np.abs(fnr - fpr)))
    threshold = np.inf if best == 0 else float(thresholds[best - 1])
    return float(max(fpr[best], fnr[best]) * 100), threshold


def _rates_of_curve(targets: np.ndarray, nontargets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Miss and false-alarm rates, threshold ascending; the first point accepts everything."""
    miss = np.concatenate([[0.0], 1 - targets[::-1][1:] / targets[-1], [1.0]])
    false_alarm = np.concatenate([[1.0], nontargets[::-1][1:] / nontargets[-1], [0.0]])
    return miss, false_alarm


def compute_eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """EER in % and its threshold, exactly as voxceleb_trainer computes it with sklearn's roc_curve."""
    return _eer_of_curve(*score_curve(scores, labels))


def error_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every distinct threshold (ascending); the first point accepts
    everything (miss 0, false alarm 1), the last nothing."""
    thresholds, targets, nontargets = score_curve(scores, labels)
    miss, false_alarm = _rates_of_curve(targets, nontargets)
    return miss, false_alarm, np.concatenate([[-np.inf], thresholds[::-1][1:], [np.inf]])


def min_dcf_of_rates(miss: np.ndarray, false_alarm: np.ndarray, p_target: float,
                     c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    cost = c_miss * miss * p_target + c_fa * false_alarm * (1 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def compute_min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float = 0.05,
                    c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised minimum detection cost (NIST SRE)."""
    miss, false_alarm, _ = error_rates(scores, labels)
    return min_dcf_of_rates(miss, false_alarm, p_target, c_miss, c_fa)


def evaluate_scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """EER, its threshold, and minDCF at P_target 0.05 and 0.01 (from one sort of the scores)."""
    curve = score_curve(scores, labels)
    eer, threshold = _eer_of_curve(*curve)
    miss, false_alarm = _rates_of_curve(*curve[1:])
    return {"eer": eer, "threshold": threshold,
            "mindcf": min_dcf_of_rates(miss, false_alarm, 0.05),
            "mindcf01": min_dcf_of_rates(miss, false_alarm, 0.01)}


# ----------------------------------------------------------------------------------------------
# Network


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

    def original_scores(self, trials: TrialSet, metric: str) -> np.ndarray:
        return score_trials(trials.embeddings, trials.left, trials.right, metric)

    def processed_scores(self, trials: TrialSet, metric: str) -> np.ndarray:
        return score_trials(self.enhance(trials.embeddings), trials.left, trials.right, metric)

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
