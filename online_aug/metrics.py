"""Classification metrics for long-tail evaluation: top-1, balanced accuracy, per-class and many/medium/few-shot.

Shot groups follow the usual long-tail convention (Liu et al. 2019, OLTR): many-shot classes have more than
``many_threshold`` training images, few-shot fewer than ``few_threshold``, medium the rest. An empty group is
reported as NaN ("n/a"), never as a division by zero.
"""

from __future__ import annotations

import math

import numpy as np


def shot_groups(train_counts: list[int], many_threshold: int, few_threshold: int) -> dict[str, list[int]]:
    """Class indices per group: many (> many_threshold), few (< few_threshold), medium (the rest)."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        key = "many" if n > many_threshold else "few" if n < few_threshold else "medium"
        groups[key].append(c)
    return groups


def classification_metrics(preds: np.ndarray, labels: np.ndarray, train_counts: list[int], many_threshold: int,
                           few_threshold: int) -> dict[str, float]:
    """Top-1, balanced accuracy, group accuracies (mean of per-class accuracy in the group), per-class accuracy.

    Classes absent from the evaluation set get NaN and are left out of the averages.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    num_classes = len(train_counts)
    correct = preds == labels
    out: dict[str, float] = {"top1": float(correct.mean()) if len(labels) else math.nan}
    per_class = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            per_class[c] = correct[mask].mean()
    out["balanced_acc"] = _nanmean(per_class)
    for name, classes in shot_groups(train_counts, many_threshold, few_threshold).items():
        out[f"acc_{name}"] = _nanmean(per_class[classes]) if classes else math.nan
    for c in range(num_classes):
        out[f"class_acc/{c}"] = float(per_class[c])
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def fmt(v: float) -> str:
    """Format a metric for tables: n/a for NaN."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"
