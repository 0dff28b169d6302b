"""The network (enhancement model + loss), the trainer object and its log format (scores.txt); trial
scoring is in scoring/."""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from loss.m_Losses import CLASSIFIER_KEYS, loss_class
from m_DataLoader import EmbeddingData, Sampling
from m_utils import (
    SINGLE,
    DistContext,
    UserError,
    fault_point,
    options_taken,
    torch_save_atomic,
    unknown_name,
)
from models.m_Checkpoints import SPEAKER_PREFIX, read_checkpoint
from models.m_Models import model_class

log = logging.getLogger("m_network")

CHECKPOINT_NAME = "model{:09d}.model"
CHECKPOINT_PATTERN = re.compile(r"^model(\d{9})\.model$")
BAR_STEPS = 50  # the running loss on the epoch's progress bar is read back every this many steps


class SpeakerNet(nn.Module):
    """An enhancement model and its loss; `forward(batch)` returns (loss, accuracy).

    `options` (the trainer's options, or a few keywords in tests) go to the model and the loss
    classes by the names of their constructors' parameters."""

    def __init__(self, model: str, trainfunc: str, **options):
        super().__init__()
        model_cls, loss_cls = model_class(model), loss_class(trainfunc)
        self.model = model_cls(**options_taken(model_cls, options))
        self.loss = loss_cls(**options_taken(loss_cls, options))

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(self.model(batch.inputs), batch)

    @torch.no_grad()
    def enhance(self, x: torch.Tensor) -> torch.Tensor:
        """Enhanced embeddings, L2-normalised per vector where the loss scores them so."""
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


def make_scheduler(
    name: str, optimizer: torch.optim.Optimizer, test_interval: int, lr_decay: float, max_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
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


@dataclass(frozen=True)
class Validation:
    """What validation reports: the loss, the accuracy column (NO_ACCURACY for a loss without one,
    NaN where no sample defines it) and the loss terms no sample defined."""

    loss: float
    accuracy: float
    left_out: list[str]


def clear_gradients(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Zero the gradients before a step. On a CPU they are zeroed in place: dropping them
    (set_to_none) makes every backward pass allocate them afresh from the kernel, a page fault per
    4 KB, which costs more than the zeroing. A GPU's caching allocator has no such cost, and there
    set_to_none saves the zeroing."""
    optimizer.zero_grad(set_to_none=device.type != "cpu")


class Trainer:
    """Trains a SpeakerNet, alone or as one rank of a DistributedDataParallel group."""

    def __init__(
        self,
        net: SpeakerNet,
        device: torch.device,
        ctx: DistContext = SINGLE,
        *,
        optimizer: str = "adam",
        scheduler: str = "steplr",
        lr: float = 1e-3,
        lr_decay: float = 0.95,
        weight_decay: float = 0.0,
        test_interval: int = 5,
        max_epoch: int = 100,
        mixedprec: bool = False,
    ):
        self.net = net.to(device)
        self.device = device
        self.ctx = ctx
        self.module: nn.Module = net
        if ctx.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        self.optimizer = make_optimizer(optimizer, self.net.parameters(), lr, weight_decay)
        self.scheduler = make_scheduler(scheduler, self.optimizer, test_interval, lr_decay, max_epoch)
        self.mixedprec = mixedprec and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.mixedprec)
        self.loaded_original = False  # the last checkpoint loaded: one of the original repository

    def _autocast(self):
        if self.mixedprec:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return nullcontext()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_epoch(self, data: EmbeddingData, epoch: int, sampling: Sampling) -> float:
        """One epoch; returns the mean training loss over the samples of every process."""
        torch.manual_seed(sampling.seed + epoch)
        self.module.train()
        # Summed on the device: reading the loss back every step would stall a GPU once a step.
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        bar = tqdm(
            data.batches(epoch, sampling, self.ctx),
            desc=f"epoch {epoch}",
            unit="step",
            leave=False,
            disable=not self.ctx.is_main,
        )
        for step, batch in enumerate(bar, start=1):
            clear_gradients(self.optimizer, self.device)
            with self._autocast():
                loss, _ = self.module(batch)
            # this process's share of the global batch (1 for a whole one)
            weighted = loss if batch.weight == 1.0 else loss * batch.weight
            if self.mixedprec:
                self.scaler.scale(weighted).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                weighted.backward()
                self.optimizer.step()
            loss_sum.add_(loss.detach(), alpha=batch.size)
            count += batch.size
            if step % BAR_STEPS == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / count:.5f}")
        self.scheduler.step()
        total = self.all_reduce(torch.tensor([loss_sum.item(), count], dtype=torch.float64))
        fault_point("trainer.epoch")
        return float(total[0]) / max(float(total[1]), 1.0)

    @torch.no_grad()
    def validate(self, data: EmbeddingData, sampling: Sampling) -> Validation:
        """The loss and accuracy over a whole list, gathered across ranks. Each term of the loss is
        averaged over the samples where it is defined (a classifier's term only over speakers with a
        class); a term defined nowhere is left out of the loss and named in `left_out`."""
        self.net.eval()
        loss = self.net.loss
        sums = torch.zeros(len(loss.terms) + 1, dtype=torch.float64, device=self.device)
        counts = torch.zeros_like(sums)
        for batch in data.batches(0, replace(sampling, shuffle=False), self.ctx):
            with self._autocast():
                batch_sums, batch_counts = loss.validation_sums(self.net.model(batch.inputs), batch)
            sums += batch_sums.double()
            counts += batch_counts.double()
        totals = self.all_reduce(torch.stack([sums, counts]).cpu())
        means = [total / count if count > 0 else None for total, count in totals.T.tolist()]
        terms = dict(zip(loss.terms, means[:-1], strict=True))
        defined = [value for value in terms.values() if value is not None]
        accuracy = means[-1] if means[-1] is not None else float("nan")
        return Validation(
            loss=sum(defined) if defined else float("nan"),
            accuracy=accuracy if loss.reports_accuracy else NO_ACCURACY,
            left_out=[name for name, value in terms.items() if value is None],
        )

    @torch.no_grad()
    def enhance(self, embeddings: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        """Enhanced embeddings of every row; under DDP each rank computes a shard, all gather."""
        self.net.eval()
        parts = np.array_split(np.arange(len(embeddings)), self.ctx.world_size)
        mine = parts[self.ctx.rank]
        rows = [
            self.net.enhance(torch.as_tensor(embeddings[mine[i : i + chunk]], device=self.device)).float()
            for i in range(0, len(mine), chunk)
        ]
        local = torch.cat(rows) if rows else torch.zeros((0, embeddings.shape[1]), device=self.device)
        if not self.ctx.distributed:
            return local.cpu().numpy()
        longest = max(len(p) for p in parts)
        padded = torch.zeros((longest, local.shape[1]), device=self.device)
        padded[: len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[: len(p)] for g, p in zip(gathered, parts, strict=True)]).cpu().numpy()

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        if not self.ctx.distributed:
            return values
        on_device = values.to(self.device)
        dist.all_reduce(on_device)
        return on_device.cpu()

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, path: str | Path, epoch: int, extra: dict | None = None) -> None:
        state = {
            "epoch": epoch,
            "network": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **(extra or {}),
        }
        torch_save_atomic(state, path)

    def load(self, path: str | Path, weights_only: bool = False) -> int:
        """Restore a checkpoint and return its epoch: all of it for a resume, the network alone
        with weights_only. A checkpoint of the original repository (a bare state dict) holds the
        network alone: its optimiser and scheduler start afresh, its epoch is its file name's."""
        checkpoint = read_checkpoint(path, "checkpoint", self.device)
        self.loaded_original = "network" not in checkpoint
        if "network" in checkpoint:
            load_network(self.net, checkpoint["network"], path, checkpoint.get("options"))
        elif any(key.startswith(SPEAKER_PREFIX) for key in checkpoint):
            load_network(self.net, original_network_state(checkpoint, self.net, path), path)
            match = CHECKPOINT_PATTERN.match(Path(path).name)
            if not weights_only:
                log.info(
                    "%s: a checkpoint of the original repository; the optimiser and scheduler start afresh",
                    path,
                )
            return int(match.group(1)) if match else 0
        else:
            raise UserError(
                f"{path}: neither a checkpoint of this project (no 'network' entry) nor "
                "one of the original repository (no __S__.* weights)"
            )
        if weights_only:
            return 0
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        return int(checkpoint["epoch"])


def load_network(net: SpeakerNet, state: dict, path: str | Path, trained: dict | None = None) -> None:
    """Load a network state into `net`; a UserError naming the file (and the options it was
    trained with, where it records them) when it does not fit."""
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        hint = (
            f"it was trained with model {trained.get('model')}, loss "
            f"{trained.get('trainfunc')}, nOut {trained.get('nOut')}; "
            if trained
            else ""
        )
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"{path}: does not fit this model/loss ({hint}{detail})") from None


ORIGINAL_LAYER = re.compile(r"^__S__\.l(\d+)\.(weight|bias)$")


def original_network_state(checkpoint: dict, net: SpeakerNet, path: str | Path) -> dict[str, torch.Tensor]:
    """The network state of an original repository's checkpoint (`__S__.l1.weight`, `.bias`, ...
    and, from Softmax runs, `__L__.softmax.fc.*`): its layers l1, l2, ... in order onto the linear
    layers of `net`'s model, its classifier onto the loss' when the loss has one."""
    model_name = type(net.model).__name__
    linear = {name: module for name, module in net.model.named_modules() if isinstance(module, nn.Linear)}
    ours, dim = list(linear), next(iter(linear.values())).in_features
    theirs = sorted({int(match.group(1)) for key in checkpoint if (match := ORIGINAL_LAYER.match(key))})
    if theirs != list(range(1, len(ours) + 1)):
        raise UserError(
            f"{path}: an original checkpoint with linear layers "
            f"{', '.join(f'l{n}' for n in theirs) or 'none'}; {model_name} has {len(ours)} "
            f"(l1..l{len(ours)}): set `model` to the one it was trained with"
        )
    state = net.state_dict()
    pairs = [
        (f"{SPEAKER_PREFIX}l{number}.{part}", f"model.{name}.{part}")
        for number, name in zip(theirs, ours, strict=True)
        for part in ("weight", "bias")
    ]
    if "loss.fc.weight" in state:
        if all(key in checkpoint for key in CLASSIFIER_KEYS.values()):
            pairs += [(key, f"loss.fc.{part}") for part, key in CLASSIFIER_KEYS.items()]
        else:
            log.info("%s: holds no __L__.softmax.fc.*: the classifier starts at random", path)
    for theirs_key, our_key in pairs:
        if theirs_key not in checkpoint:
            raise UserError(f"{path}: '{theirs_key}' is missing")
        found, needed = tuple(checkpoint[theirs_key].shape), tuple(state[our_key].shape)
        if found != needed:
            raise UserError(
                f"{path}: '{theirs_key}' has shape {found}, {model_name} "
                f"(nOut {dim}) needs {needed} for {our_key}"
            )
        state[our_key] = checkpoint[theirs_key]
    unused = sorted(set(checkpoint) - {key for key, _ in pairs})
    if unused:
        log.info("%s: not used by %s + %s: %s", path, model_name, type(net.loss).__name__, ", ".join(unused))
    return state


# ----------------------------------------------------------------------------------------------
# scores.txt: the training log that m_trainer writes, one line per epoch and one per validation.
# The format is the original repository's (analysis scripts parse it), with minDCF appended to the
# validation line.

TRAIN_FIELDS = ("Epoch", "TLOSS", "LR")
VAL_PREFIX = "--Val--"
VAL_FIELDS_ORIGINAL = ("Epoch", "VLoss", "VEER", "VEER_LIBRI", "Vacc")
VAL_FIELDS = VAL_FIELDS_ORIGINAL + ("VMINDCF", "VMINDCF_LIBRI")
FIELD_FORMAT = {
    "Epoch": "d",
    "TLOSS": "f",
    "LR": "f",
    "VLoss": "f",
    "VEER": "2.4f",
    "VEER_LIBRI": "2.4f",
    "Vacc": "2.4f",
    "VMINDCF": ".4f",
    "VMINDCF_LIBRI": ".4f",
}
NO_ACCURACY = -1.0  # Vacc of a loss without accuracy, as the original repository wrote it


def score_line(values: dict[str, float], validation: bool) -> str:
    """One scores.txt line, e.g. `Epoch 3, TLOSS 0.512000, LR 0.001000`."""
    fields = VAL_FIELDS if validation else TRAIN_FIELDS
    # + 0.0 turns -0.0 into 0.0: a signed zero would read as a different value to a reader
    body = ", ".join(
        f"{key} {values[key] + (0 if key == 'Epoch' else 0.0):{FIELD_FORMAT[key]}}" for key in fields
    )
    return f"{VAL_PREFIX} {body}" if validation else body


def line_form(fields: tuple[str, ...], prefix: str = "") -> str:
    """How a line with `fields` looks, e.g. `Epoch N, TLOSS x, LR x`."""
    parts = [f"{key} {'N' if key == 'Epoch' else 'x'}" for key in fields]
    return f"{prefix}{' ' if prefix else ''}{', '.join(parts)}"


def parse_score_line(line: str) -> tuple[bool, dict[str, float]]:
    """(is a --Val-- line, its values by field); a validation line of the original repository (no
    minDCF) gets NaN minDCF. ValueError says what is wrong."""
    text = line.strip()
    validation = text.startswith(VAL_PREFIX)
    if validation:
        text = text[len(VAL_PREFIX) :]
    fields = [field.split() for field in text.split(",")]
    keys = tuple(field[0] if field else "" for field in fields)
    allowed = (VAL_FIELDS_ORIGINAL, VAL_FIELDS) if validation else (TRAIN_FIELDS,)
    if keys not in allowed or any(len(field) != 2 for field in fields):
        forms = " or ".join(repr(line_form(f, VAL_PREFIX if validation else "")) for f in allowed)
        raise ValueError(f"expected a line like {forms}")
    values = {key: _score_value(key, value) for key, value in fields}
    if validation:
        values = {key: values.get(key, float("nan")) for key in VAL_FIELDS}
    return validation, values


def _score_value(key: str, text: str) -> float:
    """A field's value: an integer for Epoch, a float (nan allowed) otherwise."""
    try:
        return float(int(text)) if key == "Epoch" else float(text)
    except ValueError:
        kind = "an integer" if key == "Epoch" else "a number"
        raise ValueError(f"{key} must be {kind}, found {text!r}") from None
