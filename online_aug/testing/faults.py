"""Fault injectors: make a real ``train.py`` process fail at a chosen point (tests/test_faults.py).

``ONLINE_AUG_INJECT_FAULT="producer_oom@2;nan_images@5,6,7"`` names the points. ``train.py`` calls :func:`install`
when that variable is set, before anything runs; the hooks then sit in :data:`online_aug.faults.INJECTORS`, the
registry the runtime's three seams consult (``inject_into_checkpoint``, ``inject_into_augment``,
``inject_into_source``). Without the variable the registry stays empty and nothing here is imported.

- ``kill_in_save@S``: SIGKILL the process between the files of checkpoint step S;
- ``producer_hang@K`` / ``producer_oom@K``: the generator hangs / raises CUDA out-of-memory at micro-step K;
- ``nan_images@K,...``: NaN in the images of those micro-steps.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import torch

from online_aug.faults import INJECT_ENV, INJECTORS, _say


def injected() -> dict[str, set[int]]:
    """``ONLINE_AUG_INJECT_FAULT="producer_oom@2;nan_images@5,6,7"`` → ``{'producer_oom': {2}, 'nan_images': {5, 6,
    7}}``."""
    out: dict[str, set[int]] = {}
    for item in filter(None, os.environ.get(INJECT_ENV, "").split(";")):
        name, _, at = item.partition("@")
        out[name.strip()] = {int(v) for v in at.split(",") if v.strip()}
    return out


def install() -> None:
    """Put the injectors into the runtime's registry (read again at every hook: the variable decides)."""
    INJECTORS.update(checkpoint=inject_into_checkpoint, augment=inject_into_augment, source=inject_into_source)


def inject_into_checkpoint(engine: Any, step: int) -> None:
    """``kill_in_save@S``: the second file DeepSpeed writes for step S is never written (SIGKILL before it)."""
    if step not in injected().get("kill_in_save", ()):
        return
    ce = engine.checkpoint_engine
    save, calls = ce.save, [0]

    def killing_save(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(*args, **kw)

    ce.save = killing_save


class FaultyAugment:
    """An augment callable that hangs or runs out of memory at chosen micro-steps."""

    def __init__(self, augment: Any, hang: set[int], oom: set[int]):
        self.augment, self.hang, self.oom = augment, hang, oom

    def __getattr__(self, name: str) -> Any:
        return getattr(self.augment, name)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, micro_step: int, **extras: torch.Tensor) -> Any:
        if micro_step in self.hang:
            _say(f"{INJECT_ENV}: the generator hangs at micro-step {micro_step} (unix time {time.time():.3f})\n")
            while True:  # a generator that never returns (a hung kernel, a deadlock)
                time.sleep(3600)
        if micro_step in self.oom:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by "
                                              f"{INJECT_ENV})")
        return self.augment(images, labels, micro_step, **extras)


def inject_into_augment(augment: Any) -> Any:
    hooks = injected()
    hang, oom = hooks.get("producer_hang", set()), hooks.get("producer_oom", set())
    return FaultyAugment(augment, hang, oom) if hang or oom else augment


class NanSource:
    """A batch source whose batches at chosen micro-steps have NaN images."""

    def __init__(self, inner: Any, micro_steps: set[int]):
        self.inner, self.micro_steps = inner, micro_steps

    def __next__(self) -> Any:
        batch = next(self.inner)
        if batch.micro_step in self.micro_steps:
            batch.images = torch.full_like(batch.images, math.nan)
        return batch

    def release(self, batch: Any) -> None:
        self.inner.release(batch)

    def close(self) -> None:
        self.inner.close()


def inject_into_source(source: Any) -> Any:
    steps = injected().get("nan_images")
    return NanSource(source, steps) if steps else source
