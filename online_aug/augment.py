"""One augmentation step: plan (policy) → edit (generator) → guard/filter → merge into the batch.

:class:`Augmenter` is the ``augment(images, labels, step) -> Batch`` callable that the background producer
(:mod:`online_aug.prefetch`) runs for every micro-batch, and that the synchronous path (``aug.prefetch=false``,
:mod:`online_aug.sources`) runs inside the training step; both give the same batch for the same (seed, rank, step).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from .batches import Batch, no_edit_stats
from .class_stats import SnapshotBoard
from .config import Config
from .policy import AugPolicy
from .rng import step_rng

# (edited images [M,3,H,W], target classes [M]) -> keep mask [M] bool (True keeps the edit)
GUARD_PER_CLASS = 16  # images per class in the near-duplicate bank: enough to flag copies, cheap to load

EditFilter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


class Augmenter:
    """Turns a real micro-batch into an online-augmented one."""

    def __init__(self, policy: AugPolicy, editor, device: torch.device, seed: int, rank: int,
                 class_names: list[str], example_every: int = 0, edit_filter: EditFilter | None = None,
                 board: SnapshotBoard | None = None, dup_guard: NearDuplicateGuard | None = None):
        # editor: the frozen SD wrapper (SDEditGenerator) or any object with its edit(images, s, targets, generator)
        self.policy, self.editor, self.device = policy, editor, device
        self.seed, self.rank, self.class_names = seed, rank, class_names
        self.example_every, self.edit_filter = example_every, edit_filter
        self.board, self.dup_guard = board, dup_guard  # closed loop: the trainer's published statistics
        self.num_classes = policy.num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int,
                 masks: torch.Tensor | None = None) -> Batch:
        """``images`` [B,3,H,W] in [0,1] on ``self.device``; ``labels`` [B] on the CPU; ``step`` the micro-step;
        ``masks`` [B,1,H,W] object masks from the loader (aug.mask_mode), handed to the generator with the edits."""
        t0 = time.perf_counter()
        rng = step_rng(self.seed, self.rank, step)
        snapshot = self.board.for_step(step) if self.board is not None else None
        plan = self.policy.plan(labels, rng, snapshot)
        targets = plan.soft_label.to(self.device, non_blocking=True)
        b, m = len(labels), plan.num_edits
        stats = no_edit_stats()
        examples = None
        edit_target = torch.full((b,), -1, dtype=torch.long)  # -1: a real row (the trainer's statistics use it)
        if m:
            noise_rng = torch.Generator(device=self.device)  # the SDEdit noise, seeded from this step's rng
            noise_rng.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
            idx = plan.index.to(self.device)
            src = images[idx]
            # masks only when the loader sends them: an editor without mask support keeps its plain signature
            kw = {} if masks is None else {"masks": masks[idx]}
            edited, keep = self.editor.edit(src, plan.strength, plan.target, generator=noise_rng, **kw)
            nonfinite = (~keep).sum()
            filtered = torch.zeros((), dtype=torch.long, device=self.device)
            if self.edit_filter is not None:
                passed = self.edit_filter(edited, plan.target.to(self.device))
                filtered = (keep & ~passed).sum()
                keep = keep & passed
            # a dropped edit (non-finite or filtered) trains as its real image with its hard label
            hard = torch.nn.functional.one_hot(plan.source.to(self.device), self.num_classes).float()
            images = images.clone()
            images[idx] = torch.where(keep.view(-1, 1, 1, 1), edited, src)
            targets[idx] = torch.where(keep.view(-1, 1), targets[idx], hard)
            # the producer runs off the trainer's path, so reading these counts back here costs the trainer nothing
            kept = int(keep.sum())
            stats = {**stats, "aug/effective_alpha": kept / b, "aug/nonfinite_dropped": float(nonfinite),
                     "aug/filtered": float(filtered)}
            keep_cpu = keep.cpu()
            edit_target[plan.index[keep_cpu]] = plan.target[keep_cpu]
            if self.dup_guard is not None and kept:
                dist = self.dup_guard(edited[keep], plan.target.to(self.device)[keep])
                stats["aug/nn_dist"] = float(dist.mean())
                stats["aug/near_dup"] = float((dist < self.dup_guard.threshold).float().mean())
            if self.example_every and step % self.example_every == 0:
                examples = self._examples(src, edited, plan, targets[idx])
        stats["aug/gen_ms"] = 1000 * (time.perf_counter() - t0)
        return Batch(images=images, targets=targets, labels=labels, step=step, stats=stats, examples=examples,
                     edit_target=edit_target.to(self.device, non_blocking=True))

    def _examples(self, src: torch.Tensor, edited: torch.Tensor, plan, soft: torch.Tensor, k: int = 8) -> dict:
        k = min(k, len(src))
        names = self.class_names
        captions = []
        for i in range(k):
            s, t = int(plan.source[i]), int(plan.target[i])
            y = soft[i]
            captions.append(f"{names[s]}→{names[t]} s={float(plan.strength[i]):.2f} "
                            f"y=({float(y[s]):.2f} {names[s]}, {float(y[t]):.2f} {names[t]})")
        return {"source": src[:k].detach().float().cpu(), "edited": edited[:k].detach().float().cpu(),
                "captions": captions}


def build_augmenter(cfg: Config, splits, device: torch.device, rank: int, accum: int = 1,
                    board: SnapshotBoard | None = None) -> Augmenter:
    """Policy + frozen SD (+ CLIP filter, near-duplicate guard) for this run; ``board``: the closed loop's snapshots."""
    from .generator import SDEditGenerator, resolve_class_names

    policy = AugPolicy(cfg.aug, splits.num_classes, splits.train.class_counts())
    editor = SDEditGenerator.from_config(cfg.aug, splits.class_names, device)
    edit_filter = None
    if cfg.aug.filter_fraction > 0:
        from .generator.clip_filter import build_clip_filter

        edit_filter = build_clip_filter(cfg.aug, splits.class_names, device)
    dup_guard = None
    if cfg.aug.dup_threshold > 0:
        dup_guard = NearDuplicateGuard(guard_bank(splits.train, splits.num_classes), cfg.aug.dup_threshold, device)
    return Augmenter(policy, editor, device, cfg.run.seed, rank,
                     resolve_class_names(cfg.aug.class_names, splits.class_names),
                     example_every=cfg.aug.image_every * accum, edit_filter=edit_filter, board=board,
                     dup_guard=dup_guard)


def guard_bank(train, num_classes: int, per_class: int = GUARD_PER_CLASS) -> list[torch.Tensor]:
    """Up to ``per_class`` training images of each class (the first ones: deterministic), [n, 3, S, S] each."""
    labels = np.asarray(train.labels)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        # subset() drops the training transform: the bank holds the images as they are, not RandAugment draws
        out.append(train.subset(idx).tensors()[0] if len(idx) else torch.full((1, 3, 8, 8), 1e3))
    return out
