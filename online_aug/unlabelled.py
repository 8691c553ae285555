"""Unlabelled rows for semi-supervised training (``ssl.source``, docs/ssl.md), made by the producer beside each
labelled micro-batch, so the prefetch queue hides their cost as it hides the edits'.

- ``pool``: the generator pool's real images with their labels dropped (the ceiling: a perfect generator);
- ``generator``: ``aug.model``'s images: an SDEdit at a strength from ``ssl.strengths`` (from pure noise at strength 1
  with ``aug.gen_from_noise``) of images of the micro-batch, or (``ssl.edit_sources=balanced``) of training images
  of a class drawn uniformly, toward a class drawn at random; whatever the prompt promised, the label is dropped:
  the teacher labels the image (:mod:`online_aug.pseudo_labels`).

Each image comes as a weak view (as made) and a strong view (timm RandAugment, ``ssl.strong``). Micro-step k's rows
are a function of (seed, rank, k) and of the micro-batch alone, never of the classifier, so the prefetcher, the
synchronous path and a resumed run make the same ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from .batches import Batch, no_edit_stats, real_batch
from .config import Config
from .rng import item_seed, keyed_global_rngs

Augment = Callable[..., Batch]


class UnlabelledRows:
    """``rows(images, micro_step) -> (weak, strong)``, each [mu * B, 3, H, W] in [0, 1] on ``device``."""

    def __init__(self, cfg: Config, device: torch.device, rank: int, num_classes: int, pool=None, editor=None,
                 sources: list[torch.Tensor] | None = None):
        from timm.data.auto_augment import rand_augment_transform

        self.s, self.device, self.seed, self.rank = cfg.ssl, device, cfg.run.seed, rank
        self.num_classes, self.pool, self.editor = num_classes, pool, editor
        # ssl.edit_sources=balanced: training images of each class that has some, on the device
        self.sources = None if sources is None else [x.to(device) for x in sources]
        size = cfg.data.image_size
        self.strong_aug = rand_augment_transform(cfg.ssl.strong, {"translate_const": int(size * 0.45)})
        self.strengths = torch.tensor(cfg.ssl.strengths, dtype=torch.float32)

    def __call__(self, images: torch.Tensor, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.s.mu * len(images)
        rng = np.random.default_rng([self.seed, self.rank, micro_step, 11])
        if self.pool is not None:
            idx = rng.integers(len(self.pool), size=u)
            pils = [self.pool.pil(int(i)) for i in idx]
            weak = torch.stack([_to_tensor(p) for p in pils])
        else:
            weak = self._generate(images, rng, u).float().cpu()
            pils = [Image.fromarray(_to_uint8(x)) for x in weak]
        strong = []
        for pos, img in enumerate(pils):  # each image's RandAugment draws keyed by (seed, rank, step, position)
            with keyed_global_rngs(item_seed(self.seed, self.rank, micro_step, 10_000 + pos)):
                strong.append(_to_tensor(self.strong_aug(img)))
        return weak.to(self.device, non_blocking=True), torch.stack(strong).to(self.device, non_blocking=True)

    def _generate(self, images: torch.Tensor, rng: np.random.Generator, u: int) -> torch.Tensor:
        if self.sources is None:
            src = images[torch.as_tensor(rng.integers(len(images), size=u), device=images.device)]
        else:  # a class uniformly, then one of its training images: the tail's images are edited as often
            cls = rng.integers(len(self.sources), size=u)
            src = torch.stack([self.sources[c][int(rng.integers(len(self.sources[c])))] for c in cls])
        strength = self.strengths[torch.as_tensor(rng.integers(len(self.strengths), size=u))]
        # the class the prompt names (with learned tokens or {name}) is drawn uniformly, so the generator spreads its
        # images over every class it can draw; the label it implies is never used
        target = torch.as_tensor(rng.integers(self.num_classes, size=u))
        noise = torch.Generator(device=self.device)
        noise.manual_seed(int(rng.integers(2**62)))
        edited, _finite = self.editor.edit(src, strength, target, generator=noise)  # non-finite: the source image
        return edited


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class WithUnlabelled:
    """The producer's ``augment`` callable with the unlabelled rows added to each batch: ``inner`` makes the
    labelled batch (an :class:`~online_aug.augment.Augmenter`, or real rows with one-hot targets)."""

    def __init__(self, inner: Augment | None, rows: UnlabelledRows, num_classes: int, device: torch.device):
        self.inner, self.rows, self.num_classes, self.device = inner, rows, num_classes, device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, micro_step: int, **extras) -> Batch:
        if self.inner is not None:
            batch = self.inner(images, labels, micro_step, **extras)
        else:
            batch = real_batch(images, labels, micro_step, self.num_classes, self.device, no_edit_stats())
        batch.u_weak, batch.u_strong = self.rows(images, micro_step)
        return batch


def build_unlabelled(cfg: Config, splits, device: torch.device, rank: int) -> UnlabelledRows:
    """The run's unlabelled rows; the generator (``ssl.source=generator``) is loaded here, with ``aug.*``'s
    settings, after the same checks as the labelled edits' generator."""
    if cfg.ssl.source == "pool":
        return UnlabelledRows(cfg, device, rank, splits.num_classes, pool=splits.part("pool"))
    import dataclasses

    from .data import check_generator_folders
    from .generator import SDEditGenerator, resolve_class_names
    from .generator.graphs import apply_speed_options
    from .generator.preflight import check_generator_inputs

    # the edits' checks (folders, tokens, LoRA), run as for alpha > 0; the guard setting only waives the rule that a
    # prompt must name a class, which does not hold here: the images' labels come from the teacher
    check_generator_inputs(dataclasses.replace(cfg.aug, alpha=1.0, guard="on"), splits.num_classes)
    check_generator_folders([cfg.aug.model, cfg.aug.textual_inversion, *(e.path for e in cfg.aug.lora_stack())], splits)
    editor = SDEditGenerator.from_config(cfg.aug, resolve_class_names(cfg.aug.class_names, splits.class_names),
                                         device)
    apply_speed_options(editor, cfg.aug)
    sources = None
    if cfg.ssl.edit_sources == "balanced":
        from .augment import AUDIT_PER_CLASS, guard_bank

        # the first <= 64 training images of each class at the view's size; a class without one is left out
        bank = guard_bank(splits.train, splits.num_classes, AUDIT_PER_CLASS, cfg.data.image_size)
        sources = [x for x, n in zip(bank, splits.train.class_counts()) if n]
    return UnlabelledRows(cfg, device, rank, splits.num_classes, editor=editor, sources=sources)
