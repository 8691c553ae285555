"""The trainer's side of the closed loop (``aug.adaptive``): observe every micro-batch's logits, publish a snapshot of
the per-class statistics at every ``aug.adaptive_every`` optimizer steps, and say what it will make the policy do.

The producer's side is the :class:`~online_aug.class_stats.SnapshotBoard` the :class:`~online_aug.augment.Augmenter`
reads; the policy's formulas are in :mod:`online_aug.policy` (``adaptive_targets``, ``pair_distributions``,
``adaptive_strengths``). Staleness and determinism: see :mod:`online_aug.class_stats`.
"""

from __future__ import annotations

import torch

from .batches import Batch
from .class_stats import ClassStats, Snapshot, SnapshotBoard
from .config import Config
from .policy import adaptive_strengths, adaptive_targets, target_distribution


class ClosedLoop:
    def __init__(self, cfg: Config, num_classes: int, class_counts: list[int], class_names: list[str], accum: int,
                 device: torch.device):
        a = cfg.aug
        self.cfg, self.names = a, class_names
        self.every = a.adaptive_every * accum  # in micro-steps: a snapshot at the end of every N-th optimizer step
        self.lag = a.queue_depth + 2  # the producer runs at most D + 1 micro-steps ahead (class_stats docstring)
        self.stats = ClassStats(num_classes, a.adaptive_ema, device)
        self.board = SnapshotBoard(num_classes, self.every, self.lag)
        self.prior = torch.as_tensor(target_distribution(a, class_counts, num_classes), dtype=torch.float64)
        lo_hi = a.strength_range or [min(a.strengths), max(a.strengths)]
        self.bounds = (float(lo_hi[0]), float(lo_hi[1]))

    def observe(self, logits: torch.Tensor, batch: Batch) -> dict[str, float] | None:
        """Accumulate (no sync); at a boundary publish the snapshot and return its TensorBoard scalars."""
        self.stats.update(logits, batch.labels, batch.edit_target)
        if (batch.micro_step + 1) % self.every:
            return None
        snap = self.stats.publish(batch.micro_step)
        self.board.put(snap)
        return self.scalars(snap)

    def scalars(self, snap: Snapshot) -> dict[str, float]:
        """What drove the policy and what it will do: per class, q (target share), real and edit accuracy, strength."""
        a = self.cfg
        q = adaptive_targets(self.prior, snap.acc, a.adaptive_tau, a.adaptive_floor)
        out = {"aug/real_acc": float(snap.acc.mean()), "aug/edit_acc": float(snap.edit_acc.mean())}
        classes = torch.arange(len(self.names))
        s = adaptive_strengths(classes, snap.edit_acc, a.adaptive_strength, self.bounds, torch.full((len(q),), 0.5))
        for c, name in enumerate(self.names):
            out[f"adaptive/q/{name}"] = float(q[c])
            out[f"adaptive/real_acc/{name}"] = float(snap.acc[c])
            out[f"adaptive/edit_acc/{name}"] = float(snap.edit_acc[c])
            out[f"adaptive/loss/{name}"] = float(snap.loss[c])
            if a.adaptive_strength:
                out[f"adaptive/strength/{name}"] = float(s[c])
        return out

    def state_dict(self) -> dict:
        return {"stats": self.stats.state_dict(), "board": self.board.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state["stats"])
        self.board.load_state_dict(state["board"])

    def close(self) -> None:
        self.board.close()
