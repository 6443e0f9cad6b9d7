"""The nodule classifier: the book's structure, its init, and parity with its published weights."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lungcad.models import ClassifierConfig, LunaModel, load_model, load_model_with_info
from lungcad.models.classifier import init_like_book_
from tests.conftest import shared_file

BOOK_CLASSIFIER = "models/dlwpt/cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"
VAL_EXAMPLE = "models/dlwpt/cls_val_example.pt"
REFERENCE_LOGITS = [8.665877342224121, -10.436964988708496]  # MEASUREMENTS.md


def book_forward(state: dict[str, torch.Tensor], crops: torch.Tensor) -> torch.Tensor:
    """The book's LunaModel forward pass written out on the raw state-dict tensors."""
    x = F.batch_norm(
        crops,
        state["tail_batchnorm.running_mean"],
        state["tail_batchnorm.running_var"],
        state["tail_batchnorm.weight"],
        state["tail_batchnorm.bias"],
        training=False,
        eps=1e-5,
    )
    for block in ("block1", "block2", "block3", "block4"):
        for conv in ("conv1", "conv2"):
            weight, bias = state[f"{block}.{conv}.weight"], state[f"{block}.{conv}.bias"]
            x = F.relu(F.conv3d(x, weight, bias, padding=1))
        x = F.max_pool3d(x, kernel_size=2, stride=2)
    return F.linear(
        x.reshape(x.shape[0], -1), state["head_linear.weight"], state["head_linear.bias"]
    )


def test_forward_gives_logits_and_softmax_per_crop() -> None:
    torch.manual_seed(0)
    model = LunaModel().eval()
    with torch.no_grad():
        logits, probabilities = model(torch.randn(3, 1, 32, 48, 48))
    assert logits.shape == probabilities.shape == (3, 2)
    torch.testing.assert_close(probabilities, torch.softmax(logits, dim=1))


def test_parameter_count_is_the_books() -> None:
    assert sum(p.numel() for p in LunaModel().parameters()) == 222_220


def test_default_init_is_he_and_keeps_the_signal_to_the_head() -> None:
    torch.manual_seed(0)
    model = LunaModel()
    for conv, fan_in in ((model.block1.conv1, 27), (model.block4.conv2, 64 * 27)):
        assert abs(conv.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.05
        assert not conv.bias.any()
    # Different crops must get different probabilities before any training; with PyTorch's
    # default init the last block's output is bias-dominated and they agree to ~1e-3.
    crops = torch.randint(-1000, 1000, (16, 1, 32, 48, 48)).float()
    with torch.no_grad():
        _, probs = model.train()(crops)
    assert probs[:, 1].std() > 0.01


def test_book_init_is_kaiming_normal_fan_out_with_negative_biases() -> None:
    torch.manual_seed(0)
    model = LunaModel()
    init_like_book_(model)
    conv = model.block4.conv2
    expected_std = (2 / (64 * 27)) ** 0.5  # fan_out = 64 * 27
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    assert conv.bias.mean().item() < 0


def test_init_is_deterministic_given_seed() -> None:
    torch.manual_seed(7)
    first = LunaModel().state_dict()
    torch.manual_seed(7)
    second = LunaModel().state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_channels_last_3d_gives_same_output() -> None:
    torch.manual_seed(0)
    model = LunaModel().eval()
    crops = torch.randn(2, 1, 32, 48, 48)
    with torch.no_grad():
        expected = model(crops)[0]
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        actual = model(crops.contiguous(memory_format=torch.channels_last_3d))[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["detector", "nodule", ""])
def test_config_rejects_unknown_kind(kind: str) -> None:
    with pytest.raises(ValueError, match=repr(kind)):
        ClassifierConfig(kind=kind)  # type: ignore[arg-type]


def test_state_dict_names_and_shapes_match_book_checkpoint() -> None:
    book = torch.load(shared_file(BOOK_CLASSIFIER), map_location="cpu", weights_only=True)
    ours = LunaModel().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in book["model_state"].items()
    }


def test_book_weights_match_functional_forward_and_reference_logits() -> None:
    path = shared_file(BOOK_CLASSIFIER)
    crop, label, _series_uid, _center_irc = torch.load(
        shared_file(VAL_EXAMPLE), map_location="cpu", weights_only=True
    )
    crops = crop[None]  # (1, 32, 48, 48) -> (1, 1, 32, 48, 48)
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    model = load_model(path)
    with torch.no_grad():
        logits, probabilities = model(crops)
        expected_logits = book_forward(state, crops)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probabilities, torch.softmax(expected_logits, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0], torch.tensor(REFERENCE_LOGITS), atol=1e-4, rtol=0)
    assert int(probabilities.argmax(1)) == int(label.argmax())  # labelled [not_nodule, nodule]


def test_book_classifier_file_serves_as_malignancy_model_when_asked() -> None:
    path = shared_file(BOOK_CLASSIFIER)
    assert load_model_with_info(path).kind == "classifier"
    loaded = load_model_with_info(path, kind="malignancy")
    assert loaded.kind == "malignancy"
    assert loaded.config == ClassifierConfig(kind="malignancy")
    assert isinstance(loaded.model, LunaModel)
