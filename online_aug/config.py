"""Typed run configuration: dataclasses loaded from YAML, with dotted command-line overrides.

Every field carries a one-line doc (``doc(...)``); ``python -m online_aug.config`` prints them all.
Unknown keys and wrong types fail with a :class:`ConfigError` that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


# aug.method names (one preset in configs/ each, see README "Presets"); "custom" is any other combination.
METHODS: tuple[str, ...] = (
    "custom", "baseline", "baseline-randaugment", "baseline-mixup-cutmix", "baseline-drw", "baseline-label-smoothing",
    "real-guidance", "real-gen", "real-mix", "da-fusion", "diff-gen", "diff-aug", "diff-mix", "diff-mix-uniformize",
    "diff-mix-cutmix", "latent-perturbation", "composition", "real-guidance-leakage-free", "da-fusion-leakage-free",
)


def doc(default: Any, text: str, **kw: Any) -> Any:
    """A dataclass field with a default and a one-line description."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass
class RunConfig:
    name: str = doc("run", "Run name; the run directory is <out_dir>/<date-time>-<name>.")
    out_dir: str = doc("runs", "Parent folder of run directories.")
    seed: int = doc(0, "Seed for model init, data order and the per-step augmentation RNG.")
    device: Literal["auto", "cpu", "cuda"] = doc("auto", "Where the classifier and generator run.")


@dataclass
class DataConfig:
    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder"] = doc(
        "digits", "digits (embedded sklearn digits), cifar10, cifar100 or imagefolder."
    )
    root: str = doc("data", "Data folder (download target for CIFAR; class folders for imagefolder).")
    test_root: str = doc("", "imagefolder only: a separate test folder; empty means a stratified split of root.")
    image_size: int = doc(32, "Side length, in pixels, of the images the classifier sees.")
    split_seed: int = doc(0, "Seed of the train/test split and long-tail subsample (fixed across run seeds, so a "
                                "generator trained on the training split never sees a test image).")
    test_fraction: float = doc(0.3, "Stratified test fraction for digits / imagefolder without test_root.")
    val_per_class: int = doc(0, "Balanced validation split: this many training images per class, held out before "
                                "the pool and the long-tail subsample (every choice is made on it).")
    pool_fraction: float = doc(0.0, "Generator pool: stratified fraction of the remaining training images that the "
                                    "classifier never sees (a generator may be pretrained on it; tools --data pool).")
    train_with_pool: bool = doc(False, "Add the pool's real images to the classifier's training split (the "
                                       "'more real data' upper bound).")
    val_fraction: float = doc(0.0, "Legacy: fraction of the long-tail training split held out for validation "
                                   "(prefer val_per_class).")
    imbalance_ratio: float = doc(1.0, "Long-tail ratio n_max/n_min (>= 1; 1 keeps the data balanced).")
    class_order_seed: int = doc(0, "Seed of the class order used by the long-tail profile (-1 keeps 0..C-1).")
    many_threshold: int = doc(100, "Classes with more training images than this are 'many'-shot.")
    few_threshold: int = doc(20, "Classes with fewer training images than this are 'few'-shot.")
    num_workers: int = doc(0, "DataLoader worker processes.")
    download: bool = doc(False, "Allow torchvision to download CIFAR when it is missing.")


@dataclass
class ModelConfig:
    name: str = doc("resnet10t", "timm model name of the classifier.")
    pretrained: bool = doc(False, "Load timm pretrained weights (needs the hub).")
    drop_rate: float = doc(0.0, "Classifier dropout rate.")


@dataclass
class TrainConfig:
    steps: int = doc(300, "Optimizer steps.")
    batch_size: int = doc(64, "Global batch size (all ranks, all micro-batches).")
    micro_batch_size: int = doc(0, "Per-rank micro-batch; 0 means batch_size / world_size (no accumulation).")
    lr: float = doc(2e-3, "Peak learning rate (AdamW).")
    weight_decay: float = doc(0.05, "AdamW weight decay.")
    warmup_steps: int = doc(20, "Linear warm-up steps before cosine decay.")
    min_lr_ratio: float = doc(0.05, "Final learning rate as a fraction of lr.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "auto", "Classifier precision: auto is bf16 on CUDA when supported, else fp16 on CUDA, fp32 on CPU."
    )
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage (0, 1, 2 or 3).")
    grad_clip: float = doc(1.0, "Gradient clipping norm (0 disables).")
    label_smoothing: float = doc(0.0, "Label smoothing applied to the (soft) targets.")
    drw_start: float = doc(0.0, "Deferred re-weighting: from this fraction of steps on, weight classes by the "
                                "effective number (beta 0.9999); 0 disables.")
    eval_every: int = doc(100, "Evaluate every N steps (and at the end).")
    log_every: int = doc(10, "Write train scalars every N steps.")
    ckpt_every: int = doc(0, "Save a checkpoint every N steps (0: only at the end).")
    keep_last: int = doc(2, "Checkpoints to keep.")
    eval_batch_size: int = doc(256, "Per-rank eval batch size.")
    eval_split: Literal["test", "val"] = doc(
        "test", "Split evaluated during and after training; 'val' (needs data.val_per_class or val_fraction) for tuning."
    )
    randaugment: str = doc("", "timm RandAugment spec for real images, e.g. 'rand-m9-mstd0.5' (empty: off).")
    mixup_alpha: float = doc(0.0, "timm Mixup alpha (0 disables).")
    cutmix_alpha: float = doc(0.0, "timm CutMix alpha (0 disables).")
    mix_prob: float = doc(1.0, "Probability of applying Mixup/CutMix to a batch.")


@dataclass
class AugConfig:
    alpha: float = doc(0.0, "Fraction of each batch edited by the diffusion model (0 disables augmentation).")
    exact_alpha: bool = doc(True, "True: exactly round(alpha*B) edits per batch; False: Bernoulli(alpha) each.")
    method: str = doc("custom", "Name of the method this config implements (one of config.METHODS; informational).")
    strengths: list[float] = doc([0.5, 0.7, 0.9], "Set of SDEdit strengths s in (0, 1], drawn uniformly per image.")
    strength_range: list[float] = doc([], "If [lo, hi] is given, s ~ U(lo, hi) instead of the set.")
    target_mode: Literal["intra", "inter", "uniformize"] = doc(
        "inter", "intra: target = source; inter: target ~ target_dist; uniformize: flatten real+synthetic classes."
    )
    target_dist: Literal["uniform", "inverse"] = doc("uniform", "inter mode: uniform, or p(c) ∝ 1/n_c^beta.")
    beta: float = doc(1.0, "Exponent of the inverse-frequency target distribution.")
    gamma: float = doc(0.5, "Soft label weight on the target is s^gamma (Diff-Mix eq. 3).")
    model: str = doc("models/tiny-sd-digits", "Stable Diffusion: Hugging Face id or local diffusers folder.")
    prompt: str = doc("a photo of the digit {name}", "Prompt template; {name} is the class name.")
    class_names: list[str] = doc([], "Class names used in prompts (default: the dataset's).")
    negative_prompt: str = doc("", "Unconditional / negative prompt for classifier-free guidance.")
    guidance_scale: float = doc(3.0, "Classifier-free guidance scale (<= 1 disables the unconditional pass).")
    schedule: Literal["fewstep", "grid"] = doc("fewstep", "fewstep: K steps from t0=s*T; grid: diffusers img2img.")
    steps: int = doc(4, "fewstep: denoising steps K per edit.")
    grid_steps: int = doc(25, "grid: N of the N-step schedule; a sample of strength s runs int(N*s) steps.")
    scheduler: Literal["ddim", "euler", "lcm"] = doc("ddim", "Per-sample scheduler update.")
    resolution: int = doc(0, "Generation resolution in pixels (0: the model's native sample size).")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = doc("auto", "Generator dtype: auto is fp16 on CUDA, fp32 on CPU.")
    latent_noise: float = doc(0.0, "Latent perturbation delta: z0 + delta*N(0,I) before SDEdit (semantic-aug §3.1).")
    queue_depth: int = doc(2, "Prefetch queue depth D (batches generated ahead).")
    starvation: Literal["wait", "real"] = doc("wait", "Empty queue: wait (alpha exact) or train on the real batch.")
    prefetch: bool = doc(True, "Generate in a background producer; False runs the edit inside the step.")
    image_every: int = doc(50, "Write an aug/examples grid every N steps (0 disables).")
    taesd: str = doc("", "Optional AutoencoderTiny (id or folder) used for encode/decode.")
    filter_fraction: float = doc(0.0, "CLIP filter: drop this lowest-scoring fraction of edits (0 disables).")
    filter_model: str = doc("openai/clip-vit-base-patch32", "CLIP model used by the filter.")
    filter_metaclass: str = doc("digit", "Metaclass used in the filter prompts.")
    textual_inversion: str = doc("", "Folder written by tools/finetune_sd.py with learned class tokens.")
    lora: str = doc("", "Folder with a UNet LoRA written by tools/finetune_sd.py.")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; allow int→float. Raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {v!r}")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (['a', 'b'], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from an optional YAML file plus dotted overrides, then validate it."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found (pass --config configs/<name>.yaml)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {str(p)!r} cannot be read as YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        _apply(cfg, data)
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- validation


def validate(cfg: Config, *, cuda_available: bool | None = None, world_size: int = 1) -> None:
    """Cross-field checks that can be done before any heavy work."""
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    d, t, a = cfg.data, cfg.train, cfg.aug
    if d.imbalance_ratio < 1:
        raise ConfigError(f"data.imbalance_ratio must be >= 1 (max/min class count), got {d.imbalance_ratio}")
    if not 0 < d.test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.val_per_class < 0:
        raise ConfigError(f"data.val_per_class must be >= 0, got {d.val_per_class}")
    if d.val_per_class and d.val_fraction:
        raise ConfigError("data.val_per_class and data.val_fraction both set: keep one (val_per_class is balanced)")
    if not 0 <= d.pool_fraction < 1:
        raise ConfigError(f"data.pool_fraction must be in [0, 1), got {d.pool_fraction}")
    if d.train_with_pool and d.pool_fraction <= 0:
        raise ConfigError("data.train_with_pool=true needs a pool: set data.pool_fraction (e.g. 0.5)")
    if d.few_threshold > d.many_threshold:
        raise ConfigError("data.few_threshold must be <= data.many_threshold")
    if d.image_size < 8:
        raise ConfigError(f"data.image_size must be >= 8, got {d.image_size}")
    if t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    on_cpu = cfg.run.device == "cpu" or (cfg.run.device == "auto" and not cuda_available)
    if cfg.run.device == "cuda" and not cuda_available:
        raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    if on_cpu and t.precision == "fp16":
        raise ConfigError("train.precision=fp16 needs CUDA (DeepSpeed has no fp16 on CPU); use fp32 or bf16")
    if on_cpu and a.dtype == "fp16" and a.alpha > 0:
        raise ConfigError("aug.dtype=fp16 needs CUDA; use aug.dtype=fp32 or bf16 on CPU")
    per_rank, rem = divmod(t.batch_size, world_size)
    if rem:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the world size {world_size}")
    if t.micro_batch_size and per_rank % t.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} does not divide the per-rank batch {per_rank} "
            f"(train.batch_size / world size)"
        )
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if not 0 <= t.drw_start < 1:
        raise ConfigError(f"train.drw_start must be in [0, 1), got {t.drw_start}")
    if t.mixup_alpha < 0 or t.cutmix_alpha < 0:
        raise ConfigError("train.mixup_alpha and train.cutmix_alpha must be >= 0")
    if not 0 <= t.mix_prob <= 1:
        raise ConfigError(f"train.mix_prob must be in [0, 1], got {t.mix_prob}")
    if (t.mixup_alpha > 0 or t.cutmix_alpha > 0) and t.label_smoothing > 0:
        raise ConfigError("train.label_smoothing conflicts with Mixup/CutMix soft targets here: timm's Mixup "
                          "applies its own smoothing; set train.label_smoothing=0")
    if (t.mixup_alpha > 0 or t.cutmix_alpha > 0) and ((t.micro_batch_size or per_rank) % 2):
        raise ConfigError("Mixup/CutMix need an even micro-batch (train.micro_batch_size or batch_size/world)")
    if t.eval_split == "val" and d.val_fraction <= 0 and d.val_per_class <= 0:
        raise ConfigError("train.eval_split=val needs a validation split: set data.val_per_class (e.g. 10)")
    # augmentation
    if a.method not in METHODS:
        raise ConfigError(f"aug.method={a.method!r} is unknown; use one of {', '.join(METHODS)} "
                          f"('custom' for any other combination)")
    if not 0 <= a.alpha <= 1:
        raise ConfigError(f"aug.alpha must be in [0, 1], got {a.alpha}")
    for s in a.strengths:
        if not 0 < s <= 1:
            raise ConfigError(f"aug.strengths: {s} is outside (0, 1]")
    if a.strength_range:
        if len(a.strength_range) != 2 or not 0 < a.strength_range[0] <= a.strength_range[1] <= 1:
            raise ConfigError(f"aug.strength_range must be [lo, hi] with 0 < lo <= hi <= 1, got {a.strength_range}")
    elif not a.strengths and a.alpha > 0:
        raise ConfigError("aug.strengths is empty; give a set of strengths or aug.strength_range")
    if a.steps < 1:
        raise ConfigError(f"aug.steps (K) must be >= 1, got {a.steps}")
    if a.schedule == "grid" and a.alpha > 0:
        lo = a.strength_range[0] if a.strength_range else min(a.strengths)
        if int(a.grid_steps * lo) < 1:
            raise ConfigError(
                f"aug.grid_steps={a.grid_steps} with strength {lo} gives int(N*s)=0 denoising steps; "
                f"raise aug.grid_steps or the smallest strength"
            )
    if a.gamma <= 0:
        raise ConfigError(f"aug.gamma must be > 0, got {a.gamma}")
    if not 0 <= a.filter_fraction < 1:
        raise ConfigError(f"aug.filter_fraction must be in [0, 1), got {a.filter_fraction}")
    if a.queue_depth < 1:
        raise ConfigError(f"aug.queue_depth must be >= 1, got {a.queue_depth}")
    if a.latent_noise < 0:
        raise ConfigError(f"aug.latent_noise must be >= 0, got {a.latent_noise}")


def describe() -> str:
    """Markdown table of every config key with its default and doc."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for sec in dataclasses.fields(Config):
        sub = sec.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(sub):
            val = getattr(sub, f.name)
            rows.append(f"| `{sec.name}.{f.name}` | `{val!r}` | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(describe())
