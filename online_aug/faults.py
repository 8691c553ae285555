"""Faults a long run survives: stop signals, a dying or hung producer, a diverging loss; and their exit statuses.

- :class:`StopSignals`: SIGTERM / SIGUSR1 (``run.stop_signals``) and Ctrl-C ask for a clean stop: the step in flight
  finishes, every rank checkpoints, TensorBoard and summary.csv are flushed, the producer stops, and the process
  exits with :data:`EXIT_STOPPED`. A repeat within :data:`REPEAT_S` is the same request (a launcher forwarding the
  signal it got, or a signal sent to the whole process group); a signal after that exits at once with 128 + signum.
- :class:`StopControl`: what this rank wants (nothing, stop for a signal, stop for a fault), agreed by every rank at
  each step boundary, so all ranks stop after the same step (a CPU all-reduce; none with one process).
- :class:`DivergenceGuard`: a non-finite loss (or one above ``train.max_loss``) skips the micro-batch on every rank
  (no backward, no optimizer step; BatchNorm statistics restored); ``train.max_bad_steps`` in a row stop the run.
- Test seams: :data:`INJECTORS`, filled by :mod:`online_aug.testing.faults` only when ``ONLINE_AUG_INJECT_FAULT``
  is set, makes a real process fail at a chosen point (tests/test_faults.py).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# Exit statuses of train.py (README "Faults"): 0 finished, 2 config error, and
EXIT_FAULT = 3  # stopped by a fault (producer, divergence, checkpoint write); a checkpoint of the last good step
EXIT_STOPPED = 75  # stopped by a signal after saving a checkpoint (EX_TEMPFAIL: resume with --resume)
# a second signal exits at once with 128 + signum (130 for Ctrl-C, 143 for SIGTERM), without a checkpoint

REPEAT_S = 2.0  # a repeat of the signal within this many seconds is the same request, not a second signal


class RunStopped(Exception):
    """The run stopped early and cleanly (checkpoint saved unless the message says otherwise); ``status`` is the
    process exit status train.py returns."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- signals


class StopSignals:
    """Handlers for ``names`` plus SIGINT while installed; :attr:`received` names the first signal."""

    def __init__(self, names: list[str] | tuple[str, ...]):
        self.signals = [getattr(signal, n) for n in dict.fromkeys([*names, "SIGINT"]) if hasattr(signal, n)]
        self.received: str | None = None
        self._first = 0.0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a trainer built elsewhere keeps the defaults
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received is None:
            self.received, self._first = name, now
            _say(f"\nreceived {name}: finishing the current step, then checkpoint and exit "
                 f"(a second signal exits at once, without a checkpoint)\n")
        elif now - self._first > REPEAT_S:
            _say(f"\nreceived {name} again: exiting now, without a checkpoint (status {128 + signum})\n")
            os._exit(128 + signum)


def _say(text: str) -> None:
    """Write from a signal handler: os.write, not print (print may be mid-write on the same stream)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


# ---------------------------------------------------------------- agreement across ranks

NONE, SIGNAL, FAULT = 0, 1, 2


def cpu_group(world: int) -> Any:
    """A process group whose collectives run on the CPU (the default group when it is gloo; None for one rank).
    Call on every rank, in the same order as DeepSpeed's own groups."""
    if world <= 1 or not dist.is_initialized():
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _all_max(value: int, group: Any) -> int:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


class StopControl:
    """This rank's stop request (:data:`SIGNAL`, :data:`FAULT`) and the one every rank agrees on."""

    def __init__(self, signals: StopSignals, group: Any):
        self.signals, self.group = signals, group
        self.code, self.reason = NONE, ""

    def request(self, code: int, reason: str) -> None:
        if code > self.code:
            self.code, self.reason = code, reason

    def agree(self) -> int:
        """The highest request over all ranks (one small CPU all-reduce per call on several ranks)."""
        if self.signals.received and self.code < SIGNAL:
            self.request(SIGNAL, f"stopped by {self.signals.received}")
        code = _all_max(self.code, self.group)
        if code > self.code:
            self.request(code, "another rank " + ("received a stop signal" if code == SIGNAL else "hit a fault"))
        return code


# ---------------------------------------------------------------- divergence


def guard_interval(every: int, device: torch.device | str, log_every: int) -> int:
    """``train.guard_every`` as the run uses it: a set value (>= 1) as it is; 0 (auto) reads the loss every
    micro-batch where that read is free (exact skipping: CPU and other synchronous devices) and every
    ``train.log_every`` steps on CUDA, where a per-step host read would stall the launch queue once per step."""
    if every > 0:
        return every
    return max(1, int(log_every)) if torch.device(device).type == "cuda" else 1


class DivergenceGuard:
    """Checks each micro-batch's loss before its backward (:meth:`check`: one host read of the loss per micro-batch,
    a device sync on GPU), or, with ``every`` > 1 (``train.guard_every``), on the device only (:meth:`observe`, no
    sync) with one host read per ``every`` optimizer steps (:meth:`poll`). A bad loss found by ``poll`` has already
    reached the weights: the caller stops without saving them."""

    def __init__(self, module: torch.nn.Module, max_bad: int, max_loss: float, group: Any, every: int = 1):
        self.max_bad, self.max_loss, self.group, self.every = max_bad, max_loss, group, every
        self.pending: torch.Tensor | None = None  # [2] on the device: bad micro-batches since the last poll, last bad
        self.buffers = list(module.buffers())  # BatchNorm statistics: the forward of a bad batch changed them
        self.snapshot = [b.detach().clone() for b in self.buffers]
        self.in_a_row = 0
        self.skipped = 0  # over the whole run (restored on resume)
        self.last_bad = math.nan

    @torch.no_grad()
    def before_forward(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.snapshot, self.buffers)

    @torch.no_grad()
    def check(self, loss: torch.Tensor) -> bool:
        """True when this micro-batch is bad on any rank: the caller skips it (buffers are restored here)."""
        value = float(loss.detach())
        bad = not math.isfinite(value) or (self.max_loss > 0 and value > self.max_loss)
        bad = bool(_all_max(int(bad), self.group))
        if not bad:
            self.in_a_row = 0
            return False
        self.restore()
        self.in_a_row += 1
        self.skipped += 1
        self.last_bad = value
        return True

    @torch.no_grad()
    def observe(self, loss: torch.Tensor) -> None:
        """Interval mode: count a bad loss on the device (no host read)."""
        value = loss.detach().float().reshape(())
        bad = ~torch.isfinite(value)
        if self.max_loss > 0:
            bad = bad | (value > self.max_loss)
        if self.pending is None:
            self.pending = torch.zeros(2, device=value.device)
        self.pending[0] += bad.float()
        self.pending[1] = torch.where(bad, value, self.pending[1])

    def poll(self) -> bool:
        """Interval mode: True when any rank saw a bad loss since the last poll (one host read, then reset)."""
        if self.pending is None:
            return False
        n, last = self.pending.tolist()  # the one sync of the interval
        self.pending.zero_()
        bad = bool(_all_max(int(n > 0), self.group))
        if bad:
            self.in_a_row, self.skipped = self.in_a_row + int(n), self.skipped + int(n)
            self.last_bad = last if n else math.nan
        return bad

    @torch.no_grad()
    def restore(self) -> None:
        """The buffers as they were before the forward (:meth:`before_forward`)."""
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.snapshot)

    @property
    def tripped(self) -> bool:
        return self.in_a_row >= self.max_bad


# ---------------------------------------------------------------- producer faults


def source_fault(source: Any) -> BaseException | None:
    """The producer fault of a batch source (a :class:`~online_aug.prefetch.Prefetcher`, possibly wrapped), if any."""
    while source is not None:
        fault = getattr(source, "fault", None)
        if fault is not None:
            return fault
        source = getattr(source, "inner", None)
    return None


def out_of_memory(err: BaseException | None) -> bool:
    """CUDA out-of-memory (torch's error class, or its message from another layer)."""
    while err is not None:
        if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
            return True
        err = err.__cause__
    return False


# ---------------------------------------------------------------- test seams

INJECT_ENV = "ONLINE_AUG_INJECT_FAULT"
# Fault injectors by hook point ("checkpoint", "augment", "source"): empty in every real run. train.py fills it through
# online_aug.testing.faults.install() when INJECT_ENV is set (tests/test_faults.py runs train.py processes that fail
# at a chosen point); the runtime only calls the seams below and never imports the testing package.
INJECTORS: dict[str, Callable[..., Any]] = {}


def inject_into_checkpoint(engine: Any, step: int) -> None:
    if (hook := INJECTORS.get("checkpoint")) is not None:
        hook(engine, step)


def inject_into_augment(augment: Any) -> Any:
    hook = INJECTORS.get("augment")
    return augment if hook is None else hook(augment)


def inject_into_source(source: Any) -> Any:
    hook = INJECTORS.get("source")
    return source if hook is None else hook(source)
