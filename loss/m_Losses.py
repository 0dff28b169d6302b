"""Training objectives, chosen by name with `trainfunc:`.

Each loss is called as `loss(x, batch) -> (value, accuracy)`, x the network outputs (B, nOut) and
`batch` the m_DataLoader.Batch they came from (targets, labels, others, DA pairs). Its constructor's
parameters are its hyper-parameters, filled from the trainer's options of the same names. Class
attributes say the rest: `list_kind` (which list file it trains on), `normalize_for_test` (outputs
L2-normalised before trials are scored), `reports_accuracy` (the accuracy column means something),
`classifies` (it has a layer of nClasses speakers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m_utils import UserError, unknown_name
from models.m_Checkpoints import LOSS_PREFIX, read_checkpoint, voxceleb_trainer_state


def mean_cosine(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cosine similarity of each row of x with the same row of t."""
    return F.cosine_similarity(x, t, dim=1).mean()


def zero(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(())


class EnhancementLoss(nn.Module):
    list_kind = "normal"
    normalize_for_test = False
    reports_accuracy = False
    classifies = False
    # The parts of the loss that validation averages separately over the samples where each is
    # defined; the validation loss is their sum.
    terms: tuple[str, ...] = ("loss",)

    def validation_sums(self, x: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, counts) over this batch of each term and, last, of the accuracy: summed over
        batches (and ranks), sums / counts are the validation means."""
        value, accuracy = self(x, batch)
        size = x.new_tensor(float(batch.size))
        return torch.stack([value * size, accuracy * size]), torch.stack([size, size])


class MSE(EnhancementLoss):
    """mse(x, t)."""

    def forward(self, x, batch):
        return F.mse_loss(x, batch.targets), zero(x)


class MAE(EnhancementLoss):
    """l1(x, t)."""

    def forward(self, x, batch):
        return F.l1_loss(x, batch.targets), zero(x)


class CS(EnhancementLoss):
    """1 - mean cos(x, t)."""

    normalize_for_test = True

    def forward(self, x, batch):
        return 1 - mean_cosine(x, batch.targets), zero(x)


class MSE_CS(EnhancementLoss):
    """1 - mean cos(x, t) + mse(x, t)."""

    normalize_for_test = True

    def forward(self, x, batch):
        return 1 - mean_cosine(x, batch.targets) + F.mse_loss(x, batch.targets), zero(x)


class Softmax(EnhancementLoss):
    """A linear layer nOut -> nClasses and cross-entropy on the speaker index; accuracy in %.

    `softmax_init` names an extractor checkpoint whose `__L__.softmax.fc.*` initialise the layer
    (as the original repository did); without it the layer starts at random. Samples of a speaker without a
    class (label -1: a validation speaker unseen in training) have no cross-entropy.
    """

    reports_accuracy = True
    classifies = True
    terms: tuple[str, ...] = ("cross-entropy",)

    def __init__(self, nOut: int = 512, nClasses: int = 5994, softmax_init: str | None = None):
        super().__init__()
        self.fc = nn.Linear(nOut, nClasses)
        if softmax_init:
            self.fc.load_state_dict(classifier_from_checkpoint(softmax_init, self.fc))

    def forward(self, x, batch):
        labelled = batch.labels >= 0
        if not bool(labelled.any()):
            return zero(x), zero(x)
        logits = self.fc(x[labelled])
        labels = batch.labels[labelled]
        accuracy = (logits.argmax(dim=1) == labels).float().mean() * 100
        return F.cross_entropy(logits, labels), accuracy.detach()

    def classifier_sums(self, x: torch.Tensor, batch) -> tuple[torch.Tensor, ...]:
        """Summed cross-entropy, summed accuracy (%) and count over the labelled samples."""
        labelled = (batch.labels >= 0).to(x.dtype)
        logits = self.fc(x)
        labels = batch.labels.clamp(min=0)
        entropy = F.cross_entropy(logits, labels, reduction="none")
        correct = (logits.argmax(dim=1) == labels).to(x.dtype) * 100
        return (entropy * labelled).sum(), (correct * labelled).sum(), labelled.sum()

    def validation_sums(self, x, batch):
        entropy, correct, count = self.classifier_sums(x, batch)
        return torch.stack([entropy, correct]), torch.stack([count, count])


class MSE_Softmax(Softmax):
    """Softmax + mse(x, t)."""

    terms = ("cross-entropy", "mse")

    def forward(self, x, batch):
        value, accuracy = super().forward(x, batch)
        return value + F.mse_loss(x, batch.targets), accuracy

    def validation_sums(self, x, batch):
        entropy, correct, count = self.classifier_sums(x, batch)
        size = x.new_tensor(float(batch.size))
        return (
            torch.stack([entropy, F.mse_loss(x, batch.targets) * size, correct]),
            torch.stack([count, size, count]),
        )


class MyTriplet_CS(EnhancementLoss):
    """1 - mean cos(x, t) + mean cos(x, t_other), t_other another speaker's embedding."""

    list_kind = "triplet"
    normalize_for_test = True

    def forward(self, x, batch):
        return 1 - mean_cosine(x, batch.targets) + mean_cosine(x, batch.others), zero(x)


class DA(EnhancementLoss):
    """MMD^2 between same- and different-category pair distances, per speaker, plus 1 - mean cos.

    Pair p is rows (2p, 2p+1) of x; its distance is 1 - cos. The RBF kernel is
    exp(-(a-b)^2 / (2 sigma^2)). A speaker without both kinds of pair adds no MMD term; the MMD is
    averaged over the speakers of the batch and reported in the accuracy column.
    """

    list_kind = "distribution"
    normalize_for_test = True
    reports_accuracy = True

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.sigma = float(sigma)

    def pair_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(a, b, dim=1)

    def mmd(self, x: torch.Tensor, batch) -> torch.Tensor:
        """Mean over the batch's speakers (those with both kinds of pair) of each speaker's MMD^2.

        Written with masks over all pairs of the batch rather than a loop over speakers, so that it
        never waits for the GPU (a loop needs the speaker list and each group's size on the host).
        For pair i of speaker g: to_same_i = sum of k(d_i, d_j) over g's same-category pairs j;
        summing to_same_i / n_same_g^2 over g's same pairs gives g's mean k(S, S), and so on.
        """
        distance = self.pair_distance(x[0::2], x[1::2])
        same = batch.pair_same.to(distance.dtype)
        other = 1 - same
        group = (batch.pair_speaker[:, None] == batch.pair_speaker[None, :]).to(distance.dtype)
        kernel = torch.exp(-((distance[:, None] - distance[None, :]) ** 2) / (2 * self.sigma**2)) * group
        n_same, n_other = group @ same, group @ other
        valid = (n_same > 0) & (n_other > 0)
        n_same, n_other = n_same.clamp(min=1), n_other.clamp(min=1)
        to_same, to_other = kernel @ same, kernel @ other
        per_pair = (
            same * to_same / n_same**2
            + other * to_other / n_other**2
            - 2 * same * to_other / (n_same * n_other)
        )
        speakers = (valid.to(distance.dtype) / group.sum(dim=1)).sum().round()
        return torch.where(valid, per_pair, 0).sum() / speakers.clamp(min=1)

    def target_term(self, x: torch.Tensor, batch) -> torch.Tensor:
        return 1 - mean_cosine(x, batch.targets)

    def forward(self, x, batch):
        mmd = self.mmd(x, batch)
        return mmd + self.target_term(x, batch), mmd.detach()


class DA_MSE(DA):
    """DA with pair distance sqrt(mean((a-b)^2)) and mse(x, t) as the target term."""

    def pair_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(((a - b) ** 2).mean(dim=1))

    def target_term(self, x: torch.Tensor, batch) -> torch.Tensor:
        return F.mse_loss(x, batch.targets)


LOSSES = {cls.__name__: cls for cls in (MSE, MAE, CS, MSE_CS, Softmax, MSE_Softmax, MyTriplet_CS, DA, DA_MSE)}


def loss_class(name: str, source: str | None = None) -> type[EnhancementLoss]:
    """The loss class of `name`; an unknown name is an error saying where it was given (`source`)."""
    if name not in LOSSES:
        raise unknown_name("loss (trainfunc)", name, LOSSES, source)
    return LOSSES[name]


# The Softmax layer's tensors in a voxceleb_trainer checkpoint (and in the original repository's).
CLASSIFIER_KEYS = {part: f"{LOSS_PREFIX}softmax.fc.{part}" for part in ("weight", "bias")}


def classifier_from_checkpoint(path: str, fc: nn.Linear) -> dict[str, torch.Tensor]:
    """`__L__.softmax.fc.{weight,bias}` of an extractor checkpoint, checked against `fc`."""
    state, _ = voxceleb_trainer_state(read_checkpoint(path, "softmax_init checkpoint"))
    found = {}
    for name, key in CLASSIFIER_KEYS.items():
        expected = tuple(getattr(fc, name).shape)
        if key not in state:
            raise UserError(f"{path}: no '{key}' to initialise the Softmax layer")
        if tuple(state[key].shape) != expected:
            raise UserError(
                f"{path}: '{key}' has shape {tuple(state[key].shape)}, the Softmax "
                f"layer (nOut, nClasses) needs {expected}"
            )
        found[name] = state[key]
    return found
