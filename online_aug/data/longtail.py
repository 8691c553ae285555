"""Long-tail subsampling with the usual exponential profile (Cao et al. 2019, LDAM; Cui et al. 2019).

n_c = int(n_max * ratio^(-c / (C - 1))) for the c-th class in a (seeded) class order. The test split stays balanced.
"""

from __future__ import annotations

import numpy as np

from ..config import ConfigError


def longtail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-rank counts of the exponential profile; CIFAR-10 at ratio 100 gives 5000, 2997, ..., 50.

    Every class keeps at least one image (the tail clamp every LT benchmark applies: Diff-Mix's CUB-LT at IF 100
    has classes of 1 image), so a ratio above n_max still builds.
    """
    if imbalance_ratio < 1:
        raise ConfigError(f"data.imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * imbalance_ratio ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def class_order(num_classes: int, seed: int) -> list[int]:
    """Which class gets the c-th largest count; seed -1 keeps the natural order 0..C-1."""
    if seed < 0:
        return list(range(num_classes))
    return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]


def longtail_indices(labels: np.ndarray, num_classes: int, imbalance_ratio: float, order_seed: int,
                     rng: np.random.Generator, class_names: list[str] | None = None) -> np.ndarray:
    """Indices of a long-tail subset of ``labels`` (every class keeps >= 1 image, see :func:`longtail_counts`)."""
    labels = np.asarray(labels)
    available = np.bincount(labels, minlength=num_classes)
    if available.min() < 1:
        c = int(available.argmin())
        name = class_names[c] if class_names else str(c)
        raise ConfigError(f"class {name!r} has no image to draw the long-tail subset from; check data.root")
    n_max = int(available.min())  # the head class keeps as many as every class can supply
    counts = longtail_counts(n_max, num_classes, imbalance_ratio)
    order = class_order(num_classes, order_seed)
    keep = []
    for rank, c in enumerate(order):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, size=counts[rank], replace=False))
    return np.sort(np.concatenate(keep))
