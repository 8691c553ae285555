"""The stream contract of the CUDA path, in one place: streams, events, and the checks that make it testable on CPU.

The producer (:mod:`online_aug.prefetch`) and the trainer order their work with ``Stream`` / ``Event`` /
``stream()`` / ``current_stream()`` from here, never from ``torch.cuda`` directly. On CUDA they are torch's. Without
CUDA there are no streams (``None``) and the code runs with a thread only, unless :func:`checking` is on (tests):
then every thread has a current *fake* stream, events carry vector clocks (``record`` snapshots the stream's clock,
``wait_event`` merges it), and a ``TorchDispatchMode`` entered in every thread that uses a stream records, per
storage, the last writer (stream, tick) and the readers since; a read of a write the reading stream has not waited
for, or a write over a read the writing stream has not waited for, raises :class:`StreamHazard` at the offending op.
That is exactly the ordering CUDA needs and does not check: a missing ``wait_event`` or ``wait_stream`` on the real
path is a silent data race, here it is an exception with both stream names.

:class:`SyncLint` is the other half: a ``TorchFunctionMode`` that records every host-device sync (``.item()``,
``bool()``, ``int()``, ``float()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``nonzero``, ``torch.tensor(...,
device=...)``, blocking host-to-device copies) made by this package's code, with the call site.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ---------------------------------------------------------------- the shim


def active(device: torch.device) -> bool:
    """Whether work on ``device`` is ordered with streams (CUDA, or the CPU checking mode)."""
    return torch.device(device).type == "cuda" or _CHECKER is not None


def Stream(device: torch.device) -> Any:  # noqa: N802 - mirrors torch.cuda.Stream
    """A new stream on ``device`` (a fake one in checking mode); None where there are no streams."""
    if _CHECKER is not None:
        return FakeStream("side")
    return torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None


def Event(blocking: bool = True) -> Any:  # noqa: N802 - mirrors torch.cuda.Event
    """An event; ``blocking``: a host ``synchronize()`` sleeps instead of spinning (the producer thread waits on its
    own events; a spinning waiter would hold a core the trainer's launches need)."""
    if _CHECKER is not None:
        return FakeEvent()
    return torch.cuda.Event(blocking=blocking)


def current_stream(device: torch.device) -> Any:
    """This thread's current stream on ``device``; None where there are no streams."""
    if _CHECKER is not None:
        return _current()
    return torch.cuda.current_stream(device) if torch.device(device).type == "cuda" else None


def stream(s: Any) -> contextlib.AbstractContextManager:
    """Make ``s`` this thread's current stream (no-op for None). In checking mode this also enters the hazard
    checker in this thread (dispatch modes are per thread)."""
    if s is None:
        return contextlib.nullcontext()
    if isinstance(s, FakeStream):
        return _fake_stream_ctx(s)
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


# ---------------------------------------------------------------- fake streams (checking mode)


class StreamHazard(RuntimeError):
    """An access on one stream that is not ordered after a conflicting access on another."""


_ids = itertools.count()


class FakeStream:
    """A stream whose ``vc`` (vector clock: stream id -> tick) says how much of every stream it is ordered after."""

    def __init__(self, name: str):
        self.id, self.name = next(_ids), name
        self.vc: dict[int, int] = {self.id: 0}
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<stream {self.name}#{self.id}>"

    def tick(self) -> int:
        with self.lock:
            self.vc[self.id] += 1
            return self.vc[self.id]

    def wait_event(self, event: FakeEvent) -> None:
        if event.vc is None:  # CUDA: waiting on an event never recorded is a no-op
            return
        with self.lock:
            for k, v in event.vc.items():
                self.vc[k] = max(self.vc.get(k, 0), v)

    def wait_stream(self, other: FakeStream) -> None:
        ev = FakeEvent()
        ev.record(other)
        self.wait_event(ev)

    def synchronize(self) -> None: ...


class FakeEvent:
    def __init__(self) -> None:
        self.vc: dict[int, int] | None = None

    def record(self, s: FakeStream | None = None) -> None:
        s = s or _current()
        with s.lock:
            self.vc = dict(s.vc)

    def synchronize(self) -> None: ...  # the fake device runs every op at once, on the host

    def query(self) -> bool:
        return True


_DEFAULT = FakeStream("default")  # like CUDA's default stream, shared by every thread that did not pick another
_tls = threading.local()
_CHECKER: HazardChecker | None = None


def _current() -> FakeStream:
    return getattr(_tls, "stream", None) or _DEFAULT


@contextlib.contextmanager
def _fake_stream_ctx(s: FakeStream) -> Iterator[None]:
    prev = getattr(_tls, "stream", None)
    _tls.stream = s
    try:
        with _CHECKER.in_thread() if _CHECKER is not None else contextlib.nullcontext():
            yield
    finally:
        _tls.stream = prev


class HazardChecker(TorchDispatchMode):
    """Per storage: the last write (stream, tick, op) and the reads since; raises :class:`StreamHazard` on an
    unordered read-after-write, write-after-write or write-after-read between two streams."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.writes: dict[int, tuple[FakeStream, int, str]] = {}
        self.reads: dict[int, dict[FakeStream, int]] = {}
        self.ops = 0

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[None]:
        """Enter the mode in this thread unless it already is (TorchDispatchMode stacks are thread-local)."""
        if getattr(_tls, "checking", False):
            yield
            return
        _tls.checking = True
        try:
            with self:
                yield
        finally:
            _tls.checking = False

    @staticmethod
    def _key(t: torch.Tensor) -> int | None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        return st.data_ptr() if st.nbytes() else None

    def _ordered(self, s: FakeStream, other: FakeStream, tick: int) -> bool:
        return other is s or s.vc.get(other.id, 0) >= tick

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        s = _current()
        name = str(func.overloadpacket.__name__)
        reads: list[torch.Tensor] = []
        writes: list[torch.Tensor] = []
        for i, arg in enumerate(func._schema.arguments):
            val = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
            tensors = [t for t in tree_flatten(val)[0] if isinstance(t, torch.Tensor)]
            (writes if arg.alias_info is not None and arg.alias_info.is_write else reads).extend(tensors)
        tick = s.tick()
        with self.lock:
            self.ops += 1
            for t in reads:
                k = self._key(t)
                if k is None:
                    continue
                w = self.writes.get(k)
                if w is not None and not self._ordered(s, w[0], w[1]):
                    raise StreamHazard(f"{s} reads a tensor that {w[0]} wrote ({w[2]}) without waiting for it: a "
                                       f"wait_event / wait_stream is missing (op {name})")
                self.reads.setdefault(k, {})[s] = tick
            for t in writes:
                k = self._key(t)
                if k is None:
                    continue
                w = self.writes.get(k)
                if w is not None and not self._ordered(s, w[0], w[1]):
                    raise StreamHazard(f"{s} overwrites a tensor that {w[0]} wrote ({w[2]}) without waiting for it "
                                       f"(op {name})")
                for r, rt in self.reads.get(k, {}).items():
                    if not self._ordered(s, r, rt):
                        raise StreamHazard(f"{s} overwrites a tensor that {r} may still be reading: it did not wait "
                                           f"for the reader's release event (op {name})")
                self.writes[k], self.reads[k] = (s, tick, name), {}
        out = func(*args, **kwargs)
        fresh = [i for i, r in enumerate(func._schema.returns) if r.alias_info is None]  # not a view / in-place
        flat = out if isinstance(out, (tuple, list)) else (out,)
        with self.lock:
            for i in fresh:
                if i < len(flat):
                    for t in tree_flatten(flat[i])[0]:
                        if isinstance(t, torch.Tensor) and (k := self._key(t)) is not None:
                            self.writes[k], self.reads[k] = (s, tick, name), {}
        return out


@contextlib.contextmanager
def checking() -> Iterator[HazardChecker]:
    """Tests: fake streams for every ``active`` device, and the hazard checker in this thread and in every thread
    that enters :func:`stream`."""
    global _CHECKER
    if _CHECKER is not None:
        raise RuntimeError("streams.checking() is already on")
    checker = HazardChecker()
    _CHECKER = checker
    try:
        with checker.in_thread():
            yield checker
    finally:
        _CHECKER = None


# ---------------------------------------------------------------- sync lint

PACKAGE = Path(__file__).resolve().parent
_TORCH = Path(torch.__file__).resolve().parent
# torch hands the mode the C methods (TensorBase.item, ...): match by name
_SYNCING = {"item": ".item()", "tolist": ".tolist()", "cpu": ".cpu()", "numpy": ".numpy()", "__bool__": "bool()",
            "__int__": "int()", "__float__": "float()", "__index__": "index()", "nonzero": "nonzero",
            "unique": "unique"}
_FACTORIES = {"tensor": "torch.tensor(..., device=)", "as_tensor": "torch.as_tensor(..., device=)"}


class SyncLint(TorchFunctionMode):
    """Records host-device syncs whose nearest caller outside torch is in this package (``found``: list of (what,
    'file:line')). Calls from other libraries (DeepSpeed, timm) are kept apart in ``external``.

    A copy counts when it is host-to-device without ``non_blocking=True``; a tensor factory when it is given a
    non-CPU ``device`` (the data travels from the host with a sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self.external: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = self._what(func, args, kwargs)
        if what:
            self._record(what)
        return func(*args, **kwargs)

    @staticmethod
    def _what(func, args, kwargs) -> str | None:
        name = getattr(func, "__name__", "")
        if name in _SYNCING:
            return _SYNCING[name]
        if name in _FACTORIES and not args or name in _FACTORIES and not isinstance(args[0], torch.Tensor):
            dev = kwargs.get("device")
            return _FACTORIES[name] if dev is not None and torch.device(dev).type != "cpu" else None
        if name in ("to", "cuda", "copy_") and args and isinstance(args[0], torch.Tensor):
            copy = name == "copy_"
            src = args[1] if copy and len(args) > 1 else args[0]
            dst = args[0].device if copy else _target_device(name, args, kwargs)
            blocking = not kwargs.get("non_blocking", False) and not (copy and len(args) > 2 and args[2]) and not (
                name == "to" and any(a is True for a in args[1:]))
            if (isinstance(src, torch.Tensor) and dst is not None and src.device.type == "cpu"
                    and dst.type != "cpu" and blocking):
                return "blocking host-to-device copy"
        return None

    def _record(self, what: str) -> None:
        for frame in reversed(traceback.extract_stack()[:-1]):
            path = Path(frame.filename).resolve()
            if path.is_relative_to(_TORCH) or path == Path(__file__).resolve():
                continue
            where = f"{path.name}:{frame.lineno}"
            (self.found if path.is_relative_to(PACKAGE) else self.external).append((what, where))
            return


def _target_device(name: str, args, kwargs) -> torch.device | None:
    if name == "cuda":
        return torch.device("cuda")
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, (torch.device, str)):
            try:
                return torch.device(a)
            except RuntimeError:
                return None
        if isinstance(a, torch.Tensor):
            return a.device
    return None
