"""The nodule classifier (the book's ``LunaModel``): a small 3D CNN over one candidate crop.

Input is a (N, 1, 32, 48, 48) float crop in HU clipped to [-1000, 1000], voxel order
(I, R, C). The same architecture serves two tasks, told apart by ``ClassifierConfig.kind``:
nodule vs non-nodule (``classifier``) and benign vs malignant (``malignancy``). Output
column 1 is the positive class in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

ClassifierKind = Literal["classifier", "malignancy"]
CLASSIFIER_KINDS: tuple[ClassifierKind, ...] = ("classifier", "malignancy")

_BOOK_INIT_TYPES = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


@dataclass(frozen=True)
class ClassifierConfig:
    """What a classifier checkpoint must record to rebuild its model: which task it solves."""

    kind: ClassifierKind = "classifier"

    def __post_init__(self) -> None:
        if self.kind not in CLASSIFIER_KINDS:
            raise ValueError(f"classifier kind {self.kind!r} is not one of {CLASSIFIER_KINDS}")


def init_like_book_(model: nn.Module) -> None:
    """Initialise conv/linear layers in place the way the book does (its U-Net and heads).

    Weights: Kaiming normal, fan_out, ReLU gain. Biases: the book calls
    ``normal_(bias, -bound, bound)`` with ``bound = 1/sqrt(fan_out)``, i.e. mean -bound and
    standard deviation bound; we keep that exactly so from-scratch runs start where the
    book's did. fan_out is ``weight.shape[0]`` times the kernel size, as PyTorch counts it.
    """
    for module in model.modules():
        if not isinstance(module, _BOOK_INIT_TYPES):
            continue
        weight = module.weight
        nn.init.kaiming_normal_(weight, a=0, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            fan_out = weight.shape[0] * math.prod(weight.shape[2:])
            bound = 1 / math.sqrt(fan_out)
            nn.init.normal_(module.bias, mean=-bound, std=bound)


def init_he_(model: nn.Module) -> None:
    """Kaiming normal (fan_in, ReLU gain) weights and zero biases, in place.

    Keeps the signal's scale through the eight ReLU convolutions. PyTorch's default init
    shrinks it about 2.4x per layer, so the last block's output is set by its biases, the
    probabilities start identical for every crop, and Adam's first steps (each about lr,
    whatever the gradient) push those biases until every unit is dead: on our phantoms
    the loss then stays at the class-mix entropy for whole epochs, for most seeds.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class LunaBlock(nn.Module):
    """Two 3x3x3 padded convolutions with ReLU, then 2x2x2 max pooling: halves I, R and C."""

    def __init__(self, in_channels: int, conv_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(conv_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.maxpool(x)


class LunaModel(nn.Module):
    """The book's classifier; parameter names match its published checkpoints (222,220 params).

    ``forward`` returns ``(logits, probabilities)``, each (N, 2).
    """

    def __init__(self) -> None:
        super().__init__()
        conv_channels = 8  # fixed: ClassifierConfig records no width, so files rebuild exactly
        # Normalises raw HU with learnt statistics, so callers feed clipped HU unscaled.
        self.tail_batchnorm = nn.BatchNorm3d(1)
        self.block1 = LunaBlock(1, conv_channels)
        self.block2 = LunaBlock(conv_channels, conv_channels * 2)
        self.block3 = LunaBlock(conv_channels * 2, conv_channels * 4)
        self.block4 = LunaBlock(conv_channels * 4, conv_channels * 8)
        # 32x48x48 halved four times is 2x3x3 voxels of 8*conv_channels features.
        self.head_linear = nn.Linear(conv_channels * 8 * 2 * 3 * 3, 2)
        self.head_softmax = nn.Softmax(dim=1)
        # Not ``init_like_book_``: the book's negative-mean biases left the training loss at
        # log(2) for hundreds of steps on our phantoms.
        init_he_(self)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tail_batchnorm(crops)  # (N, 1, 32, 48, 48)
        x = self.block4(self.block3(self.block2(self.block1(x))))  # (N, 64, 2, 3, 3)
        logits = self.head_linear(x.flatten(1))  # (N, 2)
        return logits, self.head_softmax(logits)
