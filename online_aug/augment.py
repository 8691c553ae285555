"""One augmentation step: plan (policy) → edit (generator) → guard/filter → merge into the batch.

:class:`Augmenter` is the ``augment(images, labels, micro_step) -> Batch`` callable that the background producer
(:mod:`online_aug.prefetch`) runs for every micro-batch, and that the synchronous path (``aug.prefetch=false``,
:mod:`online_aug.sources`) runs inside the training step; both give the same batch for the same (seed, rank,
micro-step).

Reuse (``aug.reuse = k``): edit slot ``j`` of micro-step ``i`` is generated when ``(i + j) % k == 0`` and otherwise
takes the edit generated in slot ``j`` of step ``i - (i + j) % k`` (image, soft label and target as they were made),
so every edit is used in ``k`` consecutive steps and about ``1/k`` of the edits are generated. The ring holds the
edits of the last ``k - 1`` steps in memory only; a resumed run rebuilds it by re-running those steps
(:func:`online_aug.sources.build_batch_source`), so a step's batch stays a function of (seed, rank, step) and the
real batches before it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from .batches import Batch, no_edit_stats
from .class_stats import SnapshotBoard
from .config import Config
from .duplicates import NearDuplicateGuard
from .policy import AugPolicy, read_label_rates
from .rng import step_rng

NONFINITE_WINDOW, NONFINITE_WARN = 64, 0.05  # edits per window; share of non-finite edits that is worth a warning
AUDIT_PER_CLASS = 64  # training images per class the audit's judge is fit on and its copies are measured against
GUARD_PER_CLASS = 16  # images per class in the near-duplicate bank: enough to flag copies, cheap to load

# (edited images [M,3,H,W], target classes [M]) -> keep mask [M] bool (True keeps the edit)
EditFilter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Augmenter:
    """Turns a real micro-batch into an online-augmented one."""

    def __init__(self, policy: AugPolicy, editor, device: torch.device, seed: int, rank: int,
                 class_names: list[str], example_every: int = 0, edit_filter: EditFilter | None = None,
                 board: SnapshotBoard | None = None, dup_guard: NearDuplicateGuard | None = None,
                 reuse: int = 1, safety: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 source_reader: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 refill: RealRefill | None = None):
        # editor: the frozen SD wrapper (SDEditGenerator) or any object with its edit(images, s, targets, generator)
        self.policy, self.editor, self.device = policy, editor, device
        self.seed, self.rank, self.class_names = seed, rank, class_names
        self.example_every, self.edit_filter = example_every, edit_filter
        self.board, self.dup_guard = board, dup_guard  # closed loop: the trainer's published statistics
        self.num_classes = policy.num_classes
        self.reuse = int(reuse)  # aug.reuse: steps each edit is used in (1: every edit fresh)
        self._ring: dict[tuple[int, int], tuple] = {}  # (step made, slot) -> (image, soft label, target, kept)
        self.safety = safety  # aug.safety_checker: images -> [M] bool flagged; None (off) costs nothing
        # aug.edit_source=full: view geometry [M, 6] -> the edit sources at the generator's resolution, read from the
        # stored images (data.EditSourceReader); None: the edit starts from the classifier's view
        self.source_reader = source_reader
        self.refill = refill  # aug.guard_fallback=target: real images of the classes the guard refused edits toward
        self._nonfinite = [0, 0]  # (non-finite edits, edits) in the current window of NONFINITE_WINDOW edits
        self.nonfinite_warned = False
        self.audit = None  # the generator audit build_augmenter ran (aug.guard), reported by the trainer

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, micro_step: int,
                 masks: torch.Tensor | None = None, geom: torch.Tensor | None = None) -> Batch:
        """``images`` [B,3,H,W] in [0,1] on ``self.device``; ``labels`` [B] on the CPU; ``micro_step`` the micro-step;
        ``masks`` [B,1,H,W] object masks from the loader (aug.mask_mode), handed to the generator with the edits;
        ``geom`` [B,6] (CPU) where each view came from in its stored image (aug.edit_source=full): the edits then
        start from the stored images at the generator's resolution and are resized to the view's size."""
        t0 = time.perf_counter()
        rng = step_rng(self.seed, self.rank, micro_step)
        snapshot = self.board.for_step(micro_step) if self.board is not None else None
        plan = self.policy.plan(labels, rng, snapshot)
        targets = plan.soft_label.to(self.device, non_blocking=True)
        b, m = len(labels), plan.num_edits
        stats = no_edit_stats()
        examples = None
        edit_target = torch.full((b,), -1, dtype=torch.long)  # -1: a real row (the trainer's statistics use it)
        if m:
            noise_rng = torch.Generator(device=self.device)  # the SDEdit noise, seeded from this micro-step's rng
            noise_rng.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
            idx = plan.index.to(self.device)
            src = images[idx]
            fresh = self._fresh_slots(micro_step, m)  # [M] bool: generated now; the other slots reuse the ring's edits
            fi = fresh.nonzero().flatten()
            f_dev = fi.to(self.device)
            f_src, f_strength, f_target = src[f_dev], plan.strength[fi], plan.target[fi]
            # masks only when the loader sends them: an editor without mask support keeps its plain signature
            kw = {} if masks is None else {"masks": masks[idx][f_dev]}
            if plan.template is not None:  # prompt diversity: the template each edit drew
                kw["templates"] = plan.template[fi]
            e_src = f_src  # what the generator edits: the view, or its stored image at the generator's resolution
            if self.source_reader is not None and geom is not None:
                e_src = self.source_reader(geom[plan.index[fi]]).to(self.device, non_blocking=True)
            edited, keep = self.editor.edit(e_src, f_strength, f_target, generator=noise_rng, **kw)
            nonfinite = (~keep).sum()
            if self.safety is not None:
                edited, keep, safety_stats = self._screen(edited, keep, e_src, f_strength, f_target, noise_rng, kw)
                stats.update(safety_stats)
            if edited.shape[-2:] != f_src.shape[-2:]:  # a full-resolution edit, brought to the classifier's view
                edited = torch.nn.functional.interpolate(edited, size=f_src.shape[-2:], mode="bilinear",
                                                         antialias=True, align_corners=False).clamp_(0, 1)
            filtered = torch.zeros((), dtype=torch.long, device=self.device)
            if self.edit_filter is not None:
                passed = self.edit_filter(edited, f_target.to(self.device))
                filtered = (keep & ~passed).sum()
                keep = keep & passed
            # every slot: the fresh edit, or the ring's (reuse); a dropped edit (non-finite, unsafe or filtered)
            # trains as its real image with its hard label
            out, soft, slot_target = src.clone(), targets[idx], plan.target.clone()
            out[f_dev] = torch.where(keep.view(-1, 1, 1, 1), edited, f_src)
            ok = torch.zeros(m, dtype=torch.bool, device=self.device)
            ok[f_dev] = keep
            if self.reuse > 1:
                self._reuse(micro_step, fresh, out, soft, slot_target, ok)
            hard = torch.nn.functional.one_hot(plan.source.to(self.device), self.num_classes).float()
            images = images.clone()
            images[idx] = out
            targets[idx] = torch.where(ok.view(-1, 1), soft, hard)
            # the producer runs off the trainer's path, so reading these counts back here costs the trainer nothing
            kept = int(ok.sum())
            stats = {**stats, "aug/effective_alpha": kept / b, "aug/nonfinite_dropped": float(nonfinite),
                     "aug/filtered": float(filtered), "aug/fresh_edits": float(len(fi)),
                     "aug/reused_edits": float(m - len(fi))}
            self._watch_nonfinite(int(stats["aug/nonfinite_dropped"]), len(fi))
            ok_cpu = ok.cpu()
            edit_target[plan.index[ok_cpu]] = slot_target[ok_cpu]
            if self.dup_guard is not None and bool(keep.any()):
                dist = self.dup_guard(edited[keep], f_target.to(self.device)[keep])
                stats["aug/nn_dist"] = float(dist.mean())
                stats["aug/near_dup"] = float((dist < self.dup_guard.threshold).float().mean())
            if self.example_every and micro_step % self.example_every == 0 and len(fi):
                examples = self._examples(f_src, edited, plan.source[fi], f_target, f_strength, targets[idx][f_dev])
        if plan.refill_index is not None and plan.refill_index.numel():
            if self.refill is None:
                raise RuntimeError("the policy planned real refills (aug.guard_fallback=target) but the augmenter "
                                   "was built without a RealRefill")
            images = images.clone() if not m else images
            images[plan.refill_index.to(self.device)] = self.refill(plan.refill_class, plan.refill_pick,
                                                                    images.shape[-2:]).to(self.device, images.dtype)
            labels = labels.clone()
            labels[plan.refill_index] = plan.refill_class  # the row's real class is now the target's
            stats["aug/guard_refills"] = float(plan.refill_index.numel())
        stats["aug/gen_ms"] = 1000 * (time.perf_counter() - t0)
        return Batch(images=images, targets=targets, labels=labels, micro_step=micro_step, stats=stats,
                     examples=examples, edit_target=edit_target.to(self.device, non_blocking=True))

    def _watch_nonfinite(self, bad: int, m: int) -> None:
        """An fp16 VAE or UNet that overflows makes edits non-finite; each silently trains as its real image, so a
        share above NONFINITE_WARN of a window of edits is said on stderr (once a run), not only in TensorBoard."""
        w = self._nonfinite
        w[0], w[1] = w[0] + bad, w[1] + m
        if w[1] < NONFINITE_WINDOW:
            return
        if w[0] > NONFINITE_WARN * w[1] and not self.nonfinite_warned:
            self.nonfinite_warned = True
            dtype = getattr(self.editor, "dtype", None)
            print(f"WARNING: {w[0]} of the last {w[1]} edits ({w[0] / w[1]:.0%}) were not finite and trained as "
                  f"real images (aug/nonfinite_dropped); the generator overflows in {dtype}: set aug.dtype=bf16 or "
                  f"fp32", file=sys.stderr, flush=True)
        w[0] = w[1] = 0

    def _fresh_slots(self, micro_step: int, m: int) -> torch.Tensor:
        """[M] bool (CPU): the edit slots generated at ``micro_step``; with reuse k, slot j is fresh when
        (micro_step + j) % k is 0, or when the micro-step it would reuse lies before micro-step 0."""
        if self.reuse == 1:
            return torch.ones(m, dtype=torch.bool)
        lag = (micro_step + torch.arange(m)) % self.reuse
        return (lag == 0) | (micro_step - lag < 0)

    def _reuse(self, micro_step: int, fresh: torch.Tensor, out: torch.Tensor, soft: torch.Tensor,
               slot_target: torch.Tensor, ok: torch.Tensor) -> None:
        """Fill the reused slots from the ring and put this micro-step's new ring edits in (in place); drop the edits
        whose k uses are over. A slot whose edit the ring lacks (a micro-step trained on a real batch under
        ``aug.starvation=real``) trains as its real image."""
        k, m = self.reuse, len(fresh)
        lag = (micro_step + torch.arange(m)) % k
        for j in (~fresh).nonzero().flatten().tolist():
            made = self._ring.get((micro_step - int(lag[j]), j))
            if made is None:
                ok[j] = False
                continue
            out[j], soft[j], slot_target[j], ok[j] = made
        for j in (fresh & (lag == 0)).nonzero().flatten().tolist():
            self._ring[(micro_step, j)] = (out[j].clone(), soft[j].clone(), slot_target[j].clone(), ok[j].clone())
        for key in [key for key in self._ring if key[0] <= micro_step - k + 1]:
            del self._ring[key]

    def _screen(self, edited: torch.Tensor, keep: torch.Tensor, src: torch.Tensor, strength: torch.Tensor,
                target: torch.Tensor, noise_rng: torch.Generator, kw: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """aug.safety_checker: re-sample the flagged edits once (fresh noise from this micro-step's stream); an edit
        flagged again is dropped (trains as its real image)."""
        flagged = self.safety(edited) & keep
        stats = {"aug/unsafe_resampled": float(flagged.sum()), "aug/unsafe_dropped": 0.0}
        if stats["aug/unsafe_resampled"]:  # host read in the producer thread, only with the checker on
            fl = flagged.nonzero().flatten()
            sub = {name: v[fl.to(v.device)] for name, v in kw.items()}
            redo, finite = self.editor.edit(src[fl], strength[fl.cpu()], target[fl.cpu()], generator=noise_rng,
                                            **sub)
            bad = self.safety(redo) | ~finite
            edited, keep = edited.clone(), keep.clone()
            edited[fl], keep[fl] = redo, ~bad
            stats["aug/unsafe_dropped"] = float(bad.sum())
        return edited, keep, stats

    def _examples(self, src: torch.Tensor, edited: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                  strength: torch.Tensor, soft: torch.Tensor, k: int = 8) -> dict:
        k = min(k, len(src))
        names = self.class_names
        captions = []
        for i in range(k):
            s, t = int(source[i]), int(target[i])
            y = soft[i]
            captions.append(f"{names[s]}→{names[t]} s={float(strength[i]):.2f} "
                            f"y=({float(y[s]):.2f} {names[s]}, {float(y[t]):.2f} {names[t]})")
        return {"source": src[:k].detach().float().cpu(), "edited": edited[:k].detach().float().cpu(),
                "captions": captions}


def build_augmenter(cfg: Config, splits, device: torch.device, rank: int, accum: int = 1,
                    board: SnapshotBoard | None = None) -> Augmenter:
    """Policy + frozen SD (+ CLIP filter, near-duplicate guard) for this run; ``board``: the closed loop's snapshots."""
    from .generator import SDEditGenerator, resolve_class_names
    from .generator.graphs import apply_speed_options

    safety = None
    if cfg.aug.safety_checker:  # off by default: nothing is loaded, and the augmenter never calls it
        from .devices import resolve_dtype
        from .generator.safety import load_safety_checker

        dtype = resolve_dtype(cfg.aug.dtype, device)
        safety = load_safety_checker(cfg.aug.safety_checker, cfg.aug.model, device, dtype)  # before the SD: fails fast
    # read before the SD loads: a bad file fails in a second, not after the model
    label_rates = read_label_rates(cfg.aug.label_rates, splits.num_classes) if cfg.aug.label_rates else None
    editor = SDEditGenerator.from_config(cfg.aug, splits.class_names, device)
    audit = None
    if cfg.aug.audit:  # before the speed options: the audit's batch shapes are not the run's
        from .audit import audit_generator

        audit = audit_generator(cfg, editor, guard_bank(splits.train, splits.num_classes, AUDIT_PER_CLASS),
                                splits.class_names, splits.train.class_counts(), device, held_out_bank(splits))
    apply_speed_options(editor, cfg.aug)  # aug.cuda_graph / aug.compile / aug.channels_last (CUDA only)
    allowed = audit.allowed if audit is not None and cfg.aug.guard == "on" else None
    policy = AugPolicy(cfg.aug, splits.num_classes, splits.train.class_counts(), num_templates=editor.num_templates,
                       label_rates=label_rates, allowed=allowed)
    edit_filter = None
    if cfg.aug.filter_fraction > 0:
        from .generator.clip_filter import build_clip_filter

        edit_filter = build_clip_filter(cfg.aug, splits.class_names, device)
    dup_guard = None
    if cfg.aug.dup_threshold > 0:
        dup_guard = NearDuplicateGuard(guard_bank(splits.train, splits.num_classes), cfg.aug.dup_threshold, device)
    source_reader = None
    if cfg.full_res_edit_source():  # the loader sends each view's geometry (sources.prepare_batch_source)
        from .data import EditSourceReader

        source_reader = EditSourceReader(splits.train, editor.resolution)
    augmenter = Augmenter(policy, editor, device, cfg.run.seed, rank,
                          resolve_class_names(cfg.aug.class_names, splits.class_names),
                          example_every=cfg.aug.image_every * accum, edit_filter=edit_filter, board=board,
                          dup_guard=dup_guard, reuse=cfg.aug.reuse, safety=safety, source_reader=source_reader,
                          refill=RealRefill(splits.train, splits.num_classes) if policy.refills else None)
    augmenter.audit = audit
    return augmenter


class RealRefill:
    """aug.guard_fallback=target: a real training image of a given class, read from the training set when asked (a
    class's images are not held in memory); the stored image without the training transform, resized to the view."""

    def __init__(self, train, num_classes: int):
        self.train = train
        labels = np.asarray(train.labels)
        self.index = [np.flatnonzero(labels == c) for c in range(num_classes)]

    def __call__(self, classes: torch.Tensor, pick: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``classes`` [R] (each with training images), ``pick`` [R] uniform in [0, 1): images [R, 3, *size]."""
        rows = [int(self.index[int(c)][min(int(u * len(self.index[int(c)])), len(self.index[int(c)]) - 1)])
                for c, u in zip(classes.tolist(), pick.tolist())]
        x = self.train.subset(np.asarray(rows)).tensors()[0]
        if tuple(x.shape[-2:]) != tuple(size):
            x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
        return x


def held_out_bank(splits, per_class: int = AUDIT_PER_CLASS) -> list[torch.Tensor] | None:
    """The validation split's images per class (empty where a class has none), for the audit's ``(real)`` column:
    how well its judge recognises real images it was not fit on. None without a validation split."""
    if splits.val is None:
        return None
    counts = splits.val.class_counts()
    return [x if counts[c] else x[:0] for c, x in enumerate(guard_bank(splits.val, splits.num_classes, per_class))]


def guard_bank(train, num_classes: int, per_class: int = GUARD_PER_CLASS,
               resolution: int | None = None) -> list[torch.Tensor]:
    """Up to ``per_class`` training images of each class (the first ones: deterministic), [n, 3, S, S] each, resized
    to ``resolution`` when given."""
    labels = np.asarray(train.labels)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        # subset() drops the training transform: the bank holds the images as they are, not RandAugment draws
        out.append(train.subset(idx).tensors(resolution)[0] if len(idx) else torch.full((1, 3, 8, 8), 1e3))
    return out
