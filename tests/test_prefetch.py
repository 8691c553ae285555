"""The prefetch queue: same batches as the synchronous path, errors surface, 'real' starvation, clean shutdown."""

import threading
import time

import pytest
import torch

from online_aug.augment import Augmenter
from online_aug.batches import real_loader
from online_aug.config import AugConfig
from online_aug.policy import AugPolicy
from online_aug.prefetch import Prefetcher, ProducerError
from online_aug.sources import SyncAugmentedSource

CPU = torch.device("cpu")


class FakeGenerator:
    """Deterministic stand-in for SDEditGenerator: mixes the image with noise from the given generator."""

    def __init__(self, delay: float = 0.0, fail_at_call: int = -1, nonfinite_first: bool = False):
        self.delay, self.fail_at_call, self.nonfinite_first, self.calls = delay, fail_at_call, nonfinite_first, 0

    def edit(self, images, strengths, targets, generator=None):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise ValueError("boom in the generator")
        time.sleep(self.delay)
        noise = torch.rand(images.shape, generator=generator)
        s = strengths.view(-1, 1, 1, 1)
        out = (1 - s) * images + s * noise
        finite = torch.ones(len(images), dtype=torch.bool)
        if self.nonfinite_first:
            finite[0] = False
            out[0] = images[0]
        return out, finite


class TinyData(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 8, 8, generator=g), i % 4


def _augmenter(gen, alpha=0.5):
    cfg = AugConfig(alpha=alpha, strengths=[0.5, 0.9], target_mode="inter")
    return Augmenter(AugPolicy(cfg, 4, [16, 16, 16, 16]), gen, CPU, seed=7, rank=0, class_names=list("abcd"))


def _loader(start=0):
    return real_loader(TinyData(), 8, rank=0, world_size=1, seed=1, start=start, num_workers=0)


def _take(pre):
    """next() and release at once: for tests that only read the stats and steps of the batches they keep."""
    b = next(pre)
    pre.release(b)
    return b


def test_prefetcher_equals_synchronous_path():
    sync = SyncAugmentedSource(_loader(), _augmenter(FakeGenerator()), CPU, start=0)
    pre = Prefetcher(_loader(), _augmenter(FakeGenerator()), CPU, depth=2, starvation="wait")
    try:
        for _ in range(6):
            a, b = next(sync), next(pre)
            assert a.micro_step == b.micro_step
            assert torch.equal(a.images, b.images)
            assert torch.equal(a.targets, b.targets)
            assert torch.equal(a.labels, b.labels)
            assert a.stats["aug/effective_alpha"] == b.stats["aug/effective_alpha"] == 0.5
            pre.release(b)  # the ring's contract (prefetch.py): release batch k before asking for k+1
    finally:
        pre.close()
    assert not pre._thread.is_alive()


def test_resume_continues_the_same_stream():
    full = SyncAugmentedSource(_loader(), _augmenter(FakeGenerator()), CPU, start=0)
    batches = [next(full) for _ in range(5)]
    resumed = SyncAugmentedSource(_loader(start=3), _augmenter(FakeGenerator()), CPU, start=3)
    b3 = next(resumed)
    assert b3.micro_step == 3
    assert torch.equal(b3.images, batches[3].images) and torch.equal(b3.targets, batches[3].targets)


def test_producer_exception_reaches_main_thread_quickly():
    pre = Prefetcher(_loader(), _augmenter(FakeGenerator(fail_at_call=3)), CPU, depth=1, starvation="wait")
    t0 = time.perf_counter()
    with pytest.raises(ProducerError) as info:
        for _ in range(10):
            pre.release(next(pre))
    assert time.perf_counter() - t0 < 5
    assert isinstance(info.value.__cause__, ValueError) and "boom" in str(info.value.__cause__)
    assert info.value.__cause__.__traceback__ is not None  # the producer's traceback is kept
    pre.close()


def test_real_starvation_keeps_training_with_lower_effective_alpha():
    pre = Prefetcher(_loader(), _augmenter(FakeGenerator(delay=0.3)), CPU, depth=2, starvation="real")
    try:
        t0 = time.perf_counter()
        batches = [_take(pre) for _ in range(8)]
        elapsed = time.perf_counter() - t0
    finally:
        pre.close()
    eff = sum(b.stats["aug/effective_alpha"] for b in batches) / len(batches)
    assert eff < 0.5
    assert elapsed < 8 * 0.3  # did not wait for the slow generator on every batch
    steps = [b.micro_step for b in batches]
    assert len(set(steps)) == len(steps)  # every real batch is used once


def test_wait_starvation_keeps_alpha_exact():
    pre = Prefetcher(_loader(), _augmenter(FakeGenerator(delay=0.05)), CPU, depth=1, starvation="wait")
    try:
        batches = [_take(pre) for _ in range(4)]
    finally:
        pre.close()
    assert all(b.stats["aug/effective_alpha"] == 0.5 for b in batches)
    assert [b.micro_step for b in batches] == [0, 1, 2, 3]


def test_close_stops_a_blocked_producer_without_hanging():
    pre = Prefetcher(_loader(), _augmenter(FakeGenerator()), CPU, depth=1, starvation="wait")
    next(pre)
    time.sleep(0.2)  # producer is now blocked on the full queue
    t0 = time.perf_counter()
    pre.close()
    assert time.perf_counter() - t0 < 2
    assert not any(t.name == "online-aug-producer" and t.is_alive() for t in threading.enumerate())


def test_nonfinite_edit_falls_back_to_real_image_and_hard_label():
    aug = _augmenter(FakeGenerator(nonfinite_first=True), alpha=1.0)
    x, y = next(iter(_loader()))
    b = aug(x, y, micro_step=0)
    assert b.stats["aug/nonfinite_dropped"] == 1.0
    assert b.stats["aug/effective_alpha"] == 7 / 8
    assert torch.equal(b.images[0], x[0])
    assert torch.equal(b.targets[0], torch.nn.functional.one_hot(y[0], 4).float())
    assert not torch.equal(b.images[1:], x[1:])
