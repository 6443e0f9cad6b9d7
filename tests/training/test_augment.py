"""Each augmentation does what it claims, on crops with a known bright blob."""

from __future__ import annotations

import math

import pytest
import torch

from lungcad.training.augment import (
    AugmentSettings,
    CropAugmentation,
    SegmentationAugmentation,
    SpatialDraw,
    draw_spatial,
    resample,
    sampling_theta,
)

SIZE = (32, 48, 48)
OFF = AugmentSettings.none()


def blob(
    center: tuple[float, ...], size: tuple[int, ...] = SIZE, sigma: float = 2.0
) -> torch.Tensor:
    """(1, 1, *size) air with a Gaussian blob of up to +1000 HU at ``center`` (voxels)."""
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij")
    distance2 = sum((axis - c) ** 2 for axis, c in zip(axes, center, strict=True))
    return (-1000 + 2000 * torch.exp(-distance2 / (2 * sigma**2)))[None, None]


def centroid(volumes: torch.Tensor) -> torch.Tensor:
    """(N, D) HU-above-air weighted centre of each sample, voxels."""
    weight = (volumes[:, 0] + 1000).clamp(min=0)
    axes = torch.meshgrid(
        *[torch.arange(n, dtype=torch.float32) for n in volumes.shape[2:]], indexing="ij"
    )
    total = weight.flatten(1).sum(1)
    return torch.stack([(weight * a).flatten(1).sum(1) / total for a in axes], dim=1)


def spread(volumes: torch.Tensor) -> torch.Tensor:
    """(N, D) weighted standard deviation of each sample's blob along each axis, voxels."""
    weight = (volumes[:, 0] + 1000).clamp(min=0)
    middle = centroid(volumes)
    axes = torch.meshgrid(
        *[torch.arange(n, dtype=torch.float32) for n in volumes.shape[2:]], indexing="ij"
    )
    total = weight.flatten(1).sum(1)
    return torch.stack(
        [
            ((weight * (a - middle[:, k, None, None, None]) ** 2).flatten(1).sum(1) / total).sqrt()
            for k, a in enumerate(axes)
        ],
        dim=1,
    )


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def warp(volumes: torch.Tensor, draw: SpatialDraw) -> torch.Tensor:
    return resample(volumes, sampling_theta(draw, tuple(volumes.shape[2:])), fill=-1000)


def explicit(
    mirror: tuple[float, ...] = (1, 1, 1),
    scale: tuple[float, ...] = (1, 1, 1),
    angle: float = 0.0,
    shift: tuple[float, ...] = (0, 0, 0),
) -> SpatialDraw:
    def row(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.float32)

    return SpatialDraw(row(mirror), row(scale), torch.tensor([angle]), row(shift))


def test_integer_shift_moves_every_voxel_exactly() -> None:
    crops = blob((12, 20, 30))
    moved = warp(crops, explicit(shift=(3, -5, 7)))
    assert torch.allclose(moved[..., 3:, :-5, 7:], crops[..., :-3, 5:, :-7], atol=1e-2)
    # What came from outside the crop is air.
    assert torch.allclose(moved[..., :3, :, :], torch.tensor(-1000.0), atol=1e-3)


def test_random_offset_moves_the_blob_by_the_drawn_voxels() -> None:
    settings = AugmentSettings(flip=False, offset=0.1, scale=0.0, rotate=False, noise_hu=0.0)
    crops = blob((14, 20, 27)).repeat(16, 1, 1, 1, 1)
    draw = draw_spatial(16, SIZE, settings, generator(3))
    moved = CropAugmentation(settings)(crops, generator(3))
    assert torch.allclose(centroid(moved) - centroid(crops), draw.shift, atol=0.05)
    limit = 0.1 * torch.tensor(SIZE, dtype=torch.float32)
    assert (draw.shift.abs() <= limit).all()
    assert (draw.shift.abs().amax(0) > 0.6 * limit).all()  # it really translates, every axis


def test_mirror_flips_the_chosen_axes() -> None:
    crops = blob((10, 15, 35))
    flipped = warp(crops, explicit(mirror=(-1, 1, -1)))
    assert torch.allclose(flipped, crops.flip(2, 4), atol=1e-2)


def test_random_flip_is_per_sample_and_per_axis() -> None:
    settings = AugmentSettings(flip=True, offset=0.0, scale=0.0, rotate=False, noise_hu=0.0)
    crops = blob((10, 15, 35)).repeat(16, 1, 1, 1, 1)
    draw = draw_spatial(16, SIZE, settings, generator(1))
    out = CropAugmentation(settings)(crops, generator(1))
    for sample, mirror in zip(out, draw.mirror, strict=True):
        axes = [k + 1 for k in range(3) if mirror[k] < 0]
        expected = crops[0].flip(axes) if axes else crops[0]
        assert torch.allclose(sample, expected, atol=1e-2)
    assert ((draw.mirror < 0).float().mean(0) - 0.5).abs().max() < 0.3


def test_rotation_by_90_degrees_maps_a_known_point() -> None:
    # Centre (row, col) = (23.5, 23.5); (+10.5, -5.5) rotates to (+5.5, +10.5).
    crops = blob((16, 34, 18))
    rotated = warp(crops, explicit(angle=math.pi / 2))
    assert torch.allclose(centroid(rotated)[0], torch.tensor([16.0, 29.0, 34.0]), atol=0.05)


def test_random_rotation_covers_all_angles_about_the_head_foot_axis() -> None:
    settings = AugmentSettings(flip=False, offset=0.0, scale=0.0, rotate=True, noise_hu=0.0)
    draw = draw_spatial(256, SIZE, settings, generator(2))
    assert draw.angle.min() < 0.2 and draw.angle.max() > 2 * math.pi - 0.2
    crops = blob((9, 30, 30)).repeat(4, 1, 1, 1, 1)
    out = CropAugmentation(settings)(crops, generator(5))
    moved = centroid(out)
    assert torch.allclose(moved[:, 0], torch.tensor(9.0), atol=0.05)  # slice index unchanged
    radius = (moved[:, 1:] - 23.5).norm(dim=1)  # distance from the axis is kept
    assert torch.allclose(radius, torch.tensor(6.5 * math.sqrt(2)), atol=0.1)


def test_scale_grows_the_blob() -> None:
    crops = blob((15.5, 23.5, 23.5), sigma=3.0)
    grown = warp(crops, explicit(scale=(1.2, 1.2, 1.2)))
    shrunk = warp(crops, explicit(scale=(0.8, 1.0, 0.8)))
    ratio_grown = spread(grown) / spread(crops)
    ratio_shrunk = spread(shrunk) / spread(crops)
    assert torch.allclose(ratio_grown, torch.tensor(1.2), atol=0.03)
    assert torch.allclose(ratio_shrunk, torch.tensor([[0.8, 1.0, 0.8]]), atol=0.03)
    draw = draw_spatial(
        512, SIZE, AugmentSettings(flip=False, offset=0, rotate=False, noise_hu=0), generator(0)
    )
    assert draw.scale.min() >= 0.8 and draw.scale.max() <= 1.2
    assert draw.scale.min() < 0.82 and draw.scale.max() > 1.18


def test_noise_has_the_requested_std() -> None:
    settings = AugmentSettings(flip=False, offset=0.0, scale=0.0, rotate=False, noise_hu=25.0)
    crops = torch.full((4, 1, *SIZE), -300.0)
    noisy = CropAugmentation(settings)(crops, generator(0))
    difference = noisy - crops
    assert abs(float(difference.std()) - 25.0) < 0.5
    assert abs(float(difference.mean())) < 0.5


def test_disabled_transforms_are_the_identity() -> None:
    crops = blob((12, 20, 30)).repeat(3, 1, 1, 1, 1)
    assert torch.equal(CropAugmentation(OFF)(crops, generator(0)), crops)
    images, masks = crops[:, :, 0], (crops[:, :, 0] > 0).float()
    out_images, out_masks = SegmentationAugmentation(OFF)(images, masks, generator(0))
    assert torch.equal(out_images, images) and torch.equal(out_masks, masks)


def test_switching_noise_off_keeps_the_spatial_draw() -> None:
    crops = blob((12, 20, 30)).repeat(3, 1, 1, 1, 1)
    quiet = AugmentSettings(noise_hu=0.0)
    with_noise = CropAugmentation(AugmentSettings())(crops, generator(4))
    without = CropAugmentation(quiet)(crops, generator(4))
    assert abs(float((with_noise - without).std()) - 25.0) < 1.0


def test_same_generator_seed_same_batch_other_seed_other_batch() -> None:
    crops = blob((12, 20, 30)).repeat(4, 1, 1, 1, 1)
    augment = CropAugmentation(AugmentSettings())
    assert torch.equal(augment(crops, generator(8)), augment(crops, generator(8)))
    assert not torch.equal(augment(crops, generator(8)), augment(crops, generator(9)))


def test_mask_stays_binary_and_moves_with_the_image() -> None:
    size = (64, 64)
    images = blob((40, 22), size=size, sigma=4.0).repeat(8, 7, 1, 1)  # (N, 7, R, C)
    masks = (images[:, 3:4] > 0).float()  # (N, 1, R, C)
    settings = AugmentSettings(noise_hu=0.0)
    out_images, out_masks = SegmentationAugmentation(settings)(images, masks, generator(6))
    assert out_masks.shape == masks.shape and out_masks.dtype == masks.dtype
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    bright = out_images[:, 3:4] > 0
    inside = out_masks > 0
    overlap = (bright & inside).sum() / (bright | inside).sum()
    assert overlap > 0.9
    assert torch.allclose(centroid(out_masks * 2000 - 1000), centroid(out_images[:, 3:4]), atol=0.5)


def test_2d_offset_moves_mask_by_the_drawn_voxels_and_bool_masks_stay_bool() -> None:
    size = (64, 64)
    settings = AugmentSettings(flip=False, offset=0.1, scale=0.0, rotate=False, noise_hu=0.0)
    images = blob((30, 36), size=size, sigma=3.0).repeat(6, 1, 1, 1)
    masks = images > 0
    draw = draw_spatial(6, size, settings, generator(12))
    _, moved = SegmentationAugmentation(settings)(images, masks, generator(12))
    assert moved.dtype == torch.bool
    before = centroid(masks.float() * 2000 - 1000)
    after = centroid(moved.float() * 2000 - 1000)
    assert torch.allclose(after - before, draw.shift, atol=0.6)


@pytest.mark.parametrize(
    "kwargs", [{"offset": -0.1}, {"offset": 1.5}, {"scale": 1.0}, {"noise_hu": -1.0}]
)
def test_out_of_range_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        AugmentSettings(**kwargs)  # type: ignore[arg-type]
