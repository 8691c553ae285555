"""Fake streams and the stream-hazard checker: the CUDA path's ordering, checked on CPU (tests only).

Under :func:`checking`, :mod:`online_aug.streams` hands out fake streams: every thread has a current one, events carry
vector clocks (``record`` snapshots the stream's clock, ``wait_event`` merges it), and a ``TorchDispatchMode`` entered
in every thread that uses a stream records, per storage, the last writer (stream, tick) and the readers since; a read
of a write the reading stream has not waited for, or a write over a read the writing stream has not waited for, raises
:class:`StreamHazard` at the offending op. That is exactly the ordering CUDA needs and does not check: a missing
``wait_event`` or ``wait_stream`` on the real path is a silent data race, here it is an exception with both stream
names.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from online_aug import streams


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

    def make_current(self) -> contextlib.AbstractContextManager:
        """What :func:`online_aug.streams.stream` enters for a fake stream."""
        return _fake_stream_ctx(self)


class FakeEvent:
    def __init__(self) -> None:
        self.vc: dict[int, int] | None = None

    def record(self, s: FakeStream | None = None) -> None:
        s = s or current()
        with s.lock:
            self.vc = dict(s.vc)

    def synchronize(self) -> None: ...  # the fake device runs every op at once, on the host

    def query(self) -> bool:
        return True


DEFAULT = FakeStream("default")  # like CUDA's default stream, shared by every thread that did not pick another
_tls = threading.local()
_CHECKER: HazardChecker | None = None


def current() -> FakeStream:
    """This thread's current fake stream."""
    return getattr(_tls, "stream", None) or DEFAULT


@contextlib.contextmanager
def _fake_stream_ctx(s: FakeStream) -> Iterator[None]:
    prev = getattr(_tls, "stream", None)
    _tls.stream = s
    try:
        with _CHECKER.in_thread() if _CHECKER is not None else contextlib.nullcontext():
            yield
    finally:
        _tls.stream = prev


class _FakeDevice:
    """What :mod:`online_aug.streams` calls while :func:`checking` is on."""

    stream = staticmethod(FakeStream)
    event = staticmethod(FakeEvent)
    current = staticmethod(current)


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
        s = current()
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
    """Fake streams for every ``streams.active`` device, and the hazard checker in this thread and in every thread
    that enters :func:`online_aug.streams.stream`."""
    global _CHECKER
    if _CHECKER is not None:
        raise RuntimeError("hazards.checking() is already on")
    checker = HazardChecker()
    _CHECKER = checker
    streams._fake = _FakeDevice
    try:
        with checker.in_thread():
            yield checker
    finally:
        streams._fake = None
        _CHECKER = None
