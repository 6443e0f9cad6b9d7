"""Batched augmentation on the training device, drawn from the step's generator.

The book augmented one crop at a time inside the Dataset, on the CPU workers, and its
offset never moved anything (the shift landed in the matrix row that ``affine_grid``
drops). Here a whole batch is transformed at once where the model runs, after the cache,
and nothing augmented is ever stored.

One affine machinery serves both models. Each sample gets a random transform built in
voxel units about the crop centre: mirror per axis, shift by up to ``offset`` x the size
per axis, magnify by a factor in [1 - scale, 1 + scale] per axis, and rotate by any angle
in the (row, col) plane, i.e. about the head-foot axis for a 3D (I, R, C) crop and in
plane for a 2D (R, C) slice. ``affine_grid`` + ``grid_sample`` resample it (outside the
input reads as air, -1000 HU), then Gaussian noise in HU is added. Every random number
comes from the given ``torch.Generator``, and all of them are drawn whether or not a part
is switched on, so turning one part off never changes what the others draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lungcad.data.ct import HU_AIR


@dataclass(frozen=True)
class AugmentSettings:
    """Which transforms run and how strong; zero / False switches a part off.

    ``offset``: largest shift as a fraction of the size along each axis (0.1 of 48 voxels is
    4.8 voxels). ``scale``: content magnified by a factor drawn from [1 - scale, 1 + scale]
    per axis. ``rotate``: any angle about the head-foot axis. ``noise_hu``: standard
    deviation of the added Gaussian noise, HU.
    """

    flip: bool = True
    offset: float = 0.1
    scale: float = 0.2
    rotate: bool = True
    noise_hu: float = 25.0

    def __post_init__(self) -> None:
        if not 0 <= self.offset <= 1 or not 0 <= self.scale < 1 or self.noise_hu < 0:
            raise ValueError(
                f"augmentation offset {self.offset} (0..1), scale {self.scale} (0..<1) and "
                f"noise {self.noise_hu} HU (>= 0) out of range"
            )

    @property
    def spatial(self) -> bool:
        """Whether any part moves voxels (otherwise resampling is skipped: exact identity)."""
        return self.flip or self.offset > 0 or self.scale > 0 or self.rotate

    @classmethod
    def none(cls) -> AugmentSettings:
        return cls(flip=False, offset=0.0, scale=0.0, rotate=False, noise_hu=0.0)


@dataclass(frozen=True)
class SegmentationAugmentSettings(AugmentSettings):
    """The book's segmentation values: a smaller shift (0.03), the crop is already random."""

    offset: float = 0.03


@dataclass(frozen=True)
class ClassifierAugmentSettings(AugmentSettings):
    """Half the book's shift for nodule / non-nodule crops. Candidates lie as close as 2 mm
    outside a nodule; shifted 0.1 x 48 voxels (~4.5 mm), a small nodule's view is one of
    those negatives, and the model learns to flag them: 13 of the 33 validation false
    positives on our phantoms sat 2-5 mm off a nodule's edge at 0.1, none at 0.05."""

    offset: float = 0.05


@dataclass(frozen=True)
class SpatialDraw:
    """One random transform per sample, in voxel units, axes in array order ((I,) R, C).

    A point ``p`` (voxels from the crop centre) moves to ``rotate(scale * mirror * p) +
    shift``; the rotation turns (row, col) = (r, c) into (r cos a - c sin a, r sin a + c cos a).
    """

    mirror: torch.Tensor  # (N, D) +1 or -1
    scale: torch.Tensor  # (N, D) magnification
    angle: torch.Tensor  # (N,) radians
    shift: torch.Tensor  # (N, D) voxels


def draw_spatial(
    n: int,
    size: tuple[int, ...],
    settings: AugmentSettings,
    generator: torch.Generator,
) -> SpatialDraw:
    """Random transforms for ``n`` samples of spatial ``size`` on the generator's device."""
    device = generator.device
    dims = len(size)

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
        return 2 * torch.rand(shape, generator=generator, device=device) - 1

    flip_draw, offset_draw, scale_draw = uniform(n, dims), uniform(n, dims), uniform(n, dims)
    angle_draw = torch.rand(n, generator=generator, device=device) * 2 * math.pi
    extent = torch.tensor(size, dtype=torch.float32, device=device)
    mirror = torch.where(flip_draw < 0, -1.0, 1.0) if settings.flip else torch.ones_like(flip_draw)
    return SpatialDraw(
        mirror=mirror,
        scale=1 + settings.scale * scale_draw,
        angle=angle_draw if settings.rotate else torch.zeros_like(angle_draw),
        shift=settings.offset * offset_draw * extent,
    )


def sampling_theta(draw: SpatialDraw, size: tuple[int, ...]) -> torch.Tensor:
    """The (N, D, D+1) matrices ``affine_grid`` needs: output -> input, normalised, (x, y, z).

    ``affine_grid`` asks where each output voxel reads from, so we invert the forward
    transform: ``p_in = M^-1 S^-1 R^T (p_out - shift)``. With ``align_corners=False`` one
    voxel along an axis of n voxels is 2/n normalised units, hence the ``half`` rescaling.
    """
    n, dims = draw.mirror.shape
    device = draw.mirror.device
    rotation_t = torch.eye(dims, device=device).repeat(n, 1, 1)  # (N, D, D), R transposed
    cos, sin = torch.cos(draw.angle), torch.sin(draw.angle)
    row, col = dims - 2, dims - 1
    rotation_t[:, row, row], rotation_t[:, row, col] = cos, sin
    rotation_t[:, col, row], rotation_t[:, col, col] = -sin, cos
    inverse = (draw.mirror / draw.scale)[:, :, None] * rotation_t  # M^-1 S^-1 R^T
    half = torch.tensor(size, dtype=torch.float32, device=device) / 2  # voxels per unit
    linear = inverse * half[None, None, :] / half[None, :, None]  # normalised units
    translation = -(inverse @ draw.shift[:, :, None])[..., 0] / half  # (N, D)
    # Array order ((I,) R, C) -> grid order (x=C, y=R(, z=I)): reverse both axes.
    return torch.cat([linear.flip(1, 2), translation.flip(1)[:, :, None]], dim=2)


def resample(
    volumes: torch.Tensor, theta: torch.Tensor, fill: float, mode: str = "bilinear"
) -> torch.Tensor:
    """Warp (N, C, *size) by ``theta``; voxels from outside the input read as ``fill``."""
    grid = F.affine_grid(theta.to(volumes.dtype), list(volumes.shape), align_corners=False)
    # grid_sample pads with zeros, so shift the values to make ``fill`` the zero.
    warped = F.grid_sample(
        volumes - fill, grid, mode=mode, padding_mode="zeros", align_corners=False
    )
    return warped + fill


def add_noise(images: torch.Tensor, std_hu: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of ``std_hu`` HU on every voxel (drawn last, so skipping it is safe)."""
    if std_hu <= 0:
        return images
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return images + std_hu * noise


class CropAugmentation(nn.Module):
    """Augments a batch of 3D crops: float HU (N, 1, I, R, C) -> same shape."""

    def __init__(self, settings: AugmentSettings) -> None:
        super().__init__()
        self.settings = settings

    def forward(self, crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        size = tuple(crops.shape[2:])
        draw = draw_spatial(crops.shape[0], size, self.settings, generator)
        if self.settings.spatial:
            crops = resample(crops, sampling_theta(draw, size), fill=HU_AIR)
        return add_noise(crops, self.settings.noise_hu, generator)


class SegmentationAugmentation(nn.Module):
    """Augments 2D slices and their masks together.

    images: float HU (N, C, R, C); masks: (N, 1, R, C) of 0/1 (float or bool). Both get the
    same transform; the mask is resampled bilinearly and cut at 0.5, so it stays binary
    and keeps its dtype. Noise goes on the images only.
    """

    def __init__(self, settings: AugmentSettings) -> None:
        super().__init__()
        self.settings = settings

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = tuple(images.shape[2:])
        draw = draw_spatial(images.shape[0], size, self.settings, generator)
        if self.settings.spatial:
            theta = sampling_theta(draw, size)
            images = resample(images, theta, fill=HU_AIR)
            warped = resample(masks.to(images.dtype), theta, fill=0.0)
            masks = (warped > 0.5).to(masks.dtype)
        return add_noise(images, self.settings.noise_hu, generator), masks
