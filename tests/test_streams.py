"""The stream contract on CPU (online_aug/streams.py through online_aug/testing/hazards.py): fake per-thread streams
with vector clocks and a dispatch mode that raises on an unordered access. The prefetch tests run under it, and each
missing wait is caught."""

import threading

import pytest
import test_prefetch
import torch
from test_prefetch import FakeGenerator, _augmenter, _loader

from online_aug import streams
from online_aug.prefetch import Prefetcher, ProducerError
from online_aug.testing import hazards

CPU = torch.device("cpu")


def _in_thread(fn):
    """Run ``fn`` in a new thread; returns the exception it raised, if any."""
    err = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return err[0] if err else None


def test_unordered_read_and_write_after_read_raise_and_waits_fix_them():
    with hazards.checking():
        made = torch.ones(4)  # written on the default stream
        side = streams.Stream(CPU)

        def read():
            with streams.stream(side):
                return made * 2

        assert isinstance(_in_thread(read), hazards.StreamHazard)  # read-after-write, no wait
        side.wait_stream(streams.current_stream(CPU))
        assert _in_thread(read) is None

        _ = made + 1  # the default stream reads it again, after the side stream's last wait

        def overwrite(wait):
            with streams.stream(side):
                if wait:
                    ev = streams.Event()
                    ev.record(hazards.DEFAULT)
                    side.wait_event(ev)
                made.zero_()

        assert isinstance(_in_thread(lambda: overwrite(False)), hazards.StreamHazard)  # write-after-read
        assert _in_thread(lambda: overwrite(True)) is None


@pytest.mark.parametrize("name", ["test_prefetcher_equals_synchronous_path", "test_producer_exception_reaches_main_"
                                  "thread_quickly", "test_real_starvation_keeps_training_with_lower_effective_alpha",
                                  "test_wait_starvation_keeps_alpha_exact",
                                  "test_close_stops_a_blocked_producer_without_hanging"])
def test_prefetch_tests_pass_under_the_stream_checker(name):
    with hazards.checking() as checker:
        getattr(test_prefetch, name)()
    assert checker.ops > 0  # the checker saw the work, in both threads


class CachedEmbeds(FakeGenerator):
    """A generator with a cache made at build time on the creating thread's stream (like the prompt embeddings)."""

    def __init__(self):
        super().__init__()
        self.cache = torch.rand(4, 3, 1, 1)

    def edit(self, images, strengths, targets, generator=None):
        out, finite = super().edit(images, strengths, targets, generator)
        return (out + 0 * self.cache[targets]).clamp(0, 1), finite


def _consume(pre, n):
    for _ in range(n):
        b = next(pre)
        b.images.sum()  # the consumer reads the slot on its stream
        pre.release(b)


def test_the_producer_stream_waits_for_tensors_made_before_it_started(monkeypatch):
    with hazards.checking():
        pre = Prefetcher(_loader(), _augmenter(CachedEmbeds()), CPU, depth=1)
        try:
            _consume(pre, 4)
        finally:
            pre.close()
    # defect 2 of the CUDA review: without the side stream's wait on the creating stream, the cache read is caught
    monkeypatch.setattr(hazards.FakeStream, "wait_stream", lambda self, other: None)
    with hazards.checking():
        pre = Prefetcher(_loader(), _augmenter(CachedEmbeds()), CPU, depth=1)
        try:
            with pytest.raises(ProducerError) as info:
                _consume(pre, 4)
        finally:
            pre.close()
    assert isinstance(info.value.__cause__, hazards.StreamHazard) and "wait" in str(info.value.__cause__)


def test_a_ring_slot_reused_without_waiting_for_its_release_is_caught(monkeypatch):
    from online_aug import prefetch

    monkeypatch.setattr(prefetch._Ring, "release", lambda self, batch: None)  # the released event never reaches put
    with hazards.checking():
        pre = Prefetcher(_loader(), _augmenter(FakeGenerator()), CPU, depth=1)
        try:
            with pytest.raises(ProducerError) as info:
                _consume(pre, 8)  # 3 slots: the 4th batch overwrites the first one's slot
        finally:
            pre.close()
    assert isinstance(info.value.__cause__, hazards.StreamHazard)
    assert "may still be reading" in str(info.value.__cause__)


def test_a_consumer_that_does_not_wait_for_the_ready_event_is_caught(monkeypatch):
    monkeypatch.setattr(streams, "wait", lambda device, event: None)
    with hazards.checking():
        pre = Prefetcher(_loader(), _augmenter(FakeGenerator()), CPU, depth=1)
        try:
            with pytest.raises(hazards.StreamHazard, match="without waiting"):
                _consume(pre, 1)
        finally:
            pre.close()


def test_holding_two_batches_of_the_ring_is_refused():
    """Defect 3: a consumer that asks for batch k+1 before releasing k would train on an overwritten slot."""
    with hazards.checking():
        pre = Prefetcher(_loader(), _augmenter(FakeGenerator()), CPU, depth=2)
        try:
            first = next(pre)
            with pytest.raises(RuntimeError, match=f"micro-step {first.micro_step} was not released"):
                next(pre)
            pre.release(first)
            pre.release(next(pre))  # released: the next one is fine
        finally:
            pre.close()
