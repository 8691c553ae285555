"""The near-duplicate feature space (8x8 grayscale in [0, 1], RMS distance) and the guard built on it.

One home for the space, because two sides measure in it and must agree: the online producer's guard
(``aug.dup_threshold``, :mod:`online_aug.augment`) and the generator diversity measurement of the SD-training wing
(:func:`online_aug.sdtrain.edit_quality.class_diversity`). A leaf module: it imports torch only.
"""

from __future__ import annotations

import torch


class NearDuplicateGuard:
    """Flags a memorising generator: the RMS distance of an edit to its nearest training image of the target class,
    in a small feature space (8x8 grayscale in [0, 1]); a near-copy has distance ~0. The bank keeps at most
    ``per_class`` images of each class."""

    SIZE = 8

    def __init__(self, images_by_class: list[torch.Tensor], threshold: float, device: torch.device):
        self.bank = [self.features(x.to(device)) for x in images_by_class]
        self.threshold = threshold

    @classmethod
    def features(cls, x: torch.Tensor) -> torch.Tensor:
        g = x.float().mean(1, keepdim=True)
        return torch.nn.functional.adaptive_avg_pool2d(g, cls.SIZE).flatten(1)

    def __call__(self, edited: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        f = self.features(edited)
        out = torch.empty(len(f), device=f.device)
        for c in target.unique().tolist():  # the producer's thread: a sync here costs the trainer nothing
            rows = target == c
            d = torch.cdist(f[rows], self.bank[c]) / self.SIZE  # L2 over 64 pixels / 8 = RMS distance
            out[rows] = d.min(1).values
        return out
