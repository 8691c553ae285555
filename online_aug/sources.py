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

import numpy as np
import torch

from . import streams
from .audit import guard_decides_baseline
from .augment import build_augmenter
from .batches import Batch, loader_extras, one_hot_on, real_batch, real_loader
from .class_stats import SnapshotBoard
from .config import Config, OnFault
from .faults import inject_into_augment, inject_into_source
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
        self.it, self.device, self.num_classes, self.micro_step = iter(loader), device, num_classes, start

    def __next__(self) -> Batch:
        x, y = next(self.it)[:2]
        b = real_batch(x, y, self.micro_step, self.num_classes, self.device)
        self.micro_step += 1
        return b

    def release(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


class SyncAugmentedSource:
    """The synchronous path: the edit runs inside the training step (the benchmark's comparison point)."""

    def __init__(self, loader, augment: Callable[[torch.Tensor, torch.Tensor, int], Batch], device: torch.device,
                 start: int):
        self.it, self.augment, self.device, self.micro_step = iter(loader), augment, device, start

    def __next__(self) -> Batch:
        x, y, *rest = next(self.it)  # rest: what travels to the generator (masks, the view's geometry)
        t0 = time.perf_counter()
        x = x.to(self.device, non_blocking=True)
        batch = self.augment(x, y, self.micro_step, **loader_extras(rest, self.device))
        batch.stats["aug/stall_ms"] = 1000 * (time.perf_counter() - t0)  # the trainer waited for all of it
        batch.stats["aug/queue_depth"] = 0.0
        self.micro_step += 1
        return batch

    def release(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


class CMOSource:
    """CMO (Park et al., CVPR 2022, "The Majority Can Help the Minority"): with probability ``prob`` a batch gets a
    CutMix box pasted from a class-balanced ("minority-oversampled") real batch; the targets mix by box area. The
    background batch (rich context from the majority) comes from ``inner``, augmented or not, so CMO composes with
    online augmentation. The box and the coin are drawn from (seed, step): resume continues the same stream."""

    def __init__(self, inner: BatchSource, minority_loader, num_classes: int, prob: float, seed: int):
        self.inner, self.it = inner, iter(minority_loader)
        self.num_classes, self.prob, self.seed = num_classes, prob, seed

    def __next__(self) -> Batch:
        from timm.data.mixup import cutmix_bbox_and_lam

        batch = next(self.inner)
        xm, ym = next(self.it)[:2]  # drawn every step, used or not, so the minority stream stays aligned with the steps
        rng = np.random.default_rng([self.seed, batch.micro_step, 2])
        if rng.random() >= self.prob:
            return batch
        streams.wait(batch.images.device, batch.ready)  # the producer's stream wrote these tensors: order after it
        lam = float(rng.beta(1.0, 1.0))
        (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(batch.images.shape, lam, correct_lam=True)
        images = batch.images.clone()
        images[:, :, y0:y1, x0:x1] = xm.to(images.device)[:, :, y0:y1, x0:x1]
        fg = one_hot_on(ym, self.num_classes, batch.targets.device)
        batch.images, batch.targets = images, lam * batch.targets + (1 - lam) * fg
        return batch

    def release(self, batch: Batch) -> None:
        self.inner.release(batch)

    def close(self) -> None:
        self.inner.close()


def prepare_batch_source(cfg: Config, splits) -> None:
    """Check what the batch source will need and attach it to the data, before any model is built: a bad generator
    folder or file fails in a second, not after the classifier and the SD have loaded. Nothing to do at α = 0
    (diffusers is not even imported then)."""
    if cfg.aug.alpha <= 0:
        return
    from .data import attach_masks, check_generator_folders
    from .generator.preflight import check_generator_inputs
    from .policy import read_label_rates

    check_generator_inputs(cfg.aug, splits.num_classes)
    if cfg.aug.label_rates:  # build_augmenter reads it again; a bad file fails here, before the bar and the models
        read_label_rates(cfg.aug.label_rates, splits.num_classes)
    # a generator that saw this run's validation or test images would leak them into training
    check_generator_folders([cfg.aug.model, cfg.aug.textual_inversion, *(e.path for e in cfg.aug.lora_stack())], splits)
    if cfg.aug.mask_mode != "off":  # object masks travel with their images from the loader on
        attach_masks(splits.train, cfg.aug.mask_source, cfg.aug.mask_threshold, cfg.data.root)
    # aug.edit_source=full: each view's crop/flip travels too; the producer reads the edit source from it
    splits.train.edit_source = cfg.full_res_edit_source()


def _rebuild_reuse_ring(augment: Callable[..., Batch], cfg: Config, splits, device: torch.device, rank: int,
                        world: int, micro_bs: int, start: int) -> None:
    """``aug.reuse = k`` on resume: re-run the ``k - 1`` micro-steps before ``start`` on their own real batches
    (results discarded), so the reuse ring holds the edits the interrupted run had made; checkpoints hold none."""
    first = max(0, start - (cfg.aug.reuse - 1))
    it = iter(real_loader(splits.train, micro_bs, rank, world, seed=cfg.run.seed, start=first,
                          num_workers=cfg.data.num_workers, sampler=cfg.data.sampler))
    for micro_step in range(first, start):
        x, y, *rest = next(it)
        augment(x.to(device), y, micro_step, **loader_extras(rest, device))


def build_batch_source(cfg: Config, splits, device: torch.device, rank: int, world: int, micro_bs: int,
                       start: int, accum: int = 1, board: SnapshotBoard | None = None,
                       on_fault: OnFault = "stop") -> BatchSource:
    """The run's source of micro-batches for this rank, starting at micro-step ``start`` (resume), on data that
    :func:`prepare_batch_source` prepared; ``board``: the closed loop's published statistics (``aug.adaptive``);
    ``on_fault``: what the prefetcher does once its producer failed (stop: the next ``next()`` raises the producer's
    error; real: go on with real batches, the fault recorded; see prefetch.py)."""
    loader = real_loader(splits.train, micro_bs, rank, world, seed=cfg.run.seed, start=start,
                         num_workers=cfg.data.num_workers, sampler=cfg.data.sampler)
    source: BatchSource
    augmenter, audit = None, None
    if cfg.aug.alpha > 0:
        augmenter = build_augmenter(cfg, splits, device, rank, accum, board)
        audit = augmenter.audit
        if cfg.aug.guard == "on" and audit is not None:
            target_p = (torch.ones(splits.num_classes) if cfg.aug.target_mode == "intra"
                        else augmenter.policy.target_p)
            if guard_decides_baseline(audit, target_p, cfg.aug.guard_min_share):
                # nothing to help, or too little: edits toward only some classes shift the class prior away from
                # the others (measured: docs/guard.md). The baseline's real batches; the generator is not kept
                augmenter = None
    if augmenter is None and cfg.ssl.source == "off":
        source = RealSource(loader, device, splits.num_classes, start)
    else:
        if augmenter is not None and cfg.aug.reuse > 1 and start > 0:
            _rebuild_reuse_ring(augmenter, cfg, splits, device, rank, world, micro_bs, start)
        augment: Callable[..., Batch] = augmenter
        if cfg.ssl.source != "off":  # the producer makes the unlabelled rows too (docs/ssl.md)
            from .unlabelled import WithUnlabelled, build_unlabelled

            augment = WithUnlabelled(augmenter, build_unlabelled(cfg, splits, device, rank), splits.num_classes,
                                     device)
        augment = inject_into_augment(augment)  # test hook
        if not cfg.aug.prefetch:
            source = SyncAugmentedSource(loader, augment, device, start)
        else:
            source = Prefetcher(loader, augment, device, depth=cfg.aug.queue_depth, starvation=cfg.aug.starvation,
                                start=start, num_classes=splits.num_classes, timeout_s=cfg.aug.timeout_s,
                                on_fault=on_fault)
    source = inject_into_source(source)  # test hook (ONLINE_AUG_INJECT_FAULT); a no-op otherwise
    if cfg.train.cmo_prob > 0:
        minority = real_loader(splits.train, micro_bs, rank, world, seed=cfg.run.seed + 1, start=start,
                               num_workers=0, sampler="class_balanced")
        source = CMOSource(source, minority, splits.num_classes, cfg.train.cmo_prob, cfg.run.seed)
    source.audit = audit  # what the generator audit found (aug.guard), for the trainer to report; None without one
    return source
