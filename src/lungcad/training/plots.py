"""Small PNG plots written into run folders (matplotlib, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from lungcad.atomic import atomic_write


def roc_points(label: torch.Tensor, score: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over every threshold, ties taken together."""
    positive = label.bool().cpu().numpy()
    values = score.double().cpu().numpy()
    order = np.argsort(-values, kind="stable")
    positive, values = positive[order], values[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(values)), len(values) - 1]
    tp = np.cumsum(positive)[last_of_tie]
    fp = np.cumsum(~positive)[last_of_tie]
    return (
        np.r_[0.0, fp / max(int((~positive).sum()), 1)],
        np.r_[0.0, tp / max(int(positive.sum()), 1)],
    )


def save_roc_plot(
    path: Path, label: torch.Tensor, curves: dict[str, torch.Tensor], title: str = ""
) -> Path:
    """One ROC curve per named score (e.g. the model and a diameter baseline), with AUCs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungcad.training.metrics import roc_auc

    figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    for name, score in curves.items():
        fpr, tpr = roc_points(label, score)
        axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(label, score):.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
