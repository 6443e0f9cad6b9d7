"""Binary classification metrics from per-sample records (nodule classifier, malignancy).

Records are the engine's per-sample tensors: ``loss`` (N,), ``label`` (N,) 0/1 and
``prob`` (N,) the predicted probability of the positive class. A metric that a batch
cannot define (recall without positives, AUC with one class only) is NaN, never an error
or a misleading 0.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from lungcad.training.task import Records

THRESHOLD = 0.5


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN (not an error, not 0) when nothing was counted."""
    return numerator / denominator if denominator else float("nan")


def roc_auc(label: torch.Tensor, score: torch.Tensor) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U); tied scores count one half.

    NaN when either class is absent.
    """
    positive = label.bool().cpu().numpy()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score.double().cpu().numpy(), method="average")
    rank_sum = float(np.sum(ranks[positive]))
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_metrics(records: Records, threshold: float = THRESHOLD) -> dict[str, float]:
    """Loss and fraction correct over all / negative / positive samples, precision, recall,
    F1 (of the positive class at ``threshold``), ROC AUC, and the class counts."""
    label = records["label"].bool()
    loss = records["loss"]
    predicted = records["prob"] >= threshold
    correct = predicted == label
    tp = int((predicted & label).sum())
    fp = int((predicted & ~label).sum())
    fn = int((~predicted & label).sum())
    return {
        "loss/all": _mean(loss),
        "loss/neg": _mean(loss[~label]),
        "loss/pos": _mean(loss[label]),
        "correct/all": _mean(correct),
        "correct/neg": _mean(correct[~label]),
        "correct/pos": _mean(correct[label]),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        # 2TP / (2TP + FP + FN): equals 2PR / (P + R) and is 0, not NaN, before any hit.
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "auc": roc_auc(label, records["prob"]),
        "count/neg": float(int((~label).sum())),
        "count/pos": float(int(label.sum())),
    }
