"""Random streams keyed by integers, so that a run can be replayed and resumed exactly.

A step's generator depends only on (seed, rank, step): not on the thread count, on what ran before it, or on whether
the run was interrupted, so a resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def step_rng(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator of one (seed, rank, step); a single-process program passes rank 0."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def item_seed(seed: int, rank: int, step: int, position: int) -> int:
    """The seed of one training item's random transform (micro-step ``step``, ``position`` in the batch): random crops,
    flips and RandAugment draws replay exactly on resume, whatever ran before (and with any number of loader
    workers)."""
    return int(np.random.SeedSequence([seed, rank, step, position, 7]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def keyed_global_rngs(key: int) -> Iterator[None]:
    """Python's ``random``, numpy's and torch's global CPU RNGs seeded with ``key`` inside the block and restored after:
    timm's transforms draw from all three, and no checkpoint holds them, so a keyed draw replays exactly on resume."""
    state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(key)
        np.random.seed(key % 2**32)
        torch.manual_seed(key)
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
