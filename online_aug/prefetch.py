"""The prefetch queue: a background producer that augments micro-batches ahead of the trainer.

On CUDA the producer runs on its own stream (through :mod:`online_aug.streams`, the one home of the stream
contract). Before it starts, that stream waits on the creating thread's stream: the prompt-embedding cache, the CLIP
filter's text embeddings and the guard bank were made there. Each batch is written into a preallocated ring of
output buffers and handed over with an ``Event``; ``next()`` makes the consumer's stream wait on that event only
(never a device-wide synchronize), and ``release`` records a "released" event that the producer's stream waits on
before it reuses the slot. That replaces ``record_stream``: tensors made on the side stream never reach the trainer's
stream. The ring is only safe if the consumer releases batch k before asking for k+1: ``next()`` raises otherwise.
On CPU the same code runs with a thread and no streams; ``online_aug.testing.hazards.checking()`` (tests) runs it with
fake streams and raises on any unordered access.

Starvation policy when the queue is empty: ``wait`` blocks (α stays exact); ``real`` trains on the next real
batch instead (the effective α, logged as ``aug/effective_alpha``, drops below α).
A producer exception reaches the trainer's thread, with its traceback chained; ``close`` joins the thread.
Faults (README "Faults"): a producer that dies, or whose step runs longer than ``timeout_s`` (``aug.timeout_s``), is
recorded in :attr:`Prefetcher.fault`. With ``on_fault="stop"`` the next ``next()`` raises it; with ``"real"`` the
batches already made are used, then real ones (``aug/producer_fault`` = 1), and the caller decides (the trainer
stops at the step boundary unless ``aug.on_fault=real``). A hung producer thread is abandoned (it is a daemon).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from . import streams
from .batches import Batch, loader_extras, no_edit_stats, real_batch
from .config import OnFault
from .faults import out_of_memory

_POLL_S = 0.05  # how often blocked threads re-check for shutdown or a dead producer
_UNLABELLED = ("u_weak", "u_strong")  # Batch fields of the ssl.source rows, when a batch has them


class ProducerError(RuntimeError):
    """The augmentation producer failed; the original exception is the ``__cause__``."""


class ProducerTimeout(ProducerError):
    """A producer step (fetch + edit of one micro-batch) ran longer than ``timeout_s``."""


class _Ring:
    """Preallocated output slots for the stream hand-off, each with a 'released by the trainer' event."""

    def __init__(self, n: int):
        self.n, self.slots, self.released, self.next = n, [None] * n, [None] * n, 0

    def put(self, batch: Batch, stream) -> Batch:
        i = self.next
        self.next = (i + 1) % self.n
        if self.released[i] is not None:
            stream.wait_event(self.released[i])  # the trainer's last use of this slot is done (device-side wait)
        if self.slots[i] is None:
            edit_target = batch.edit_target if batch.edit_target is not None else torch.empty(0)
            self.slots[i] = (torch.empty_like(batch.images), torch.empty_like(batch.targets),
                             torch.empty_like(edit_target, device=batch.images.device),
                             {k: torch.empty_like(getattr(batch, k)) for k in _UNLABELLED
                              if getattr(batch, k) is not None})
        images, targets, edit_target, unlabelled = self.slots[i]
        images.copy_(batch.images, non_blocking=True)
        targets.copy_(batch.targets, non_blocking=True)
        if batch.edit_target is not None:  # read by the trainer's statistics: it lives in the ring like the rest
            edit_target.copy_(batch.edit_target, non_blocking=True)
            batch.edit_target = edit_target
        for k, buf in unlabelled.items():  # ssl.source: the unlabelled views live in the ring too
            buf.copy_(getattr(batch, k), non_blocking=True)
            setattr(batch, k, buf)
        ready = streams.Event()
        ready.record(stream)
        batch.images, batch.targets, batch.ready = images, targets, ready
        batch.slot = i
        return batch

    def release(self, batch: Batch) -> None:
        ev = streams.Event()
        ev.record(streams.current_stream(batch.images.device))
        self.released[batch.slot] = ev


class Prefetcher:
    """Iterator of augmented :class:`Batch` es, produced ``depth`` ahead by a background thread."""

    def __init__(self, loader, augment: Callable[[torch.Tensor, torch.Tensor, int], Batch], device: torch.device,
                 depth: int = 2, starvation: str = "wait", start: int = 0, num_classes: int | None = None,
                 timeout_s: float | None = None, on_fault: OnFault = "stop"):
        """``augment(images, labels, micro_step) -> Batch`` (an :class:`~online_aug.augment.Augmenter`, which carries
        its ``num_classes``; a plain callable passes ``num_classes``, needed for the one-hot 'real' fallback).
        ``timeout_s``: longest producer step before it counts as hung (None: no limit); ``on_fault``: stop (raise the
        producer's error) | real (real batches)."""
        self.timeout_s, self.on_fault = timeout_s, on_fault
        self.fault: ProducerError | None = None  # the first fault; set by the consumer's thread
        self._busy_since: float | None = None  # monotonic start of the producer step in progress
        self.augment, self.device, self.starvation = augment, device, starvation  # aug.starvation: config-checked
        self.num_classes = num_classes if num_classes is not None else augment.num_classes
        self._it, self._lock, self._step = iter(loader), threading.Lock(), start
        self._queue: queue.Queue[Batch] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._held: Batch | None = None  # the ring batch handed out and not yet released
        ordered = streams.active(device)
        self._stream = streams.Stream(device) if ordered else None
        self._ring = _Ring(depth + 2) if ordered else None  # queue + one in use + one being written
        if self._stream is not None:
            # what the producer reads and this thread made (prompt cache, filter embeddings, guard bank) is ordered
            # before everything the producer's stream does
            self._stream.wait_stream(streams.current_stream(device))
        self._thread = threading.Thread(target=self._produce, name="online-aug-producer", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- producer side

    def _next_real(self) -> tuple[int, torch.Tensor, torch.Tensor, list]:
        """The loader is shared with the trainer's 'real' fallback, so each real batch is used exactly once. The
        fourth item holds what travels with the images to the generator (batches.loader_extras)."""
        with self._lock:
            x, y, *rest = next(self._it)
            k, self._step = self._step, self._step + 1
        return k, x, y, rest

    def _produce(self) -> None:
        try:
            streams.set_device(self.device)  # a new thread starts on device 0, whatever this rank's device is
            with streams.stream(self._stream), torch.no_grad():  # not inference_mode: the trainer backpropagates
                while not self._stop.is_set():
                    self._busy_since = time.monotonic()
                    k, x, y, rest = self._next_real()
                    t0 = time.perf_counter()
                    batch = self.augment(x.to(self.device, non_blocking=True), y, k,
                                         **loader_extras(rest, self.device))
                    if self._ring is not None:
                        made = streams.Event()
                        made.record(self._stream)
                        made.synchronize()  # this thread waits for its own stream only: true generation time,
                        gen_ms = 1000 * (time.perf_counter() - t0)  # without the wait for a slot to be released
                        batch = self._ring.put(batch, self._stream)
                        batch.ready.synchronize()  # a queued batch is a finished one (queue depth means work done)
                    else:
                        gen_ms = 1000 * (time.perf_counter() - t0)
                    batch.stats["aug/gen_ms"] = gen_ms
                    self._busy_since = None
                    while not self._stop.is_set():  # stop set meanwhile (a timeout was declared): drop the batch
                        try:
                            self._queue.put(batch, timeout=_POLL_S)
                            break
                        except queue.Full:
                            continue
        except BaseException as e:  # noqa: BLE001 - every failure must reach the trainer
            self._error = e

    # ----------------------------------------------------------------- consumer side

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        if self._held is not None:
            raise RuntimeError(
                f"Prefetcher: the batch of micro-step {self._held.micro_step} was not released before next(); its ring "
                f"slot would be overwritten while still in use. Call release(batch) once its last use is queued")
        t0 = time.perf_counter()
        depth = self._queue.qsize()
        if self._check() is not None:
            batch = self._after_fault()
        elif self.starvation == "real" and depth == 0:
            batch = self._real_batch()
        else:
            batch = self._get()
        batch.stats["aug/stall_ms"] = 1000 * (time.perf_counter() - t0)
        batch.stats["aug/queue_depth"] = float(depth)
        if batch.ready is not None:
            self._held = batch
            streams.wait(self.device, batch.ready)  # the consumer's stream, on this batch only (device side)
        return batch

    def _get(self) -> Batch:
        while True:
            if self._check() is not None:
                return self._after_fault()
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _check(self) -> ProducerError | None:
        """The fault, if the producer died or its step in progress is over ``timeout_s`` (recorded once)."""
        if self.fault is not None:
            return self.fault
        busy, alive = self._busy_since, self._thread.is_alive()
        error = self._error  # read after is_alive: a thread that died has set it
        if error is not None:
            hint = (" (the generator ran out of GPU memory: lower aug.queue_depth, aug.resolution or the "
                    "micro-batch)") if out_of_memory(error) else ""
            fault = ProducerError(f"online augmentation producer failed: {error!r}{hint}")
            fault.__cause__ = error
        elif self.timeout_s and busy is not None and time.monotonic() - busy > self.timeout_s:
            fault = ProducerTimeout(f"online augmentation producer hung: one generator step has run for more than "
                                    f"aug.timeout_s={self.timeout_s:g} s")
        elif not alive and not self._stop.is_set():
            fault = ProducerError("online augmentation producer stopped unexpectedly")
        else:
            return None
        self.fault = fault
        self._stop.set()  # a producer that comes back queues nothing more
        return fault

    def _after_fault(self) -> Batch:
        if self.on_fault == "stop":
            raise self.fault
        try:
            return self._queue.get_nowait()  # edits made before the fault are still good
        except queue.Empty:
            k, x, y, _ = self._next_real()
            return real_batch(x, y, k, self.num_classes, self.device,
                              {**no_edit_stats(), "aug/producer_fault": 1.0})

    def _real_batch(self) -> Batch:
        k, x, y, _ = self._next_real()
        return real_batch(x, y, k, self.num_classes, self.device, no_edit_stats())

    def release(self, batch: Batch) -> None:
        if self._ring is not None and batch.ready is not None:
            self._ring.release(batch)
            if batch is self._held:
                self._held = None

    def close(self) -> None:
        """Stop and join the producer (end of training, an error, or Ctrl-C); a hung one is left behind."""
        self._stop.set()
        hung = isinstance(self.fault, ProducerTimeout)
        self._thread.join(timeout=1 if hung else 60)
        if self._thread.is_alive() and not hung:
            raise ProducerError("online augmentation producer did not stop within 60 s")
