"""ResNetSE34V2 with attentive statistics pooling (voxceleb_trainer's `baseline_v2_ap.model`:
SE basic blocks [3, 4, 6, 3], filters [32, 64, 128, 256], 64 log-mels, nOut 512)."""

from __future__ import annotations

import torch
from torch import nn

from models.m_Checkpoints import SPEAKER_PREFIX, voxceleb_trainer_state
from models.m_Features import LogMelInstanceNorm

WEIGHTS_HINT = (
    "its weights come from voxceleb_trainer's released baseline_v2_ap.model "
    "(github.com/clovaai/voxceleb_trainer, pretrained model section); pass that file with "
    "--initial_model, or --random_init for untrained weights"
)


class SqueezeExcite(nn.Module):
    """Channel gating: global average -> bottleneck MLP -> sigmoid -> rescale."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class SEBasicBlock(nn.Module):
    """Two 3x3 convs (ReLU before the first BN, as voxceleb_trainer's), SE gate, residual, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(torch.relu(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)


def attention_net(channels: int, bottleneck: int = 128) -> nn.Sequential:
    """Per-channel attention weights over time: conv1d, ReLU, BN, conv1d, softmax."""
    return nn.Sequential(
        nn.Conv1d(channels, bottleneck, 1),
        nn.ReLU(),
        nn.BatchNorm1d(bottleneck),
        nn.Conv1d(bottleneck, channels, 1),
        nn.Softmax(dim=2),
    )


def attentive_stats_pool(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, C, T) with attention weights -> (B, 2C): weighted mean and standard deviation."""
    mean = torch.sum(x * weights, dim=2)
    var = torch.sum(x * x * weights, dim=2) - mean * mean
    return torch.cat([mean, var.clamp(min=1e-5).sqrt()], dim=1)


class ResNetSE34V2(nn.Module):
    """Waveform crops (B, samples) at 16 kHz -> embeddings (B, nOut)."""

    layer1: nn.Sequential  # added by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        nOut: int = 512,
        n_mels: int = 64,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        filters: tuple[int, ...] = (32, 64, 128, 256),
    ):
        super().__init__()
        self.embed_dim = nOut
        self.features = LogMelInstanceNorm(n_mels=n_mels)
        self.conv1 = nn.Conv2d(1, filters[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(filters[0])
        in_ch = filters[0]
        for index, (count, out_ch) in enumerate(zip(layers, filters, strict=True)):
            stride = 1 if index == 0 else 2
            blocks = [
                SEBasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
                for i in range(count)
            ]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_ch = out_ch
        pooled_ch = filters[-1] * (n_mels // 2 ** (len(layers) - 1))
        self.attention = attention_net(pooled_ch)
        self.fc = nn.Linear(2 * pooled_ch, nOut)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.features(wave).unsqueeze(1)
        x = self.bn1(torch.relu(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.flatten(1, 2)
        return self.fc(attentive_stats_pool(x, self.attention(x)))


FRONT_END_PREFIX = "torchfb."


def select_weights(checkpoint: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The speaker model's tensors of a voxceleb_trainer checkpoint (any of its formats): `__S__.*`
    without the front end's buffers `torchfb.*`; and what else the file holds, which is not used."""
    state, others = voxceleb_trainer_state(checkpoint)
    weights = {
        key.removeprefix(SPEAKER_PREFIX): value
        for key, value in state.items()
        if key.startswith(SPEAKER_PREFIX) and not key.startswith(SPEAKER_PREFIX + FRONT_END_PREFIX)
    }
    head = sorted({key.split(".")[0] + ".*" for key in state if not key.startswith(SPEAKER_PREFIX)})
    return weights, head + others
