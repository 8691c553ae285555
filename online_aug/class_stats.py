"""Live per-class statistics of the classifier being trained, and the snapshots the adaptive policy reads.

The closed loop (``aug.adaptive``): the trainer's own forward pass on every micro-batch (no extra forward) feeds
:class:`ClassStats`; at every ``aug.adaptive_every`` optimizer steps it publishes a :class:`Snapshot` to a
:class:`SnapshotBoard`; the augmentation producer plans micro-step k with the snapshot published at the last boundary
at or before k − lag, lag = queue depth + 2 micro-steps (see :func:`required_boundary`). That snapshot is a function
of k alone, so the prefetcher, the synchronous path and a resumed run make the same batches; the producer is never
more than D + 1 micro-steps ahead of the trainer, so in steady state it never waits for a snapshot. The cost is
staleness: a plan uses statistics between lag and lag + interval micro-steps old.

Accumulation is on device with index_add (no boolean indexing, no ``.item()``): no host sync on the hot path. The
one sync per interval is the all-reduce + copy to the CPU snapshot at publication.

This module is a leaf (torch and the config's error only): the policy reads snapshots, the trainer writes them,
neither imports the other.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError

_POLL_S = 0.05


@dataclass(frozen=True)
class Snapshot:
    """Per-class statistics at a boundary (CPU tensors). EMAs over snapshots; classes never seen keep the prior."""

    micro_step: int  # the micro-step after which it was published (-1: the prior, before any statistics)
    loss: torch.Tensor  # [C] EMA cross-entropy on real samples
    acc: torch.Tensor  # [C] EMA accuracy on real samples (the classifier's per-class recall)
    confusion: torch.Tensor  # [C, C] EMA of row-normalised confusion counts (row: true class, column: predicted)
    edit_acc: torch.Tensor  # [C] EMA fraction of edits toward class c that the classifier predicts as c

    @staticmethod
    def prior(num_classes: int) -> Snapshot:
        c = num_classes
        return Snapshot(micro_step=-1, loss=torch.zeros(c), acc=torch.full((c,), 0.5), confusion=torch.eye(c),
                        edit_acc=torch.full((c,), 0.5))

    @staticmethod
    def from_state(state: dict) -> Snapshot:
        """A snapshot from :meth:`state_dict`; checkpoints written before the field was named ``micro_step`` call it
        ``step``."""
        state = dict(state)
        if "step" in state:
            state["micro_step"] = state.pop("step")
        return Snapshot(**state)

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "loss": self.loss, "acc": self.acc, "confusion": self.confusion,
                "edit_acc": self.edit_acc}


class ClassStats:
    """Device-side sums over an interval, folded into EMAs at :meth:`publish`."""

    def __init__(self, num_classes: int, ema: float, device: torch.device):
        self.c, self.ema, self.device = num_classes, ema, device
        c = num_classes
        # one flat buffer: [loss_sum C | correct C | count C | edit_hit C | edit_count C | confusion C*C], so the
        # interval's all-reduce is a single collective
        self.sums = torch.zeros(5 * c + c * c, device=device, dtype=torch.float64)
        self.snapshot = Snapshot.prior(c)

    def _views(self) -> tuple[torch.Tensor, ...]:
        c = self.c
        s = self.sums
        return s[:c], s[c:2 * c], s[2 * c:3 * c], s[3 * c:4 * c], s[4 * c:5 * c], s[5 * c:].view(c, c)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, edit_target: torch.Tensor | None) -> None:
        """``logits`` [B, C] of the micro-batch; ``labels`` [B] its real (source) classes; ``edit_target`` [B] the
        target class of edited rows and -1 for real rows (None: all real). All on ``self.device``; no sync."""
        loss_sum, correct, count, edit_hit, edit_count, conf = self._views()
        logits = logits.detach().float()
        labels = labels.to(self.device, non_blocking=True).long()
        pred = logits.argmax(-1)
        if edit_target is None:
            real = torch.ones_like(labels, dtype=torch.float64)
        else:
            edit_target = edit_target.to(self.device, non_blocking=True).long()
            real = (edit_target < 0).double()
            edit = 1.0 - real
            tgt = edit_target.clamp(min=0)
            edit_count.index_add_(0, tgt, edit)
            edit_hit.index_add_(0, tgt, (pred == tgt).double() * edit)
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
        loss_sum.index_add_(0, labels, ce * real)
        correct.index_add_(0, labels, (pred == labels).double() * real)
        count.index_add_(0, labels, real)
        conf.index_put_((labels, pred), real, accumulate=True)

    @torch.no_grad()
    def publish(self, micro_step: int) -> Snapshot:
        """All-reduce the interval's sums (multi-rank), fold them into the EMAs, reset; one host sync."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
        loss_sum, correct, count, edit_hit, edit_count, conf = (v.cpu() for v in self._views())
        prev, b = self.snapshot, self.ema
        seen, eseen = count > 0, edit_count > 0
        n, en = count.clamp(min=1), edit_count.clamp(min=1)

        def fold(old: torch.Tensor, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            m = mask.view(-1, *([1] * (old.dim() - 1)))
            return torch.where(m, b * old + (1 - b) * new.float(), old)

        rows = conf / conf.sum(1, keepdim=True).clamp(min=1)
        self.snapshot = Snapshot(micro_step=micro_step, loss=fold(prev.loss, loss_sum / n, seen),
                                 acc=fold(prev.acc, correct / n, seen), confusion=fold(prev.confusion, rows, seen),
                                 edit_acc=fold(prev.edit_acc, edit_hit / en, eseen))
        self.sums.zero_()
        return self.snapshot

    def state_dict(self) -> dict:
        return {"num_classes": self.c, "sums": self.sums.cpu(), "snapshot": self.snapshot.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_classes"]) != self.c:
            raise ConfigError(f"aug.adaptive: the checkpoint's statistics have {state['num_classes']} classes, this "
                             f"run has {self.c}; resume with the same data or start a new run")
        self.sums.copy_(state["sums"].to(self.device))
        self.snapshot = Snapshot.from_state(state["snapshot"])


def required_boundary(micro_step: int, every: int, lag: int) -> int:
    """The publication micro-step whose snapshot plans micro-step ``micro_step``: the last m = j*every - 1 (j >= 1) with
    m <= micro_step - lag, or -1 (the prior) when there is none yet. ``every`` is in micro-steps."""
    j = (micro_step - lag + 1) // every
    return j * every - 1 if j >= 1 else -1


class SnapshotBoard:
    """Published snapshots by micro-step, shared by the trainer (writer) and the producer (reader)."""

    def __init__(self, num_classes: int, every: int, lag: int, keep: int = 4):
        self.every, self.lag, self.keep = every, lag, keep
        self._snaps: dict[int, Snapshot] = {-1: Snapshot.prior(num_classes)}
        self._cond = threading.Condition()
        self._closed = False

    def put(self, snap: Snapshot) -> None:
        with self._cond:
            self._snaps[snap.micro_step] = snap
            for k in sorted(self._snaps)[:-self.keep]:
                if k != -1:
                    del self._snaps[k]
            self._cond.notify_all()

    def for_step(self, micro_step: int, timeout: float | None = None) -> Snapshot:
        """The snapshot that plans micro-step ``micro_step``; waits until the trainer has published it."""
        want = required_boundary(micro_step, self.every, self.lag)
        with self._cond:
            while want not in self._snaps:
                if self._closed:
                    raise RuntimeError(f"snapshot board closed while micro-step {micro_step} waited for boundary "
                                       f"{want}")
                if want < max(self._snaps):
                    raise RuntimeError(f"snapshot of micro-step {want} was pruned (board keeps {self.keep})")
                if not self._cond.wait(timeout=_POLL_S if timeout is None else timeout) and timeout is not None:
                    raise TimeoutError(f"no snapshot for boundary {want} after {timeout} s")
            return self._snaps[want]

    def close(self) -> None:
        """Wake a waiting producer so it can stop (end of training or an error)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def state_dict(self) -> dict:
        with self._cond:
            return {k: v.state_dict() for k, v in self._snaps.items()}

    def load_state_dict(self, state: dict) -> None:
        with self._cond:
            self._snaps = {int(k): Snapshot.from_state(v) for k, v in state.items()}
            self._cond.notify_all()
