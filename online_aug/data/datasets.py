"""Datasets: embedded sklearn digits, CIFAR-10/100 (torchvision) and any ImageFolder, with long-tail splits.

Every dataset yields ``(image, label)`` with ``image`` a float tensor [3, S, S] in [0, 1]. Normalisation is
part of the classifier (see :mod:`online_aug.model`), so the generator and the classifier see the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import ConfigError, DataConfig
from .longtail import longtail_indices

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class LabeledImages(Dataset):
    """Images (an in-memory uint8 array [N, H, W, 3] or a list of files) with integer labels."""

    def __init__(self, images: np.ndarray | list[Path], labels: np.ndarray, class_names: list[str],
                 image_size: int, transform=None):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.image_size = image_size
        self.transform = transform  # PIL -> PIL (e.g. RandAugment); resize and to-tensor happen here

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.num_classes).tolist()

    def pil(self, i: int) -> Image.Image:
        item = self.images[i]
        if isinstance(item, Path):
            try:
                img = Image.open(item).convert("RGB")
            except OSError as e:
                raise OSError(f"cannot read image file {item}: {e}") from e
        else:
            img = Image.fromarray(item)
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.pil(i)
        if self.transform is not None:
            img = self.transform(img)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return arr.float().div_(255), int(self.labels[i])

    def subset(self, idx: np.ndarray, transform=None) -> LabeledImages:
        imgs = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return LabeledImages(imgs, self.labels[idx], self.class_names, self.image_size, transform)


@dataclass
class Splits:
    train: LabeledImages
    val: LabeledImages | None
    test: LabeledImages

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def _digits(size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1)
    return x.numpy(), d.target.astype(np.int64), list(DIGIT_NAMES)


def _cifar(cfg: DataConfig, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(cfg.root, train=train, download=cfg.download)
    except RuntimeError as e:
        raise ConfigError(f"data.dataset={cfg.dataset}: not found under data.root={cfg.root!r} ({e}); "
                          f"set data.download=true where the internet is reachable") from e
    return ds.data, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def scan_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Class-per-subfolder images. Every file is opened and decoded now, so an unreadable image fails
    before training starts with its path in the message (we fail rather than skip: a silently shrunk
    class would change the long-tail profile)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data.root={str(root)!r} is not a folder of class subfolders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"data.root={str(root)!r} has no class subfolders")
    files, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            raise ConfigError(f"class folder {str(root / name)!r} holds no images")
        for p in found:
            try:
                with Image.open(p) as im:
                    im.verify()  # structure and checksums (PNG)
                with Image.open(p) as im:  # verify() does not decode: a truncated JPEG passes it
                    im.draft("RGB", (1, 1))  # JPEG decodes at 1/8 scale, still reading every byte
                    im.load()
            except Exception as e:  # PIL raises many types for corrupt files
                raise ConfigError(f"unreadable image file {str(p)!r}: {e}; remove or replace it") from e
            files.append(p)
            labels.append(c)
    return files, np.asarray(labels, dtype=np.int64), classes


def _stratified_split(labels: np.ndarray, fraction: float, seed: int,
                      key: str = "data.test_fraction") -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        a, b = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as e:  # a class with < 2 images, or fewer held-out images than classes
        raise ConfigError(f"{key}={fraction}: no stratified split of {len(labels)} images is possible ({e}); "
                          f"change {key} or lower data.imbalance_ratio") from e
    return np.sort(a), np.sort(b)


def build_splits(cfg: DataConfig, train_transform=None) -> Splits:
    """Train (long-tail), optional validation (carved from train) and balanced test splits."""
    size, seed = cfg.image_size, cfg.split_seed
    if cfg.dataset == "digits":
        x, y, names = _digits(size)
        tr, te = _stratified_split(y, cfg.test_fraction, seed)
        full = LabeledImages(x, y, names, size)
        train, test = full.subset(tr), full.subset(te)
    elif cfg.dataset in ("cifar10", "cifar100"):
        xtr, ytr, names = _cifar(cfg, True)
        xte, yte, _ = _cifar(cfg, False)
        train, test = LabeledImages(xtr, ytr, names, size), LabeledImages(xte, yte, names, size)
    elif cfg.dataset == "imagefolder":
        files, y, names = scan_image_folder(cfg.root)
        if cfg.test_root:
            tfiles, ty, tnames = scan_image_folder(cfg.test_root)
            if tnames != names:
                raise ConfigError(f"data.test_root classes {tnames} differ from data.root classes {names}")
            train, test = LabeledImages(files, y, names, size), LabeledImages(tfiles, ty, names, size)
        else:
            full = LabeledImages(files, y, names, size)
            tr, te = _stratified_split(y, cfg.test_fraction, seed)
            train, test = full.subset(tr), full.subset(te)
    else:  # guarded by the config's Literal, kept for programmatic callers
        raise ConfigError(f"data.dataset={cfg.dataset!r} is unknown; use digits, cifar10, cifar100 or imagefolder")

    if cfg.imbalance_ratio > 1:
        rng = np.random.default_rng(seed)
        keep = longtail_indices(train.labels, train.num_classes, cfg.imbalance_ratio, cfg.class_order_seed, rng,
                                train.class_names)
        train = train.subset(keep)
    val = None
    if cfg.val_fraction > 0:
        tr, va = _stratified_split(train.labels, cfg.val_fraction, seed + 1, "data.val_fraction")
        train, val = train.subset(tr), train.subset(va)
    for c, n in enumerate(train.class_counts()):
        if n == 0:
            raise ConfigError(f"class {train.class_names[c]!r} has no training images after the long-tail/val "
                              f"split; lower data.imbalance_ratio or data.val_fraction")
    train.transform = train_transform
    return Splits(train, val, test)
