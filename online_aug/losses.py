"""Soft-target losses and label mixing.

- Soft-target cross-entropy (timm's ``SoftTargetCrossEntropy``), so Diff-Mix soft labels train directly.
- Label smoothing on soft targets: y <- (1 - eps) * y + eps / C.
- Deferred re-weighting (DRW, Cao et al. 2019) with class-balanced weights from the effective number of samples
  (Cui et al. 2019): w_c ∝ (1 - beta) / (1 - beta^n_c), normalised to mean 1.
- :class:`SoftTargetMixup`: timm's Mixup/CutMix applied to targets that are already soft (the generated labels),
  mixing them exactly as timm mixes one-hot targets.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup


def smooth(soft: torch.Tensor, eps: float) -> torch.Tensor:
    return soft if eps <= 0 else soft * (1 - eps) + eps / soft.shape[-1]


def correct_labels(target: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor, beta: float) -> torch.Tensor:
    """Soft bootstrapping (Reed et al. 2015) on the edited rows: their label becomes (1 - beta) * the policy's soft
    label + beta * the classifier's own prediction (no gradient through it), so an edit whose generator did not make
    what the label claims is pulled toward what the classifier sees. ``rows`` [B] bool; real rows are unchanged."""
    pred = torch.softmax(logits.detach().float(), -1)
    mixed = (1 - beta) * target + beta * pred
    return torch.where(rows[:, None], mixed, target)


def class_balanced_weights(class_counts: list[int], beta: float = 0.9999) -> torch.Tensor:
    n = np.maximum(np.asarray(class_counts, dtype=np.float64), 1)
    w = (1 - beta) / (1 - beta**n)
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """mean_i sum_c -y_ic log p_ic, optionally weighted per sample by sum_c y_ic w_c (DRW)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    loss = -(target * logp).sum(-1)
    if class_weight is not None:
        loss = loss * (target @ class_weight.to(target.device))
    return loss.mean()


class SoftTargetMixup(Mixup):
    """timm ``Mixup`` whose targets may already be soft [B, C]; label smoothing is left to the caller."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if target.ndim != 2:
            raise ValueError("SoftTargetMixup expects soft targets [B, C]")
        if len(x) % 2:
            raise ValueError("Mixup/CutMix need an even batch size")
        if self.mode == "elem":
            lam = self._mix_elem(x)
        elif self.mode == "pair":
            lam = self._mix_pair(x)
        else:
            lam = self._mix_batch(x)
        if np.ndim(lam) == 0:  # batch mode: a Python scalar multiplies on the device, no host-to-device copy
            lam_t = float(lam)
        else:  # elem / pair: one lambda per sample, copied without blocking the trainer's stream
            lam_np = torch.as_tensor(np.asarray(lam), dtype=target.dtype)[:, None]
            if target.device.type == "cuda":
                lam_np = lam_np.pin_memory()
            lam_t = lam_np.to(target.device, non_blocking=True)
        return x, target * lam_t + target.flip(0) * (1 - lam_t)
