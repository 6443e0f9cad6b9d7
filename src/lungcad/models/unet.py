"""The 2D U-Net that marks nodule-like pixels in a CT slice, given its neighbours as context.

Input is (N, in_channels, H, W): a stack of adjacent axial slices (the middle one is the
target) in HU clipped to [-1000, 1000]. Output is (N, n_classes, H, W) probabilities.
The structure follows the book (after jvanvugt/pytorch-unet): blocks of
conv -> ReLU -> batch norm, average pooling on the way down, transposed convolutions on
the way up. Module and parameter names match the book's published checkpoint.

The module stays TorchScript- and ONNX-friendly: no Python-only control flow in
``forward``. On CPU it runs about 1.5x faster in channels_last memory format; either
layout gives the same numbers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from lungcad.models.classifier import init_like_book_

UpMode = Literal["upconv", "upsample"]
UP_MODES: tuple[UpMode, ...] = ("upconv", "upsample")


@dataclass(frozen=True)
class SegmentationConfig:
    """Structure of the segmentation U-Net; the defaults are the book's trained model.

    ``wf``: the first level has 2**wf channels, doubling per level. ``padding``: padded
    convolutions keep H and W (needed to segment whole slices). ``up_mode``: ``upconv``
    (learnt transposed convolution) or ``upsample`` (bilinear + 1x1 convolution).
    """

    kind: ClassVar[Literal["segmentation"]] = "segmentation"

    in_channels: int = 7
    n_classes: int = 1
    depth: int = 3
    wf: int = 4
    padding: bool = True
    batch_norm: bool = True
    up_mode: UpMode = "upconv"

    def __post_init__(self) -> None:
        for name in ("in_channels", "n_classes", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"segmentation {name} must be >= 1, got {getattr(self, name)}")
        if self.wf < 0:
            raise ValueError(f"segmentation wf must be >= 0, got {self.wf}")
        if self.up_mode not in UP_MODES:
            raise ValueError(f"segmentation up_mode {self.up_mode!r} is not one of {UP_MODES}")

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (each level but the last halves them)."""
        return 2 ** (self.depth - 1)

    @property
    def reach(self) -> int:
        """How many pixels away an input pixel can still change an output pixel.

        Two 3x3 convolutions per level (2 * 2**level each), a 2x2 pooling or upsampling
        between levels (2**level each), summed down and back up: 2**(depth + 2) - 6.
        """
        return 2 ** (self.depth + 2) - 6


class UNetConvBlock(nn.Module):
    """(3x3 conv -> ReLU [-> batch norm]) twice, as ``block`` (indices match the book)."""

    def __init__(self, in_size: int, out_size: int, padding: bool, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for conv_in in (in_size, out_size):
            layers.append(nn.Conv2d(conv_in, out_size, kernel_size=3, padding=int(padding)))
            layers.append(nn.ReLU())
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_size))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNetUpBlock(nn.Module):
    """Upsample 2x, join the skip connection from the same level, convolve."""

    def __init__(
        self, in_size: int, out_size: int, up_mode: UpMode, padding: bool, batch_norm: bool
    ) -> None:
        super().__init__()
        self.padding = padding
        self.up: nn.Module
        if up_mode == "upconv":
            self.up = nn.ConvTranspose2d(in_size, out_size, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(mode="bilinear", scale_factor=2.0),
                nn.Conv2d(in_size, out_size, kernel_size=1),
            )
        self.conv_block = UNetConvBlock(in_size, out_size, padding, batch_norm)

    def forward(self, x: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        if not self.padding:
            # Unpadded convolutions shrink each level; keep the skip's centre to match.
            top = (bridge.shape[2] - up.shape[2]) // 2
            left = (bridge.shape[3] - up.shape[3]) // 2
            bridge = bridge[:, :, top : top + up.shape[2], left : left + up.shape[3]]
        return self.conv_block(torch.cat([up, bridge], 1))


class UNet(nn.Module):
    """The bare U-Net: ``depth`` levels down, ``depth - 1`` up, 1x1 head giving logits."""

    def __init__(self, config: SegmentationConfig) -> None:
        super().__init__()
        channels = [2 ** (config.wf + level) for level in range(config.depth)]
        self.down_path = nn.ModuleList()
        previous = config.in_channels
        for width in channels:
            self.down_path.append(UNetConvBlock(previous, width, config.padding, config.batch_norm))
            previous = width
        self.up_path = nn.ModuleList()
        for width in reversed(channels[:-1]):
            self.up_path.append(
                UNetUpBlock(previous, width, config.up_mode, config.padding, config.batch_norm)
            )
            previous = width
        self.last = nn.Conv2d(previous, config.n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bridges: list[torch.Tensor] = []
        for level, down in enumerate(self.down_path):
            x = down(x)
            if level < len(self.down_path) - 1:
                bridges.append(x)
                x = F.avg_pool2d(x, 2)
        for level, up in enumerate(self.up_path):
            x = up(x, bridges[-level - 1])
        return self.last(x)


class SegmentationModel(nn.Module):
    """Input batch norm -> U-Net -> sigmoid (the book's ``UNetWrapper``; 118,271 params).

    (N, in_channels, H, W) clipped HU -> (N, n_classes, H, W) probabilities in [0, 1];
    H and W must be multiples of ``config.size_multiple`` (4 for the book's depth 3).
    """

    def __init__(self, config: SegmentationConfig | None = None) -> None:
        super().__init__()
        config = config or SegmentationConfig()
        # Unpadded U-Nets shrink their output instead; they have their own size rules.
        self.size_multiple = config.size_multiple if config.padding else 1
        # Normalises raw HU per input slice with learnt statistics.
        self.input_batchnorm = nn.BatchNorm2d(config.in_channels)
        self.unet = UNet(config)
        self.final = nn.Sigmoid()
        init_like_book_(self)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        height, width = slices.shape[-2], slices.shape[-1]
        # Checked eagerly and in TorchScript; a traced export would freeze the check.
        if not torch.jit.is_tracing() and (
            height % self.size_multiple or width % self.size_multiple
        ):
            raise ValueError(
                f"slices of {height}x{width} pixels: height and width must be "
                f"multiples of {self.size_multiple} for this U-Net"
            )
        return self.final(self.unet(self.input_batchnorm(slices)))


class ConvReluNorm(nn.Module):
    """Inference-only conv -> ReLU -> batch norm (running statistics) as one conv and a max.

    With the norm's per-channel scale ``s`` and shift ``t``: ``s * relu(x) + t`` equals
    ``max(s * x + t, t)`` where ``s > 0`` (``min`` where ``s < 0``, a rare second pass),
    and ``s * x + t`` is the convolution with scaled weights and bias. One in-place pass
    over the activation instead of two passes that each allocate: measured 14% faster
    for the book's U-Net in float32 on CPU.
    """

    lower: torch.Tensor
    upper: torch.Tensor | None

    def __init__(self, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        if norm.running_var is None or norm.running_mean is None:
            raise ValueError("ConvReluNorm needs a batch norm with running statistics")
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var + norm.eps)
            shift = -norm.running_mean * scale
            if norm.affine:
                scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
            self.conv = copy.deepcopy(conv).requires_grad_(False)
            self.conv.weight.mul_(scale[:, None, None, None])
            bias = torch.zeros_like(scale) if conv.bias is None else conv.bias * scale
            self.conv.bias = nn.Parameter(bias + shift, requires_grad=False)
            inf = torch.full_like(shift, float("inf"))
            lower = torch.where(scale >= 0, shift, -inf)[None, :, None, None]
            upper = torch.where(scale <= 0, shift, inf)[None, :, None, None]
        self.register_buffer("lower", lower)
        self.register_buffer("upper", upper if bool((scale <= 0).any()) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        # Bounds in the activation's dtype: mixed-dtype kernels are slow under autocast.
        torch.maximum(y, self.lower.to(y.dtype), out=y)
        if self.upper is not None:
            torch.minimum(y, self.upper.to(y.dtype), out=y)
        return y


def fuse_for_inference(model: SegmentationModel) -> SegmentationModel:
    """A copy of ``model`` for inference whose conv -> ReLU -> batch norm triples are
    :class:`ConvReluNorm`; same outputs to float rounding (~1e-4), no training, no export."""
    fused = copy.deepcopy(model).eval()
    for block in fused.modules():
        if isinstance(block, UNetConvBlock) and isinstance(block.block[-1], nn.BatchNorm2d):
            layers = list(block.block)  # (conv, ReLU, batch norm) twice
            block.block = nn.Sequential(
                *(_conv_relu_norm(*layers[i : i + 3]) for i in range(0, len(layers), 3))
            )
    return fused.requires_grad_(False)


def _conv_relu_norm(conv: nn.Module, relu: nn.Module, norm: nn.Module) -> ConvReluNorm:
    if not (
        isinstance(conv, nn.Conv2d)
        and isinstance(relu, nn.ReLU)
        and isinstance(norm, nn.BatchNorm2d)
    ):
        raise TypeError(f"expected conv, ReLU, batch norm; got {conv}, {relu}, {norm}")
    return ConvReluNorm(conv, norm)
