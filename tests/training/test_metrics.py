"""Binary classification metrics against hand-counted and brute-force values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lungcad.training.metrics import binary_metrics, roc_auc


def records(labels: list[int], probs: list[float], losses: list[float] | None = None) -> dict:
    return {
        "label": torch.tensor(labels),
        "prob": torch.tensor(probs),
        "loss": torch.tensor(losses if losses is not None else [0.0] * len(labels)),
    }


def brute_force_auc(labels: list[int], scores: list[float]) -> float:
    """Fraction of (positive, negative) pairs ordered right; ties count one half."""
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for (p, lp), (n, ln) in itertools.product(zip(scores, labels, strict=True), repeat=2)
        if lp == 1 and ln == 0
    ]
    return sum(pairs) / len(pairs)


def test_hand_counted_example() -> None:
    # 3 positives (probs .9 .6 .2), 5 negatives (.7 .4 .3 .1 .05): TP 2, FN 1, FP 1, TN 4.
    metrics = binary_metrics(
        records(
            [1, 1, 1, 0, 0, 0, 0, 0],
            [0.9, 0.6, 0.2, 0.7, 0.4, 0.3, 0.1, 0.05],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        )
    )
    assert metrics["loss/all"] == pytest.approx(4.5)
    assert metrics["loss/pos"] == pytest.approx(2.0)
    assert metrics["loss/neg"] == pytest.approx(6.0)
    assert metrics["correct/all"] == pytest.approx(6 / 8)
    assert metrics["correct/pos"] == pytest.approx(2 / 3)
    assert metrics["correct/neg"] == pytest.approx(4 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    # Pairs ordered right: .9 beats 5, .6 beats 4, .2 beats 2 -> 11 of 15.
    assert metrics["auc"] == pytest.approx(11 / 15)
    assert (metrics["count/pos"], metrics["count/neg"]) == (3.0, 5.0)


def test_threshold_is_inclusive_and_f1_matches_precision_recall() -> None:
    metrics = binary_metrics(records([1, 0, 1, 0], [0.5, 0.5, 0.49, 0.1]))
    assert metrics["precision"] == pytest.approx(0.5)
    assert metrics["recall"] == pytest.approx(0.5)
    p, r = metrics["precision"], metrics["recall"]
    assert metrics["f1"] == pytest.approx(2 * p * r / (p + r))


def test_one_class_absent_gives_nan_not_errors() -> None:
    only_negatives = binary_metrics(records([0, 0, 0], [0.1, 0.7, 0.2]))
    assert math.isnan(only_negatives["auc"])
    assert math.isnan(only_negatives["recall"])
    assert math.isnan(only_negatives["loss/pos"]) and math.isnan(only_negatives["correct/pos"])
    assert only_negatives["precision"] == 0.0 and only_negatives["f1"] == 0.0
    only_positives = binary_metrics(records([1, 1], [0.2, 0.3]))
    assert math.isnan(only_positives["auc"]) and math.isnan(only_positives["precision"])
    assert only_positives["recall"] == 0.0 and only_positives["f1"] == 0.0


def test_ties_count_one_half() -> None:
    assert roc_auc(torch.tensor([1, 0]), torch.tensor([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(torch.tensor([1, 1, 0, 0]), torch.tensor([0.9, 0.4, 0.4, 0.1])) == (
        pytest.approx(brute_force_auc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1]))
    )


@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])),
        min_size=2,
        max_size=30,
    )
)
def test_auc_equals_pair_counting(pairs: list[tuple[int, float]]) -> None:
    labels = [label for label, _ in pairs]
    scores = [score for _, score in pairs]
    auc = roc_auc(torch.tensor(labels), torch.tensor(scores))
    if len(set(labels)) < 2:
        assert math.isnan(auc)
    else:
        assert auc == pytest.approx(brute_force_auc(labels, scores))
