"""Datasets: embedded sklearn digits, CIFAR-10/100 (torchvision) and any ImageFolder, with long-tail splits.

Every dataset yields ``(image, label)`` with ``image`` a float tensor [3, S, S] in [0, 1]. Normalisation is
part of the classifier (see :mod:`online_aug.model`), so the generator and the classifier see the same pixels.
"""

from __future__ import annotations

import random
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
                 image_size: int, transform=None, index: np.ndarray | None = None):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        # identity of each image in the whole data set (train and test numbered apart): what the split protocol
        # checks for overlap and what a generator's build_info.json records as "seen"
        self.index = np.arange(len(self.labels), dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self.class_names = list(class_names)
        self.image_size = image_size
        self.transform = transform  # PIL -> PIL (e.g. RandAugment); resize and to-tensor happen here
        # object masks (aug.mask_mode, set by attach_masks): None, "threshold" or one mask file per image
        self.masks: str | list[Path] | None = None
        self.mask_threshold = 0.25
        # aug.edit_source=full (set by sources.prepare_batch_source): each item also says where its view came from in
        # the stored image
        self.edit_source = False

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.num_classes).tolist()

    def pil(self, i: int, resize: bool = True) -> Image.Image:
        """Image ``i`` as RGB, resized to ``image_size`` unless ``resize`` is false (a transform that crops from the
        full-resolution image, see :mod:`online_aug.data.transforms`, sizes it itself)."""
        item = self.images[i]
        if isinstance(item, Path):
            try:
                img = Image.open(item).convert("RGB")
            except OSError as e:
                raise OSError(f"cannot read image file {item}: {e}") from e
        else:
            img = Image.fromarray(item)
        if resize and img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        return img

    def __getitem__(self, item: int | tuple[int, int]
                    ) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """``item``: an index, or ``(index, seed)`` from :class:`~online_aug.batches.KeyedBatchSampler`: the random
        transform then draws from ``seed`` alone (python's ``random``, numpy's and torch's global RNGs, restored
        afterwards)."""
        i, key = item if isinstance(item, tuple) else (item, None)
        if key is None or self.transform is None:
            return self._item(i)
        state, np_state = random.getstate(), np.random.get_state()  # timm draws from all three global RNGs
        with torch.random.fork_rng(devices=[]):
            random.seed(key)
            np.random.seed(key % 2**32)
            torch.manual_seed(key)
            try:
                return self._item(i)
            finally:
                random.setstate(state)
                np.random.set_state(np_state)

    def _item(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """``(image, label)``, or ``(image, label, extras)`` when something travels with the image through the loader
        to the generator: ``extras["masks"]`` (:func:`attach_masks`), the object mask [1, S, S] in {0, 1};
        ``extras["geom"]`` (``edit_source``), ``[i, top, left, height, width, flipped]`` long: the view's crop box in
        the stored image (height 0: the whole image) and flip, which :class:`EditSourceReader` repeats."""
        full = getattr(self.transform, "full_resolution", False)
        img = self.pil(i, resize=not full)
        geom = (0, 0, 0, 0, 0)  # no geometric transform: the view is the whole stored image, unflipped
        if self.transform is not None:
            if self.edit_source and full:
                img, geom = self.transform.with_geometry(img)
            else:
                img = self.transform(img)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        x = arr.float().div_(255)
        extras: dict[str, torch.Tensor] = {}
        if isinstance(self.masks, str):  # the stroke mask of the very image returned (after any transform)
            extras["masks"] = (x.mean(0, keepdim=True) > self.mask_threshold).float()
        elif self.masks is not None:
            with Image.open(self.masks[i]) as m:
                m = m.convert("L")
                if m.size != (x.shape[-1], x.shape[-2]):
                    m = m.resize((x.shape[-1], x.shape[-2]), Image.NEAREST)
                extras["masks"] = torch.from_numpy(np.asarray(m) > 127).float()[None]
        if self.edit_source:
            extras["geom"] = torch.tensor([i, *geom], dtype=torch.long)
        return (x, int(self.labels[i]), extras) if extras else (x, int(self.labels[i]))

    def subset(self, idx: np.ndarray, transform=None) -> LabeledImages:
        imgs = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return LabeledImages(imgs, self.labels[idx], self.class_names, self.image_size, transform, self.index[idx])

    def concat(self, other: LabeledImages) -> LabeledImages:
        if isinstance(self.images, np.ndarray) and isinstance(other.images, np.ndarray):
            imgs = np.concatenate([self.images, other.images])
        else:
            imgs = list(self.images) + list(other.images)
        return LabeledImages(imgs, np.concatenate([self.labels, other.labels]), self.class_names, self.image_size,
                             self.transform, np.concatenate([self.index, other.index]))

    def tensors(self, resolution: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """All images as one float tensor [N, 3, S, S] in [0, 1] (no transform), resized to ``resolution``."""
        if isinstance(self.images, np.ndarray):
            x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div(255)
        else:
            x = torch.stack([torch.from_numpy(np.asarray(self.pil(i), dtype=np.uint8).copy()).permute(2, 0, 1)
                             for i in range(len(self))]).float().div(255)
        if resolution is not None and x.shape[-1] != resolution:
            x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
        return x, self.labels


class EditSourceReader:
    """``aug.edit_source=full``: the source of each edit at the generator's resolution, read from the stored image
    (a 500 px photo, not the 224 px view blown up again) with the crop box and flip of the classifier's view
    (``extras["geom"]``), squashed to ``resolution`` square as the view was to ``data.image_size``. It runs in the
    producer, off the trainer's path, and decodes only the images the policy edits."""

    def __init__(self, part: LabeledImages, resolution: int):
        self.part, self.resolution = part, int(resolution)

    def __call__(self, geom: torch.Tensor) -> torch.Tensor:
        """``geom`` [M, 6] long (CPU) -> [M, 3, R, R] float in [0, 1]."""
        r = self.resolution
        out = []
        for i, top, left, h, w, flipped in geom.tolist():
            img = self.part.pil(i, resize=False)
            if h and w:
                img = img.crop((left, top, left + w, top + h))
            img = img.resize((r, r), Image.BILINEAR)  # PIL antialiases a downscale, as the SD training scripts do
            if flipped:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        return torch.stack(out).float().div_(255)


def attach_masks(part: LabeledImages, source: str, threshold: float, root: str | Path) -> None:
    """Make ``part`` yield ``(image, label, mask)`` (``aug.mask_mode``): ``source`` is ``threshold`` (the stroke mask,
    gray > ``threshold``, computed from the image itself) or a mask folder mirroring ``root`` (data.root): image
    ``root/<rel>`` has its mask at ``source/<rel>``, of the same size. Every mask is checked now, before any model
    is built; a missing or mis-sized one is a ConfigError naming the file."""
    if source == "threshold":
        part.masks, part.mask_threshold = "threshold", float(threshold)
        return
    folder, root = Path(source).expanduser(), Path(root)
    if not folder.is_dir():
        raise ConfigError(f"aug.mask_source={source!r}: no such folder; point it at a folder of masks laid out like "
                          f"data.root, or use aug.mask_source=threshold")
    if not isinstance(part.images, list):
        raise ConfigError(f"aug.mask_source={source!r}: a mask folder needs image files (data.dataset=imagefolder)")
    files = []
    for img in part.images:
        try:
            mask = folder / img.relative_to(root)
        except ValueError as e:
            raise ConfigError(f"aug.mask_source: image {img} is not under data.root={str(root)!r}") from e
        if not mask.is_file():
            raise ConfigError(f"aug.mask_source: mask file {mask} (for image {img}) is missing; add it, or use "
                              f"aug.mask_source=threshold / aug.mask_mode=off")
        with Image.open(img) as a, Image.open(mask) as b:  # headers only: the size without decoding
            if a.size != b.size:
                raise ConfigError(f"aug.mask_source: mask file {mask} is {b.size[0]}x{b.size[1]} but its image {img} "
                                  f"is {a.size[0]}x{a.size[1]}; write masks at the image's size")
        files.append(mask)
    part.masks = files


PARTS = ("train", "val", "test", "pool")


@dataclass
class Splits:
    """The split protocol: four disjoint parts of one data set.

    ``test`` (balanced, evaluation only), ``val`` (every choice is made on it), ``train`` (the classifier's long-tail
    subset) and ``pool`` (images the classifier never sees; a generator may be pretrained on them, standing in for
    Stable Diffusion's pretraining data). ``data.train_with_pool`` adds the pool to ``train`` (the upper bound).
    """

    train: LabeledImages
    val: LabeledImages | None
    test: LabeledImages
    pool: LabeledImages | None = None
    # the long-tail counts that define the many/medium/few groups; under data.train_with_pool they stay those of the
    # long-tail subset, so the upper bound is scored on the same tail classes
    shot_counts: list[int] | None = None

    def part(self, name: str) -> LabeledImages:
        got = getattr(self, name, None) if name in PARTS else None
        if got is None:
            hint = {"pool": "set data.pool_fraction", "val": "set data.val_per_class"}.get(name, "")
            raise ConfigError(f"split part {name!r} is not available; {hint or 'use one of ' + ', '.join(PARTS)}")
        return got

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


def _take_per_class(labels: np.ndarray, k: int, rng: np.random.Generator, names: list[str],
                    key: str = "data.val_per_class") -> np.ndarray:
    """k positions of every class (seeded), or a ConfigError naming ``key`` (data.val_per_class must leave one
    image for training; data.shots may take them all)."""
    out = []
    for c, name in enumerate(names):
        idx = np.flatnonzero(labels == c)
        if key == "data.shots" and len(idx) < k:
            raise ConfigError(f"data.shots={k}: class {name!r} has only {len(idx)} training images (after the "
                              f"val/pool split); lower data.shots")
        if key != "data.shots" and len(idx) <= k:
            raise ConfigError(f"{key}={k}: class {name!r} has only {len(idx)} training images and "
                              f"needs at least one left for training; lower {key}")
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out))


def _rest(n: int, taken: np.ndarray) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[taken] = False
    return np.flatnonzero(mask)


def build_splits(cfg: DataConfig, train_transform=None) -> Splits:
    """The split protocol (see :class:`Splits`), in this order, each step seeded by ``data.split_seed``:

    test (stratified ``test_fraction``, or CIFAR's / ``test_root``'s own) → val (``val_per_class`` per class) →
    pool (stratified ``pool_fraction`` of the rest) → long-tail subsample of what is left (``longtail_profile``) →
    legacy ``val_fraction`` (carved from the long-tail subset) → ``shots`` per class (few-shot). The pool does not
    depend on the imbalance ratio or the shots, so one pretrained generator serves every IF and every k.
    """
    size, seed = cfg.image_size, cfg.split_seed
    if cfg.dataset == "digits":
        x, y, names = _digits(size)
        tr, te = _stratified_split(y, cfg.test_fraction, seed)
        full = LabeledImages(x, y, names, size)
        train, test = full.subset(tr), full.subset(te)
    elif cfg.dataset in ("cifar10", "cifar100"):
        xtr, ytr, names = _cifar(cfg, True)
        xte, yte, _ = _cifar(cfg, False)
        train = LabeledImages(xtr, ytr, names, size)
        test = LabeledImages(xte, yte, names, size, index=len(ytr) + np.arange(len(yte)))
    elif cfg.dataset == "imagefolder":
        files, y, names = scan_image_folder(cfg.root)
        if cfg.test_root:
            tfiles, ty, tnames = scan_image_folder(cfg.test_root)
            if tnames != names:
                raise ConfigError(f"data.test_root classes {tnames} differ from data.root classes {names}")
            train = LabeledImages(files, y, names, size)
            test = LabeledImages(tfiles, ty, names, size, index=len(y) + np.arange(len(ty)))
        else:
            full = LabeledImages(files, y, names, size)
            tr, te = _stratified_split(y, cfg.test_fraction, seed)
            train, test = full.subset(tr), full.subset(te)
    else:  # guarded by the config's Literal, kept for programmatic callers
        raise ConfigError(f"data.dataset={cfg.dataset!r} is unknown; use digits, cifar10, cifar100 or imagefolder")

    val = pool = None
    if cfg.val_per_class > 0:
        va = _take_per_class(train.labels, cfg.val_per_class, np.random.default_rng([seed, 1]), names)
        val, train = train.subset(va), train.subset(_rest(len(train), va))
    if cfg.pool_fraction > 0:
        rest, po = _stratified_split(train.labels, cfg.pool_fraction, seed + 2, "data.pool_fraction")
        pool, train = train.subset(po), train.subset(rest)
    if cfg.imbalance_ratio > 1:
        rng = np.random.default_rng(seed)
        keep = longtail_indices(train.labels, train.num_classes, cfg.imbalance_ratio, cfg.class_order_seed, rng,
                                train.class_names, cfg.longtail_profile)
        train = train.subset(keep)
    if cfg.val_fraction > 0:
        tr, va = _stratified_split(train.labels, cfg.val_fraction, seed + 1, "data.val_fraction")
        train, val = train.subset(tr), train.subset(va)
    if cfg.shots > 0:
        train = train.subset(_take_per_class(train.labels, cfg.shots, np.random.default_rng([seed, 3]), names,
                                             "data.shots"))
    for c, n in enumerate(train.class_counts()):
        if n == 0:
            raise ConfigError(f"class {train.class_names[c]!r} has no training images after the long-tail/val "
                              f"split; lower data.imbalance_ratio or data.val_fraction")
    if pool is not None:
        for c, n in enumerate(pool.class_counts()):
            if n == 0:
                raise ConfigError(f"data.pool_fraction={cfg.pool_fraction}: class {names[c]!r} has no pool image; "
                                  f"raise data.pool_fraction")
    shot_counts = train.class_counts()
    if cfg.train_with_pool:
        if pool is None:
            raise ConfigError("data.train_with_pool=true needs a pool: set data.pool_fraction")
        train = train.concat(pool)
    splits = Splits(train, val, test, pool, shot_counts)
    check_disjoint(splits)
    train.transform = train_transform
    return splits


def check_disjoint(splits: Splits, allow_train_pool: bool = True) -> None:
    """No image is in two parts (the pool may be inside train only under data.train_with_pool)."""
    parts = {n: set(getattr(splits, n).index.tolist()) for n in PARTS if getattr(splits, n) is not None}
    for i, a in enumerate(PARTS):
        for b in PARTS[i + 1:]:
            if a in parts and b in parts and parts[a] & parts[b] and not (allow_train_pool and {a, b} == {"train",
                                                                                                        "pool"}):
                raise ConfigError(f"split parts {a!r} and {b!r} share {len(parts[a] & parts[b])} images; "
                                  f"check data.val_per_class / data.pool_fraction")


def check_generator_data(record: dict, splits: Splits, source: str) -> None:
    """A generator may have seen train or pool images, never val or test ones.

    ``record`` is the ``data`` block of a generator's build_info.json (or a fine-tuned folder's manifest) with
    ``dataset`` and ``indices``; ``source`` names the file for the error message.
    """
    if not record or "indices" not in record:
        return  # a generator with no record (a hub model): its pretraining data is outside this data set
    seen = set(int(i) for i in record["indices"])
    for name in ("val", "test"):
        part = getattr(splits, name)
        if part is None:
            continue
        shared = seen & set(part.index.tolist())
        if shared:
            raise ConfigError(f"{source} says the generator saw {len(shared)} images of this run's {name} split "
                              f"(dataset {record.get('dataset')!r}); rebuild it with --data pool or --data train, "
                              f"or change data.split_seed back to the one it was built with")


def check_generator_folders(folders: list[str], splits: Splits) -> None:
    """:func:`check_generator_data` for each local generator folder (the SD's build_info.json, a fine-tuned folder's
    manifest.json); hub ids and folders without a record are outside this data set and pass."""
    import json

    for folder in folders:
        for name in ("build_info.json", "manifest.json"):
            path = Path(folder) / name
            if folder and path.is_file():
                try:
                    record = json.loads(path.read_text()).get("data")
                except (OSError, ValueError) as e:
                    raise ConfigError(f"{path} cannot be read as JSON ({e}); rebuild the generator") from e
                check_generator_data(record or {}, splits, str(path))


def seen_record(cfg: DataConfig, part: LabeledImages, name: str) -> dict:
    """What a generator trained on ``part`` saw: written to build_info.json / the fine-tuned manifest."""
    return {"dataset": cfg.dataset, "part": name, "split_seed": cfg.split_seed, "test_fraction": cfg.test_fraction,
            "val_per_class": cfg.val_per_class, "pool_fraction": cfg.pool_fraction,
            "imbalance_ratio": cfg.imbalance_ratio, "class_order_seed": cfg.class_order_seed,
            "image_size": cfg.image_size, "num_images": len(part), "class_counts": part.class_counts(),
            "indices": sorted(part.index.tolist())}
