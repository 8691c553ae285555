"""What a batch is, and how real ones are drawn: the loader stage of loader → policy → generator → prefetch → trainer.

- :class:`Batch`: a micro-batch as the trainer consumes it, with its ``aug/*`` statistics (their names and how an
  interval of them is reduced live here, once: :data:`AUG_STATS`, :func:`reduce_stats`).
- :class:`ResumableBatchSampler` / :func:`real_loader`: a deterministic, resumable, rank-sharded stream of real
  micro-batches. The order of epoch e is a permutation seeded by (seed, e); each rank takes every world_size-th
  micro-batch of it. Resuming at micro-step k skips k batches by index arithmetic, without loading an image.
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


# aug/* scalars every augmented batch carries (TensorBoard tags; README "TensorBoard tags"). COUNTERS are summed over
# a log interval (edits dropped), the rest are per-batch means.
AUG_STATS = ("aug/effective_alpha", "aug/nonfinite_dropped", "aug/filtered", "aug/gen_ms", "aug/stall_ms",
             "aug/queue_depth", "aug/nn_dist", "aug/near_dup", "aug/producer_fault", "aug/fresh_edits",
             "aug/reused_edits", "aug/unsafe_resampled", "aug/unsafe_dropped")
COUNTERS = frozenset({"aug/nonfinite_dropped", "aug/filtered", "aug/unsafe_resampled", "aug/unsafe_dropped"})


def no_edit_stats() -> dict[str, float]:
    """The statistics of a batch that trained on no edit (α = 0 in effect)."""
    return {"aug/effective_alpha": 0.0, "aug/nonfinite_dropped": 0.0, "aug/filtered": 0.0, "aug/gen_ms": 0.0}


def reduce_stats(acc: dict[str, float], n: int) -> dict[str, float]:
    """Sums of ``n`` batches' stats → per-batch means, except :data:`COUNTERS`, which stay sums."""
    return {k: float(v) if k in COUNTERS else float(v) / max(1, n) for k, v in acc.items()}


@dataclass
class Batch:
    """A micro-batch as the trainer consumes it."""

    images: torch.Tensor  # [B, 3, H, W] in [0, 1], on the training device
    targets: torch.Tensor  # [B, C] soft labels, on the training device
    labels: torch.Tensor  # [B] the real (source) classes, on CPU
    micro_step: int  # the micro-step this batch belongs to (optimizer step = micro_step // accumulation)
    stats: dict[str, float]  # aug/* scalars of this batch
    examples: dict | None = None  # source/edited examples for the image grid, when due
    ready: object | None = None  # a CUDA event the consumer waits on before touching the tensors
    slot: int = -1  # CUDA ring slot holding the tensors (see prefetch.py)
    edit_target: torch.Tensor | None = None  # [B] long on the device: an edit's target class, -1 for a real row
    # ssl.source: the unlabelled rows' weak and strong views [U, 3, H, W] on the device (online_aug/unlabelled.py)
    u_weak: torch.Tensor | None = None
    u_strong: torch.Tensor | None = None


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Infinite class-balanced batches for one rank: each sample draws a class uniformly, then an image of it
    (class-balanced resampling, the long-tail baseline; also CMO's minority sampler). Micro-step k of rank r draws from
    a generator seeded by (seed, k, r), so resuming at ``start`` continues the same stream with no state."""

    def __init__(self, labels, num_classes: int, batch_size: int, rank: int, seed: int, start: int = 0):
        labels = np.asarray(labels)
        self.by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
        self.classes = np.array([c for c in range(num_classes) if len(self.by_class[c])])
        self.bs, self.rank, self.seed, self.start = batch_size, rank, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            rng = np.random.default_rng([self.seed, step, self.rank, 1])
            cls = self.classes[rng.integers(len(self.classes), size=self.bs)]
            yield [int(self.by_class[c][rng.integers(len(self.by_class[c]))]) for c in cls]
            step += 1

    def __len__(self) -> int:
        return 2**62


class KeyedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Wraps a batch sampler so that each index travels with the seed of its item's random transform
    (:func:`~online_aug.rng.item_seed` of (seed, rank, micro-step, position)): the dataset draws its crops, flips and
    RandAugment ops from that seed, so a resumed run sees the very same views (timm's transforms draw from the global
    ``random`` / torch RNGs, which no checkpoint holds)."""

    def __init__(self, inner: Sampler[list[int]], seed: int, rank: int, start: int = 0):
        self.inner, self.seed, self.rank, self.start = inner, seed, rank, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        from .rng import item_seed

        for step, batch in enumerate(self.inner, start=self.start):
            yield [(i, item_seed(self.seed, self.rank, step, pos)) for pos, i in enumerate(batch)]

    def __len__(self) -> int:
        return 2**62


def real_batch(x: torch.Tensor, y: torch.Tensor, micro_step: int, num_classes: int, device: torch.device,
               stats: dict[str, float] | None = None) -> Batch:
    """A real micro-batch with one-hot targets on ``device``. The one-hot is built on the device from the (pinned,
    on CUDA) labels: a one-hot made on the host would be a pageable copy, which synchronises the trainer's stream."""
    return Batch(images=x.to(device, non_blocking=True), targets=one_hot_on(y, num_classes, device),
                 labels=y, micro_step=micro_step, stats={} if stats is None else stats)


def one_hot_on(y: torch.Tensor, num_classes: int, device: torch.device) -> torch.Tensor:
    """Float one-hot targets [B, C] of CPU labels, made on ``device`` without a host-device sync (with
    ``num_classes`` given, CUDA's one_hot reads no value back)."""
    return torch.nn.functional.one_hot(y.to(device, non_blocking=True), num_classes).float()


def loader_extras(rest: list, device: torch.device) -> dict[str, torch.Tensor]:
    """What travels with a real micro-batch to the generator (the loader's optional third item, a dict; see
    :class:`~online_aug.data.LabeledImages`), as ``augment(...)``'s keyword arguments: the object masks go to
    ``device``; the view geometry stays on the host, where the edit source's files are read."""
    if not rest:
        return {}
    return {k: v if k == "geom" else v.to(device, non_blocking=True) for k, v in rest[0].items()}


def real_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, start: int,
                num_workers: int, sampler: str = "random") -> DataLoader:
    """``sampler``: ``random`` (epochs of the split) or ``class_balanced`` (``data.sampler``)."""
    if sampler == "class_balanced":
        sampler = ClassBalancedBatchSampler(dataset.labels, dataset.num_classes, batch_size, rank, seed, start)
    else:
        sampler = ResumableBatchSampler(len(dataset), batch_size, rank, world_size, seed, start)
    if getattr(dataset, "transform", None) is not None:  # random views: each item's draws keyed by (seed, step)
        sampler = KeyedBatchSampler(sampler, seed, rank, start)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
