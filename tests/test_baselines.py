"""Long-tail baselines on the loader stage: class-balanced resampling's class frequencies and CMO's mixing."""

from __future__ import annotations

import numpy as np
import torch

from online_aug.batches import ClassBalancedBatchSampler, real_batch, real_loader
from online_aug.sources import CMOSource, RealSource

CPU = torch.device("cpu")


class LT(torch.utils.data.Dataset):
    """A long-tail toy set: class c has counts[c] images; image i is filled with its own index."""

    def __init__(self, counts=(50, 20, 5, 1)):
        self.labels = np.repeat(np.arange(len(counts)), counts)
        self.num_classes = len(counts)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((3, 8, 8), float(i)), int(self.labels[i])


def test_class_balanced_sampler_draws_every_class_equally_often() -> None:
    ds = LT()
    it = iter(ClassBalancedBatchSampler(ds.labels, 4, 64, rank=0, seed=0))
    drawn = np.concatenate([ds.labels[next(it)] for _ in range(200)])  # 12,800 draws
    freq = np.bincount(drawn, minlength=4) / len(drawn)
    assert np.allclose(freq, 0.25, atol=0.015), freq  # the data's prior is 0.66 / 0.26 / 0.07 / 0.01
    # every image of a class is drawn (the 50-image head is not collapsed onto a few)
    head = np.concatenate([np.asarray(next(it)) for _ in range(100)])
    assert len(set(head[ds.labels[head] == 0].tolist())) == 50


def test_class_balanced_sampler_resumes_and_differs_by_rank() -> None:
    ds = LT()
    full = iter(ClassBalancedBatchSampler(ds.labels, 4, 8, rank=0, seed=3))
    batches = [next(full) for _ in range(6)]
    resumed = iter(ClassBalancedBatchSampler(ds.labels, 4, 8, rank=0, seed=3, start=4))
    assert [next(resumed) for _ in range(2)] == batches[4:]
    other = iter(ClassBalancedBatchSampler(ds.labels, 4, 8, rank=1, seed=3))
    assert [next(other) for _ in range(6)] != batches


def test_cmo_pastes_a_minority_box_and_mixes_labels_by_area() -> None:
    ds = LT()
    bg = RealSource(real_loader(ds, 16, 0, 1, seed=0, start=0, num_workers=0), CPU, 4, start=0)
    minority = real_loader(ds, 16, 0, 1, seed=1, start=0, num_workers=0, sampler="class_balanced")
    cmo = CMOSource(bg, minority, num_classes=4, prob=1.0, seed=0)
    ref = RealSource(real_loader(ds, 16, 0, 1, seed=0, start=0, num_workers=0), CPU, 4, start=0)
    mixed_any = False
    for _ in range(10):
        b, r = next(cmo), next(ref)
        assert torch.allclose(b.targets.sum(1), torch.ones(16))
        kept = (b.images == r.images).float().mean(dim=(1, 2, 3))  # fraction of each image still background
        lam_bg = (b.targets * torch.nn.functional.one_hot(r.labels, 4)).sum(1)
        # the background's label weight is the area it kept (its own class may also be the pasted one)
        same = b.targets.max(1).values > 0.999
        assert torch.allclose(kept[~same], lam_bg[~same], atol=1e-6)
        mixed_any |= bool((kept < 1).any())
    assert mixed_any


def test_cmo_off_is_the_inner_source() -> None:
    ds = LT()
    inner = RealSource(real_loader(ds, 8, 0, 1, seed=0, start=0, num_workers=0), CPU, 4, start=0)
    cmo = CMOSource(inner, real_loader(ds, 8, 0, 1, seed=1, start=0, num_workers=0, sampler="class_balanced"), 4,
                    prob=0.0, seed=0)
    ref = real_loader(ds, 8, 0, 1, seed=0, start=0, num_workers=0)
    x, y = next(iter(ref))
    b = next(cmo)
    expect = real_batch(x, y, 0, 4, CPU)
    assert torch.equal(b.images, expect.images) and torch.equal(b.targets, expect.targets)
