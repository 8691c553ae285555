"""Real batches: a deterministic, resumable, rank-sharded stream of micro-batches.

The order of epoch e is a permutation seeded by (seed, e); each rank takes every world_size-th micro-batch of it.
Resuming at micro-step k skips k batches by index arithmetic, without loading an image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite batches of indices for one rank, starting at micro-step ``start``."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0):
        if n < batch_size * world_size:
            raise ValueError(f"the training split has {n} images, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks); lower train.batch_size")
        self.n, self.bs, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world_size, seed, start
        self.per_epoch = n // (batch_size * world_size)  # drop the ragged tail so ranks stay in lockstep

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            epoch, k = divmod(step, self.per_epoch)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            lo = (k * self.world + self.rank) * self.bs
            yield perm[lo:lo + self.bs].tolist()
            step += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs this for len(), which we never call
        return 2**62


@dataclass
class Batch:
    """A micro-batch as the trainer consumes it."""

    images: torch.Tensor  # [B, 3, H, W] in [0, 1], on the training device
    targets: torch.Tensor  # [B, C] soft labels, on the training device
    labels: torch.Tensor  # [B] the real (source) classes, on CPU
    step: int  # the micro-step this batch belongs to
    stats: dict[str, float]  # aug/* scalars of this batch
    examples: dict | None = None  # source/edited examples for the image grid, when due
    ready: object | None = None  # a CUDA event the consumer waits on before touching the tensors
    slot: int = -1  # CUDA ring slot holding the tensors (see prefetch.py)


def real_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, start: int,
                num_workers: int) -> DataLoader:
    sampler = ResumableBatchSampler(len(dataset), batch_size, rank, world_size, seed, start)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
