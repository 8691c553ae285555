"""Data: the long-tail profile, digits splits (long-tail train, balanced disjoint test), ImageFolder and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from online_aug.config import ConfigError, DataConfig, load_config
from online_aug.data import build_splits, class_order, longtail_counts, longtail_indices


def _keys(images: np.ndarray) -> set[bytes]:
    """One key per image, by content."""
    return {img.tobytes() for img in images}


# ---------------------------------------------------------------- the profile


def test_longtail_counts_cifar10_ratio_100() -> None:
    counts = longtail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


def test_longtail_counts_clamp_the_tail_at_one() -> None:
    assert longtail_counts(56, 10, 100) == [56, 33, 20, 12, 7, 4, 2, 1, 1, 1]
    assert longtail_counts(5, 4, 1000) == [5, 1, 1, 1]


def test_longtail_counts_edge_cases() -> None:
    assert longtail_counts(40, 4, 1) == [40, 40, 40, 40]
    assert longtail_counts(7, 1, 50) == [7]
    counts = longtail_counts(100, 5, 10)
    assert counts[0] == 100 and counts[-1] == 10 and counts == sorted(counts, reverse=True)
    with pytest.raises(ConfigError, match="data.imbalance_ratio"):
        longtail_counts(100, 5, 0.5)


def test_class_order_is_seeded_and_a_permutation() -> None:
    assert class_order(10, -1) == list(range(10))
    a = class_order(10, 3)
    assert sorted(a) == list(range(10)) and a == class_order(10, 3)
    assert any(class_order(10, s) != a for s in range(4, 8))


def test_longtail_indices_follow_the_order() -> None:
    labels = np.repeat(np.arange(4), [30, 25, 40, 33])
    keep = longtail_indices(labels, 4, 5.0, 1, np.random.default_rng(0))
    assert len(np.unique(keep)) == len(keep)
    got = np.bincount(labels[keep], minlength=4)
    expected = longtail_counts(25, 4, 5.0)
    for rank, c in enumerate(class_order(4, 1)):
        assert got[c] == expected[rank]


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_balanced():
    return build_splits(DataConfig(dataset="digits", image_size=8, imbalance_ratio=1.0))


@pytest.fixture(scope="module")
def digits_lt():
    return build_splits(DataConfig(dataset="digits", image_size=8, imbalance_ratio=20.0, class_order_seed=0))


def test_digits_longtail_counts_match_profile(digits_balanced, digits_lt) -> None:
    n_max = min(digits_balanced.train.class_counts())  # the head keeps what every class can supply
    expected = longtail_counts(n_max, 10, 20)
    counts = digits_lt.train.class_counts()
    assert sorted(counts, reverse=True) == expected
    for rank, c in enumerate(class_order(10, 0)):  # the seeded class order decides which class is the head
        assert counts[c] == expected[rank], (rank, c)
    assert max(counts) / min(counts) == pytest.approx(20, rel=0.25)


def test_digits_longtail_train_is_a_subset_of_the_balanced_train(digits_balanced, digits_lt) -> None:
    assert _keys(digits_lt.train.images) <= _keys(digits_balanced.train.images)


def test_digits_test_split_is_balanced_disjoint_and_unchanged_by_longtail(digits_balanced, digits_lt) -> None:
    test_counts = digits_lt.test.class_counts()
    assert max(test_counts) - min(test_counts) <= 3  # stratified: digits has 174..183 images per class
    assert np.array_equal(digits_lt.test.images, digits_balanced.test.images)
    assert np.array_equal(digits_lt.test.labels, digits_balanced.test.labels)
    train_keys, test_keys = _keys(digits_balanced.train.images), _keys(digits_balanced.test.images)
    assert not train_keys & test_keys
    assert len(train_keys) + len(test_keys) == 1797  # together they are the whole (duplicate-free) dataset
    assert not _keys(digits_lt.train.images) & test_keys


def test_digits_test_split_fixed_across_run_seeds_and_set_by_split_seed() -> None:
    base = ["data.image_size=8", "data.imbalance_ratio=20"]
    a = build_splits(load_config(None, base + ["run.seed=0"]).data)
    b = build_splits(load_config(None, base + ["run.seed=123"]).data)
    assert np.array_equal(a.test.images, b.test.images) and np.array_equal(a.test.labels, b.test.labels)
    assert np.array_equal(a.train.images, b.train.images)
    c = build_splits(load_config(None, base + ["data.split_seed=1"]).data)
    assert _keys(c.test.images) != _keys(a.test.images)


def test_digits_validation_split_is_carved_from_train() -> None:
    s = build_splits(DataConfig(dataset="digits", image_size=8, imbalance_ratio=5.0, val_fraction=0.2))
    assert s.val is not None
    tr, va, te = _keys(s.train.images), _keys(s.val.images), _keys(s.test.images)
    assert not tr & va and not va & te and not tr & te
    assert min(s.train.class_counts()) >= 1 and min(s.val.class_counts()) >= 1


@pytest.mark.parametrize(
    ("ratio", "val", "test", "named"),
    [
        (100.0, 0.1, 0.3, "data.val_fraction"),  # the tail class keeps 1 image: nothing to hold out
        (1.0, 0.001, 0.3, "data.val_fraction"),  # fewer validation images than classes
        (1.0, 0.0, 0.002, "data.test_fraction"),
    ],
)
def test_impossible_stratified_split_names_the_key(ratio: float, val: float, test: float, named: str) -> None:
    cfg = DataConfig(dataset="digits", image_size=8, imbalance_ratio=ratio, val_fraction=val, test_fraction=test)
    with pytest.raises(ConfigError, match=re.escape(named)):
        build_splits(cfg)


def test_digits_items_are_float_images_in_unit_range(digits_lt) -> None:
    x, y = digits_lt.train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y == int(digits_lt.train.labels[0])
    assert digits_lt.class_names[1] == "one" and digits_lt.num_classes == 10


def test_unknown_dataset_name() -> None:
    with pytest.raises(ConfigError, match="data.dataset"):
        load_config(None, ["data.dataset=mnist"])


# ---------------------------------------------------------------- ImageFolder


CLASSES = ("bird", "cat", "ship")


def _image_folder(root: Path, per_class: int = 10, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            arr[..., c] = 255  # a class-coloured channel
            Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


def test_image_folder_splits(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs")
    s = build_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=8, test_fraction=0.3))
    assert s.class_names == list(CLASSES)
    assert s.train.class_counts() == [7, 7, 7] and s.test.class_counts() == [3, 3, 3]
    assert not set(map(str, s.train.images)) & set(map(str, s.test.images))
    x, y = s.test[0]
    assert x.shape == (3, 8, 8) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    path = Path(s.test.images[0])
    assert path.parent.name == CLASSES[y]


def test_image_folder_longtail(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", per_class=14)
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=8, test_fraction=0.25)
    balanced = build_splits(cfg)
    cfg.imbalance_ratio = 4.0
    s = build_splits(cfg)
    counts = s.train.class_counts()
    expected = longtail_counts(min(balanced.train.class_counts()), 3, 4.0)
    assert sorted(counts, reverse=True) == expected and expected[-1] < expected[0]
    assert [str(p) for p in s.test.images] == [str(p) for p in balanced.test.images]


def test_image_folder_with_separate_test_root(tmp_path: Path) -> None:
    tr = _image_folder(tmp_path / "train", per_class=4)
    te = _image_folder(tmp_path / "test", per_class=2)
    s = build_splits(DataConfig(dataset="imagefolder", root=str(tr), test_root=str(te), image_size=8))
    assert s.train.class_counts() == [4, 4, 4] and s.test.class_counts() == [2, 2, 2]
    (te / "cat").rename(te / "dog")
    with pytest.raises(ConfigError, match="data.test_root"):
        build_splits(DataConfig(dataset="imagefolder", root=str(tr), test_root=str(te), image_size=8))


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", per_class=4)
    bad = root / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        build_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=8))


def test_truncated_image_is_named(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", per_class=4)
    good = root / "ship" / "000.png"
    good.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ConfigError, match=re.escape(str(good))):
        build_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=8))


def test_truncated_jpeg_is_named(tmp_path: Path) -> None:
    # PIL's verify() accepts a JPEG cut short; only decoding finds it, so the scan must decode
    root = _image_folder(tmp_path / "imgs", per_class=4)
    bad = root / "bird" / "cut.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad, "JPEG")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        build_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=8))


def test_ratio_above_the_head_count_keeps_one_image_per_tail_class(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", per_class=10)  # 7 training images per class after the split
    # profile 7, max(1, int(7 / sqrt(50))) = 1, max(1, int(7 / 50)) = 1: the tail clamp (Diff-Mix CUB-LT IF 100)
    s = build_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=8, imbalance_ratio=50.0))
    got = s.train.class_counts()
    order = class_order(3, 0)
    assert [got[c] for c in order] == [7, 1, 1]


def test_empty_or_missing_image_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root"):
        build_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "absent")))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError, match="cat"):
        build_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "empty")))


# ---------------------------------------------------------------- the split protocol (test / val / pool / train)

PROTOCOL = dict(dataset="digits", image_size=8, imbalance_ratio=100.0, val_per_class=10, pool_fraction=0.5)


@pytest.fixture(scope="module")
def protocol():
    return build_splits(DataConfig(**PROTOCOL))


def test_protocol_parts_are_disjoint_by_index_and_content(protocol) -> None:
    parts = {n: set(getattr(protocol, n).index.tolist()) for n in ("train", "val", "test", "pool")}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not parts[a] & parts[b], (a, b)
    # by content too (the index is what generators record; the pixels are what would leak)
    assert not _keys(protocol.pool.images) & _keys(protocol.test.images)
    assert not _keys(protocol.val.images) & _keys(protocol.train.images)


def test_protocol_counts_and_balance(protocol) -> None:
    assert protocol.val.class_counts() == [10] * 10  # balanced validation
    test_counts = protocol.test.class_counts()
    assert max(test_counts) - min(test_counts) <= 3  # stratified 30 % of digits (174 ... 183 images per class)
    pool = protocol.pool.class_counts()
    assert min(pool) >= 50 and max(pool) - min(pool) <= 4  # stratified half of the rest
    counts = sorted(protocol.train.class_counts(), reverse=True)
    assert counts[-1] == 1 and counts[0] >= 50 and counts[0] / counts[-1] >= 50  # IF 100, tail clamped at 1
    assert len(protocol.test) == 540 and len(protocol.val) == 100


def test_pool_does_not_depend_on_the_imbalance_ratio(protocol) -> None:
    other = build_splits(DataConfig(**{**PROTOCOL, "imbalance_ratio": 20.0}))
    assert np.array_equal(other.pool.index, protocol.pool.index)
    assert np.array_equal(other.val.index, protocol.val.index)
    balanced = build_splits(DataConfig(**{**PROTOCOL, "imbalance_ratio": 1.0}))
    assert set(protocol.train.index.tolist()) <= set(balanced.train.index.tolist())


def test_train_with_pool_is_the_upper_bound_split(protocol) -> None:
    up = build_splits(DataConfig(**PROTOCOL, train_with_pool=True))
    assert len(up.train) == len(protocol.train) + len(protocol.pool)
    assert np.array_equal(up.test.index, protocol.test.index)


def test_generator_that_saw_val_or_test_images_is_refused(protocol) -> None:
    from online_aug.data import check_generator_data, seen_record

    cfg = DataConfig(**PROTOCOL)
    check_generator_data(seen_record(cfg, protocol.pool, "pool"), protocol, "pool/build_info.json")
    check_generator_data(seen_record(cfg, protocol.train, "train"), protocol, "lt/build_info.json")
    leaky = seen_record(cfg, protocol.pool.concat(protocol.val), "pool")
    with pytest.raises(ConfigError, match=r"leaky/build_info.json.*val split"):
        check_generator_data(leaky, protocol, "leaky/build_info.json")
    with pytest.raises(ConfigError, match="test split"):
        check_generator_data(seen_record(cfg, protocol.test, "test"), protocol, "t/build_info.json")


@pytest.mark.parametrize(
    ("over", "named"),
    [
        ({"val_per_class": 200}, "data.val_per_class"),  # a class cannot give 200 validation images
        ({"pool_fraction": 0.001}, "data.pool_fraction"),  # a pool with no image of some class
    ],
)
def test_impossible_protocol_names_the_key(over: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        build_splits(DataConfig(**{**PROTOCOL, **over}))


def test_protocol_config_errors() -> None:
    with pytest.raises(ConfigError, match="data.train_with_pool"):
        load_config(None, ["data.train_with_pool=true"])
    with pytest.raises(ConfigError, match="data.val_per_class and data.val_fraction"):
        load_config(None, ["data.val_per_class=5", "data.val_fraction=0.2"])
    with pytest.raises(ConfigError, match="data.pool_fraction"):
        load_config(None, ["data.pool_fraction=1.5"])
