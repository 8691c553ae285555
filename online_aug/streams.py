"""The stream contract of the CUDA path, in one place: streams and events, and the seam that makes it testable on CPU.

The producer (:mod:`online_aug.prefetch`) and the trainer order their work with ``Stream`` / ``Event`` /
``stream()`` / ``current_stream()`` from here, never from ``torch.cuda`` directly. On CUDA they are torch's. Without
CUDA there are no streams (``None``) and the code runs with a thread only, unless a test has installed a fake device
(:func:`online_aug.testing.hazards.checking`): then every call here goes to fake streams and events whose ordering a
dispatch mode checks, so a missing ``wait_event`` or ``wait_stream``, a silent data race on the real path, is an
exception on a CPU. This module only calls the fake device; it never imports the testing package.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

# The fake device while a test checks stream ordering on CPU (an object with ``stream(name)``, ``event()`` and
# ``current()``); None in every real run.
_fake: Any = None


def active(device: torch.device) -> bool:
    """Whether work on ``device`` is ordered with streams (CUDA, or the CPU checking mode)."""
    return torch.device(device).type == "cuda" or _fake is not None


def Stream(device: torch.device) -> Any:  # noqa: N802 - mirrors torch.cuda.Stream
    """A new stream on ``device`` (a fake one in checking mode); None where there are no streams."""
    if _fake is not None:
        return _fake.stream("side")
    return torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None


def Event(blocking: bool = True) -> Any:  # noqa: N802 - mirrors torch.cuda.Event
    """An event; ``blocking``: a host ``synchronize()`` sleeps instead of spinning (the producer thread waits on its
    own events; a spinning waiter would hold a core the trainer's launches need)."""
    if _fake is not None:
        return _fake.event()
    return torch.cuda.Event(blocking=blocking)


def current_stream(device: torch.device) -> Any:
    """This thread's current stream on ``device``; None where there are no streams."""
    if _fake is not None:
        return _fake.current()
    return torch.cuda.current_stream(device) if torch.device(device).type == "cuda" else None


def stream(s: Any) -> contextlib.AbstractContextManager:
    """Make ``s`` this thread's current stream (no-op for None). A fake stream makes itself current (and enters the
    hazard checker in this thread: dispatch modes are per thread)."""
    if s is None:
        return contextlib.nullcontext()
    make_current = getattr(s, "make_current", None)  # fake streams only; torch.cuda.Stream has no such method
    if make_current is not None:
        return make_current()
    return torch.cuda.stream(s)


def set_device(device: torch.device) -> None:
    """A new thread starts on CUDA device 0: a producer for another rank's device must select it first."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def wait(consumer_device: torch.device, event: Any) -> None:
    """Order this thread's current stream after ``event`` (a device-side wait, never a host sync)."""
    if event is not None:
        current_stream(consumer_device).wait_event(event)
