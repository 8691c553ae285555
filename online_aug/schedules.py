"""Learning-rate schedules, as factors of the base rate (what ``torch.optim.lr_scheduler.LambdaLR`` multiplies by)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at step ``total``.

    ``min_ratio=1`` is a warm-up followed by a constant rate, which is what a run that may be resumed to a larger
    ``total`` needs (the factor of a step does not depend on ``total``).
    """
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
