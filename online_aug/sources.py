"""Batch sources: what the trainer pulls micro-batches from.

Every source implements :class:`BatchSource` (``next(source)``, ``release(batch)``, ``close()``):

- :class:`RealSource`: real micro-batches with one-hot targets (α = 0: the baselines);
- :class:`SyncAugmentedSource`: the edit runs inside the training step (``aug.prefetch=false``; the benchmark's
  comparison point);
- :class:`~online_aug.prefetch.Prefetcher`: a background producer augments ``aug.queue_depth`` batches ahead.

:func:`build_batch_source` picks one from the config. Data flows loader → policy → generator → prefetch → trainer:
this module wires the first four; the trainer only sees a :class:`BatchSource`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from .augment import build_augmenter
from .batches import Batch, real_batch
from .config import Config
from .prefetch import Prefetcher


@runtime_checkable
class BatchSource(Protocol):
    def __next__(self) -> Batch:
        """The next micro-batch (its tensors on the training device)."""

    def release(self, batch: Batch) -> None:
        """The trainer has queued its last use of ``batch``; its buffers may be reused once that work is done."""

    def close(self) -> None:
        """Stop background work, if any (end of training, an error, or Ctrl-C)."""


class RealSource:
    """Real micro-batches with one-hot targets (the baseline, and the fallback when α = 0)."""

    def __init__(self, loader, device: torch.device, num_classes: int, start: int):
        self.it, self.device, self.num_classes, self.step = iter(loader), device, num_classes, start

    def __next__(self) -> Batch:
        x, y = next(self.it)
        b = real_batch(x, y, self.step, self.num_classes, self.device)
        self.step += 1
        return b

    def release(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


class SyncAugmentedSource:
    """The synchronous path: the edit runs inside the training step (the benchmark's comparison point)."""

    def __init__(self, loader, augment: Callable[[torch.Tensor, torch.Tensor, int], Batch], device: torch.device,
                 start: int):
        self.it, self.augment, self.device, self.step = iter(loader), augment, device, start

    def __next__(self) -> Batch:
        x, y = next(self.it)
        t0 = time.perf_counter()
        batch = self.augment(x.to(self.device, non_blocking=True), y, self.step)
        batch.stats["aug/stall_ms"] = 1000 * (time.perf_counter() - t0)  # the trainer waited for all of it
        batch.stats["aug/queue_depth"] = 0.0
        self.step += 1
        return batch

    def release(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


def build_batch_source(cfg: Config, loader, splits, device: torch.device, rank: int, start: int,
                       accum: int = 1) -> BatchSource:
    """The run's source of micro-batches, starting at micro-step ``start`` (resume)."""
    if cfg.aug.alpha <= 0:
        return RealSource(loader, device, splits.num_classes, start)
    augment = build_augmenter(cfg, splits, device, rank, accum)
    if not cfg.aug.prefetch:
        return SyncAugmentedSource(loader, augment, device, start)
    return Prefetcher(loader, augment, device, depth=cfg.aug.queue_depth, starvation=cfg.aug.starvation,
                      start=start, num_classes=splits.num_classes)
