"""aug.edit_source: an edit starts from the stored image at the generator's resolution, cropped and flipped as the
classifier's view was, and comes back at the view's size; the embedded digits keep the view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_prefetch import FakeGenerator
from tiny_sd import save_tiny_sd

from online_aug.augment import Augmenter
from online_aug.config import AugConfig, ConfigError, load_config
from online_aug.data import EditSourceReader, build_splits
from online_aug.data.transforms import build_train_transform as train_transform
from online_aug.policy import AugPolicy
from online_aug.sources import build_batch_source

CPU = torch.device("cpu")
VIEW, GEN = 16, 32  # the classifier's view and the tiny SD's native resolution

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two classes of 72 x 56 px 'photos' with fine detail (random pixels): a 16 px view loses it, the stored
    image has it."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(12):
            arr = rng.integers(0, 256, size=(56, 72, 3), dtype=np.uint8)
            arr[:, :36] //= 2 if c == "cat" else 1  # a coarse structure beside the fine one
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def _cfg(root: Path, *extra: str):
    return load_config(None, ["data.dataset=imagefolder", f"data.root={root}", f"data.image_size={VIEW}",
                              "data.test_fraction=0.25", "data.val_per_class=0", "data.pool_fraction=0",
                              "data.imbalance_ratio=1", "train.batch_size=8", *extra])


def _timm_train(root: Path):
    cfg = _cfg(root, "train.transform=timm", "train.crop_scale=[0.3,1.0]", "train.color_jitter=0")
    splits = build_splits(cfg.data, train_transform(cfg))
    splits.train.edit_source = True
    return cfg, splits


def test_auto_is_full_for_image_folders_and_the_view_for_digits(photos: Path) -> None:
    assert _cfg(photos).full_res_edit_source()
    assert not _cfg(photos, "aug.edit_source=view").full_res_edit_source()
    assert not load_config(None, []).full_res_edit_source()  # embedded digits: 8 px stored, the view is the source
    assert load_config(None, ["aug.edit_source=full"]).full_res_edit_source()
    with pytest.raises(ConfigError, match="aug.edit_source"):
        load_config(None, ["aug.edit_source=photo"])


def test_the_reader_repeats_the_views_crop_and_flip_from_the_stored_image(photos: Path) -> None:
    _, splits = _timm_train(photos)
    ds = splits.train
    torch.manual_seed(0)
    flips, boxes = set(), set()
    for i in range(len(ds)):
        x, _, extras = ds[i]
        geom = extras["geom"]
        assert geom.dtype == torch.long and int(geom[0]) == i
        flips.add(int(geom[5]))
        boxes.add(tuple(geom[1:5].tolist()))
        # at the view's size, the reader gives the view itself: the same box, resize and flip, bit for bit
        assert torch.equal(EditSourceReader(ds, VIEW)(geom[None])[0], x)
        # at the generator's size it has the detail the view lost: not the view blown up again
        full = EditSourceReader(ds, GEN)(geom[None])[0]
        up = F.interpolate(x[None], size=(GEN, GEN), mode="bilinear", antialias=True, align_corners=False)[0]
        assert (full - up).abs().mean() > 0.05
        down = F.interpolate(full[None], size=(VIEW, VIEW), mode="bilinear", antialias=True, align_corners=False)
        assert (down[0] - x).abs().mean() < 0.06  # ... and the same picture
    assert flips == {0, 1} and len(boxes) > len(ds) // 2  # random crops and flips were drawn and carried
    ds.edit_source = False
    assert len(ds[0]) == 2  # nothing travels when the source is the view


def test_geometry_does_not_change_the_views_draws(photos: Path) -> None:
    """with_geometry draws as timm's own pipeline does: turning aug.edit_source on leaves the views unchanged."""
    _, splits = _timm_train(photos)
    ds, tf = splits.train, splits.train.transform
    img = ds.pil(0, resize=False)
    torch.manual_seed(3)
    import random

    random.seed(3)
    a = np.asarray(tf.pipeline(img))
    torch.manual_seed(3)
    random.seed(3)
    b, _ = tf.with_geometry(img)
    assert np.array_equal(a, np.asarray(b))


class RecordingGenerator(FakeGenerator):
    """Records what it is asked to edit and returns it inverted (an edit visibly different from its source)."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def edit(self, images, strengths, targets, generator=None, **kw):
        self.inputs.append(images.clone())
        return 1 - images, torch.ones(len(images), dtype=torch.bool)


def test_augmenter_edits_the_full_resolution_source_and_returns_the_views_size(photos: Path) -> None:
    _, splits = _timm_train(photos)
    ds = splits.train
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    x, y, extras = next(iter(loader))
    gen = RecordingGenerator()
    aug = Augmenter(AugPolicy(AugConfig(alpha=0.5, target_mode="intra", strengths=[0.9]), 2), gen, CPU, seed=0,
                    rank=0, class_names=["cat", "dog"], source_reader=EditSourceReader(ds, GEN))
    batch = aug(x, y, micro_step=0, geom=extras["geom"])
    (src,) = gen.inputs
    rows = (batch.edit_target >= 0).nonzero().flatten()
    assert len(rows) == 4 and src.shape == (4, 3, GEN, GEN)
    assert torch.equal(src, EditSourceReader(ds, GEN)(extras["geom"][rows]))  # read from the stored images
    expect = F.interpolate(1 - src, size=(VIEW, VIEW), mode="bilinear", antialias=True, align_corners=False)
    assert batch.images.shape == x.shape
    assert torch.allclose(batch.images[rows], expect.clamp(0, 1))  # the edit, at the view's size
    real = torch.ones(8, dtype=torch.bool)
    real[rows] = False
    assert torch.equal(batch.images[real], x[real])
    gen.inputs.clear()
    aug(x, y, micro_step=0)  # no geometry from the loader: the view is the source
    assert gen.inputs[0].shape == (4, 3, VIEW, VIEW)


def _batches(cfg, splits, start: int, n: int) -> list:
    source = build_batch_source(cfg, splits, CPU, 0, 1, 8, start)
    try:
        out = []
        for _ in range(n):
            b = next(source)
            out.append((b.images.clone(), b.targets.clone()))
            source.release(b)
        return out
    finally:
        source.close()


def test_real_generator_through_the_loader_and_prefetch_and_resume_is_exact(photos: Path, tmp_path: Path,
                                                                            monkeypatch) -> None:
    """The wiring a run uses (trainer flag → loader → prefetch producer → reader → tiny SD at 32 px → 16 px
    batch), and a source restarted at step 2 gives the batches the uninterrupted one gave."""
    sd = save_tiny_sd(tmp_path / "sd", sample_size=GEN)
    cfg = _cfg(photos, "aug.alpha=0.5", f"aug.model={sd}", "aug.steps=2", "aug.strengths=[0.7]",
               "aug.prompt=a photo of a {name}", "aug.guard=off", "aug.audit=false")  # a random SD
    splits = build_splits(cfg.data, train_transform(cfg))
    splits.train.edit_source = cfg.full_res_edit_source()
    read = []
    real_call = EditSourceReader.__call__

    def spy(self, geom):
        out = real_call(self, geom)
        read.append(out.shape)
        return out

    monkeypatch.setattr(EditSourceReader, "__call__", spy)
    full = _batches(cfg, splits, 0, 4)
    assert read and all(s[1:] == (3, GEN, GEN) for s in read)
    assert all(x.shape == (8, 3, VIEW, VIEW) and torch.isfinite(x).all() for x, _ in full)
    resumed = _batches(cfg, splits, 2, 2)
    for (a, ta), (b, tb) in zip(full[2:], resumed):
        assert torch.equal(a, b) and torch.equal(ta, tb)
