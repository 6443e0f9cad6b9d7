"""The segmentation U-Net: shapes, configurable structure, memory format, book parity."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lungcad.data.crops import clip_hu
from lungcad.data.ct import read_ct
from lungcad.models import SegmentationConfig, SegmentationModel, fuse_for_inference, load_model
from tests.conftest import shared_file

BOOK_SEGMENTER = (
    "models/dlwpt/seg_2020-01-26_19.45.12_w4d3c1-bal_1_nodupe-label_pos-d1_fn8-adam.best.state"
)


def book_forward(state: dict[str, torch.Tensor], slices: torch.Tensor) -> torch.Tensor:
    """The book's UNetWrapper (depth 3, padded, batch norm, upconv) on raw state-dict tensors."""

    def batch_norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.batch_norm(
            x,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=False,
        )

    def conv_block(x: torch.Tensor, prefix: str) -> torch.Tensor:
        for conv, norm in ((0, 2), (3, 5)):
            x = F.relu(
                F.conv2d(
                    x, state[f"{prefix}.{conv}.weight"], state[f"{prefix}.{conv}.bias"], padding=1
                )
            )
            x = batch_norm(x, f"{prefix}.{norm}")
        return x

    x = batch_norm(slices, "input_batchnorm")
    bridges = []
    for level in range(3):
        x = conv_block(x, f"unet.down_path.{level}.block")
        if level < 2:
            bridges.append(x)
            x = F.avg_pool2d(x, 2)
    for level in range(2):
        prefix = f"unet.up_path.{level}"
        x = F.conv_transpose2d(
            x, state[f"{prefix}.up.weight"], state[f"{prefix}.up.bias"], stride=2
        )
        x = conv_block(torch.cat([x, bridges[-level - 1]], 1), f"{prefix}.conv_block.block")
    return torch.sigmoid(F.conv2d(x, state["unet.last.weight"], state["unet.last.bias"]))


@pytest.fixture(scope="module")
def random_model() -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel().eval()


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 64), (2, 32, 96), (3, 4, 8)])
def test_output_keeps_slice_size_and_is_a_probability(
    random_model: SegmentationModel, batch: int, height: int, width: int
) -> None:
    with torch.no_grad():
        out = random_model(torch.randn(batch, 7, height, width))
    assert out.shape == (batch, 1, height, width)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize(("height", "width"), [(62, 64), (64, 30), (2, 4)])
def test_sizes_not_multiple_of_four_are_refused_with_the_size(
    random_model: SegmentationModel, height: int, width: int
) -> None:
    with pytest.raises(ValueError, match=f"{height}x{width}.*multiples of 4"):
        random_model(torch.randn(1, 7, height, width))


def test_parameter_count_is_the_books() -> None:
    assert sum(p.numel() for p in SegmentationModel().parameters()) == 118_271


def test_structure_follows_config() -> None:
    config = SegmentationConfig(in_channels=3, n_classes=2, depth=4, wf=2)
    model = SegmentationModel(config).eval()
    assert [len(model.unet.down_path), len(model.unet.up_path)] == [4, 3]
    assert model.state_dict()["unet.down_path.3.block.0.weight"].shape[0] == 2 ** (2 + 3)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 24, 16)).shape == (1, 2, 24, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 3, 20, 16))


def test_unpadded_upsample_variant_crops_skips_and_shrinks_output() -> None:
    config = SegmentationConfig(padding=False, batch_norm=False, up_mode="upsample")
    model = SegmentationModel(config).eval()
    # 92 -> 88 -> pool 44 -> 40 -> pool 20 -> 16 -> up 32 -> 28 -> up 56 -> 52
    with torch.no_grad():
        assert model(torch.randn(1, 7, 92, 92)).shape == (1, 1, 52, 52)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.unet.modules())


@pytest.mark.parametrize(
    ("field", "value"), [("depth", 0), ("wf", -1), ("in_channels", 0), ("up_mode", "nearest")]
)
def test_config_rejects_bad_values_naming_them(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SegmentationConfig(**{field: value})  # type: ignore[arg-type]


def test_channels_last_gives_same_output_as_contiguous(random_model: SegmentationModel) -> None:
    slices = torch.randn(2, 7, 64, 64)
    channels_last = SegmentationModel().eval()
    channels_last.load_state_dict(random_model.state_dict())
    channels_last.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with torch.no_grad():
        expected = random_model(slices)
        for layout in (torch.channels_last, torch.contiguous_format):
            actual = channels_last(slices.contiguous(memory_format=layout))
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_state_dict_names_and_shapes_match_book_checkpoint() -> None:
    book = torch.load(shared_file(BOOK_SEGMENTER), map_location="cpu", weights_only=True)
    ours = SegmentationModel().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in book["model_state"].items()
    }


@pytest.mark.slow
def test_book_weights_on_real_ct_match_reference_and_functional_forward() -> None:
    path = shared_file(BOOK_SEGMENTER)
    volume = read_ct(shared_file("data/ct/chest-ct-141-dicom")).hu
    slices = torch.from_numpy(clip_hu(volume[68:75]))[None]  # (1, 7, 512, 512) HU
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    model = load_model(path)  # channels_last, for CPU speed
    with torch.no_grad():
        out = model(slices)
        expected = book_forward(state, slices)
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        contiguous_out = model(slices)
    # MEASUREMENTS.md: the book's own code on this stack.
    assert out.sum().item() == pytest.approx(2361.3233, rel=1e-5)
    assert out.max().item() == pytest.approx(1.0, abs=1e-6)
    assert abs(int((out > 0.5).sum()) - 2369) <= 2
    # Same arithmetic as the book in the same layout; channels_last only reorders sums.
    torch.testing.assert_close(contiguous_out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def trained_looking(config: SegmentationConfig) -> SegmentationModel:
    """A random U-Net whose batch norms have non-trivial statistics, some scales negative."""
    torch.manual_seed(1)
    model = SegmentationModel(config).eval()
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.running_mean.uniform_(-1, 1)
                norm.running_var.uniform_(0.5, 2)
                norm.weight.uniform_(-1, 2)
                norm.weight[0] = 0.0  # a dead channel: constant output
                norm.bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("config", [SegmentationConfig(), SegmentationConfig(depth=2, wf=2)])
def test_fused_model_gives_the_same_probabilities(config: SegmentationConfig) -> None:
    model = trained_looking(config).double()  # float64: only the algebra can differ
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.unet.modules())
    slices = torch.randn(2, 7, 32, 48, dtype=torch.float64) * 400
    with torch.no_grad():
        torch.testing.assert_close(fused(slices), model(slices), atol=1e-12, rtol=0)
    assert all(isinstance(m, torch.nn.BatchNorm2d) for m in model.unet.down_path[0].block[2::3])


def test_fusing_leaves_a_model_without_batch_norm_alone() -> None:
    model = SegmentationModel(SegmentationConfig(depth=2, wf=2, batch_norm=False)).eval()
    slices = torch.randn(1, 7, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fuse_for_inference(model)(slices), model(slices))


@pytest.mark.parametrize("depth", [2, 3])
def test_reach_bounds_how_far_a_pixel_changes_the_output(depth: int) -> None:
    config = SegmentationConfig(depth=depth, wf=2)
    model = trained_looking(config)
    size = 4 * config.reach + 8
    slices = torch.randn(1, 7, size, size) * 400
    changed = slices.clone()
    centre = size // 2
    changed[..., centre, centre] += 1000.0
    with torch.no_grad():
        moved = (model(changed) - model(slices)).abs()[0, 0] > 0
    rows, cols = torch.nonzero(moved, as_tuple=True)
    distance = torch.maximum((rows - centre).abs(), (cols - centre).abs())
    assert 0 < int(distance.max()) <= config.reach
