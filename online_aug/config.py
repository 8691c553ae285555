"""Typed run configuration: dataclasses loaded from YAML, with dotted command-line overrides.

Every field carries a one-line doc (``doc(...)``); ``python -m online_aug.config`` prints them all.
Unknown keys and wrong types fail with a :class:`ConfigError` that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


# aug.method names (one preset in configs/ each, see docs/presets.md); "custom" is any other combination.
METHODS: tuple[str, ...] = (
    "custom", "baseline", "baseline-randaugment", "baseline-mixup-cutmix", "baseline-drw", "baseline-label-smoothing",
    "baseline-cb", "baseline-cmo", "baseline-upper-bound",
    "real-guidance", "real-gen", "real-mix", "da-fusion", "diff-gen", "diff-aug", "diff-mix", "diff-mix-uniformize",
    "diff-mix-cutmix", "diff-mix-lcm", "latent-perturbation", "composition", "real-guidance-leakage-free",
    "da-fusion-leakage-free",
    "object-centric-foreground", "object-centric-background", "ssl-real-pool", "ssl-gen",
)
# run.stop_signals may name these (catchable, and what schedulers send: SLURM SIGTERM/SIGUSR1, PBS/LSF SIGXCPU)
STOP_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGXCPU")
OnFault = Literal["stop", "real"]  # aug.on_fault, and what a Prefetcher does once its producer failed
FAULT_MODES: tuple[str, ...] = typing.get_args(OnFault)


@dataclass(frozen=True)
class Bounds:
    """A field's simple bounds (of every item, for a list field), declared next to it with :func:`doc` and checked by
    :func:`check_bounds`; ``note`` says what the bound means where the key's name does not."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] = ()
    note: str = ""

    def interval(self) -> str:
        """The numeric range as the messages and the config reference write it: ``[0, 1)``, ``>= 1``, ``> 0``."""
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else ""
        hi = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else ""
        if lo and hi:
            return f"{lo}, {hi}"
        if lo:
            return f"{'>=' if self.ge is not None else '>'} {lo[1:]}"
        if hi:
            return f"{'<=' if self.le is not None else '<'} {hi[:-1]}"
        return ""

    def check(self, key: str, value: Any) -> None:
        """ConfigError naming ``key`` unless ``value`` is within the bounds (NaN never is)."""
        why = f" ({self.note})" if self.note else ""
        if self.choices and value not in self.choices:
            raise ConfigError(f"{key}={value!r} is unknown; use one of {', '.join(map(str, self.choices))}{why}")
        # written so that a comparison with NaN fails
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        if not ok:
            interval = self.interval()
            raise ConfigError(f"{key} must be {'in ' if interval[0] in '[(' else ''}{interval}{why}, got {value}")


def doc(default: Any, text: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, choices: tuple[Any, ...] = (), note: str = "", **kw: Any) -> Any:
    """A dataclass field with a default, a one-line description and optional bounds (``ge``/``gt``/``le``/``lt``,
    ``choices``; for a list field, of each item) that :func:`check_bounds` enforces."""
    meta: dict[str, Any] = {"doc": text}
    if ge is not None or gt is not None or le is not None or lt is not None or choices:
        meta["bounds"] = Bounds(ge, gt, le, lt, tuple(choices), note)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check_bounds(section: Any, name: str) -> None:
    """Every declared bound of a config section (``name``: its key prefix, e.g. ``aug``), field by field in
    declaration order; a list field's items are named ``<key>[i]``."""
    for f in dataclasses.fields(section):
        bounds: Bounds | None = f.metadata.get("bounds")
        if bounds is None:
            continue
        key, value = f"{name}.{f.name}", getattr(section, f.name)
        if isinstance(value, list):
            for i, item in enumerate(value):
                bounds.check(f"{key}[{i}]", item)
        else:
            bounds.check(key, value)


def fp16_needs_cuda(key: str, value: str, on_cpu: bool) -> None:
    """fp16 runs on CUDA only (DeepSpeed has no fp16 on CPU; the generator's fp16 kernels are CUDA's): the one
    statement of the rule, for the config at load (``on_cpu`` from run.device) and for a generator built on a device
    a tool picked."""
    if value == "fp16" and on_cpu:
        raise ConfigError(f"{key}=fp16 needs CUDA; use {key}=fp32 or bf16 on CPU")


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of ``aug.lora``: a folder or hub id, merged into the UNet at ``weight``; ``key`` names it in errors
    (``aug.lora`` for the one-string form, ``aug.lora[i]`` for a list's entry)."""

    path: str
    weight: float
    key: str = "aug.lora"


def lora_entries(value: str | list[str], default_weight: float, key: str = "aug.lora") -> list[LoraEntry]:
    """Parse ``aug.lora``: a string (one LoRA, or none when empty) or a list, each ``path`` (weight
    ``default_weight``, aug.lora_scale) or ``path:weight``. A name that is an existing folder is taken whole, colon
    or not. ConfigError naming the entry for an empty entry, a weight that is not a finite number, or a LoRA listed
    twice."""
    items = [value] if isinstance(value, str) else list(value)
    if isinstance(value, str) and not value.strip():
        return []
    out: list[LoraEntry] = []
    for i, raw in enumerate(items):
        name = key if isinstance(value, str) else f"{key}[{i}]"
        text = raw.strip()
        if not text:
            raise ConfigError(f"{name} is empty; give a LoRA folder or hub id ('path' or 'path:weight'), or remove "
                              f"the entry")
        path, weight = text, default_weight
        if ":" in text and not Path(text).expanduser().is_dir():
            path, _, tail = text.rpartition(":")
            try:
                weight = float(tail)
            except ValueError:
                weight = math.nan
            if not path or not math.isfinite(weight):
                raise ConfigError(f"{name}={raw!r}: write a LoRA as 'path' or 'path:weight' with a number after the "
                                  f"last ':' (e.g. {path or 'models/ft'}:0.5); without one it gets aug.lora_scale")
        out.append(LoraEntry(path, float(weight), name))
    seen: dict[Path, str] = {}
    for e in out:
        where = Path(e.path).expanduser()
        if where in seen:
            raise ConfigError(f"{e.key}={e.path!r} is listed twice in {key} (also {seen[where]}); keep one entry, "
                              f"with the summed weight")
        seen[where] = e.key
    return out


@dataclass
class RunConfig:
    name: str = doc("run", "Run name; the run directory is <out_dir>/<date-time>-<name>.")
    out_dir: str = doc("runs", "Parent folder of run directories.")
    seed: int = doc(0, "Seed for model init, data order and the per-step augmentation RNG.", ge=0)
    device: Literal["auto", "cpu", "cuda"] = doc("auto", "Where the classifier and generator run.")
    reference: str = doc("", "<results.csv>:<row> of tools/compare.py printed beside the final table (mean over its "
                             "seeds), e.g. the committed CE baseline of the same split; empty: none.")
    stop_signals: list[str] = doc(["SIGTERM", "SIGUSR1"], "Signals that stop the run cleanly: finish the step, "
                                                          "checkpoint, exit 75 (Ctrl-C too); docs/faults.md.",
                                  choices=STOP_SIGNALS, note="the signals that can stop a run")

    def validate(self) -> None:
        check_bounds(self, "run")
        if not self.name or "/" in self.name or "\\" in self.name:
            raise ConfigError(f"run.name={self.name!r} must be a non-empty name without '/' (the run directory is "
                              f"<out_dir>/<date-time>-<name>; put folders in run.out_dir)")
        if not self.out_dir:
            raise ConfigError("run.out_dir is empty; give the parent folder of run directories (e.g. runs)")


@dataclass
class DataConfig:
    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder"] = doc(
        "digits", "digits (embedded sklearn digits), cifar10, cifar100 or imagefolder."
    )
    root: str = doc("data", "Data folder (download target for CIFAR; class folders for imagefolder).")
    test_root: str = doc("", "imagefolder only: a separate test folder; empty means a stratified split of root.")
    image_size: int = doc(32, "Side length, in pixels, of the images the classifier sees.", ge=8)
    split_seed: int = doc(0, "Seed of the train/test split and long-tail subsample (fixed across run seeds, so a "
                                "generator trained on the training split never sees a test image).", ge=0)
    test_fraction: float = doc(0.3, "Stratified test fraction for digits / imagefolder without test_root.", gt=0,
                               lt=1)
    val_per_class: int = doc(0, "Balanced validation split: this many training images per class, held out before "
                                "the pool and the long-tail subsample (every choice is made on it).", ge=0)
    pool_fraction: float = doc(0.0, "Generator pool: stratified fraction of the remaining training images that the "
                                    "classifier never sees (a generator may be pretrained on it; tools --data pool).",
                                ge=0, lt=1)
    train_with_pool: bool = doc(False, "Add the pool's real images to the classifier's training split (the "
                                       "'more real data' upper bound).")
    val_fraction: float = doc(0.0, "Legacy, kept for older configs: fraction of the long-tail training split held "
                                   "out for validation (stratified, so not balanced); use val_per_class.", ge=0, lt=1)
    imbalance_ratio: float = doc(1.0, "Long-tail ratio n_max/n_min (>= 1; 1 keeps the data balanced).", ge=1,
                                 note="max/min class count")
    longtail_profile: Literal["cifar", "diffmix"] = doc(
        "cifar", "cifar: n_c = int(n_max*ratio^(-c/(C-1))), n_max the smallest class (Cao et al. 2019); diffmix: "
                 "Diff-Mix eq. 4, n_k = max(int(n_mean*ratio^(-k/(C-2))), 1), classes by size (Table 10's totals).")
    class_order_seed: int = doc(0, "Seed of the class order used by the long-tail profile (-1 keeps 0..C-1; diffmix: "
                                   "breaks ties between equal-sized classes).", ge=-1, note="-1: the order 0..C-1")
    shots: int = doc(0, "Few-shot: keep k training images per class (seeded by split_seed), after the val/pool "
                        "split; 0 keeps all.", ge=0)
    many_threshold: int = doc(100, "Classes with more training images than this are 'many'-shot.")
    few_threshold: int = doc(20, "Classes with fewer training images than this are 'few'-shot.", ge=0)
    sampler: Literal["random", "class_balanced"] = doc(
        "random", "random: epochs of the training split; class_balanced: every class equally often (CB resampling).")
    num_workers: int = doc(0, "DataLoader worker processes.", ge=0)
    download: bool = doc(False, "Allow torchvision to download CIFAR when it is missing.")

    def validate(self) -> None:
        check_bounds(self, "data")
        if self.val_per_class and self.val_fraction:
            raise ConfigError("data.val_per_class and data.val_fraction both set: keep one (val_per_class is balanced)")
        if self.train_with_pool and self.pool_fraction <= 0:
            raise ConfigError("data.train_with_pool=true needs a pool: set data.pool_fraction (e.g. 0.5)")
        if self.shots and self.imbalance_ratio > 1:
            raise ConfigError(f"data.shots={self.shots} keeps k images of every class, which undoes "
                              f"data.imbalance_ratio={self.imbalance_ratio}; keep one (imbalance_ratio=1 for few-shot)")
        if self.few_threshold > self.many_threshold:
            raise ConfigError("data.few_threshold must be <= data.many_threshold")
        if not self.root:
            raise ConfigError("data.root is empty; give the data folder (e.g. data)")


@dataclass
class ModelConfig:
    name: str = doc("resnet10t", "timm model name of the classifier.")
    pretrained: bool = doc(False, "Load timm pretrained weights (needs the hub).")
    pretrained_file: str = doc("", "model.pretrained from a local weights file (.safetensors/.pth) instead of the "
                                   "hub; a head of another class count is dropped.")
    drop_rate: float = doc(0.0, "Classifier dropout rate.", ge=0, lt=1)
    freeze_backbone: bool = doc(False, "Train the classifier head only (a linear probe): the pretrained backbone "
                                       "stays frozen, in eval mode (fixed BatchNorm statistics).")

    def validate(self) -> None:
        check_bounds(self, "model")
        if not self.name:
            raise ConfigError("model.name is empty; give a timm model name (e.g. resnet10t)")
        if self.freeze_backbone and not self.pretrained:
            raise ConfigError("model.freeze_backbone=true trains the head on a random backbone: set "
                              "model.pretrained=true (or model.freeze_backbone=false)")
        if self.pretrained_file and not self.pretrained:
            raise ConfigError("model.pretrained_file is set but model.pretrained=false; set model.pretrained=true")


@dataclass
class TrainConfig:
    steps: int = doc(300, "Optimizer steps (ignored when train.epochs > 0).", ge=1)
    epochs: int = doc(0, "> 0: train this many epochs instead; steps = ceil(epochs * training images / batch_size), "
                         "counted after the split protocol and recorded in the run's config.yaml.", ge=0)
    batch_size: int = doc(64, "Global batch size (all ranks, all micro-batches).", ge=1)
    micro_batch_size: int = doc(0, "Per-rank micro-batch; 0 means batch_size / world_size (no accumulation).", ge=0)
    optimizer: Literal["adamw", "sgd"] = doc("adamw", "adamw (decoupled weight decay) or sgd (momentum, L2 weight "
                                                      "decay), on the trainable parameters.")
    lr: float = doc(2e-3, "Peak learning rate.", gt=0)
    momentum: float = doc(0.9, "sgd: momentum.", ge=0, lt=1)
    nesterov: bool = doc(False, "sgd: Nesterov momentum.")
    weight_decay: float = doc(0.05, "Weight decay (AdamW: decoupled; SGD: L2).", ge=0)
    warmup_steps: int = doc(20, "Linear warm-up steps before cosine decay.", ge=0)
    min_lr_ratio: float = doc(0.05, "Final learning rate as a fraction of lr.", ge=0, le=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "auto", "Classifier precision: auto is bf16 on CUDA when supported, else fp16 on CUDA, fp32 on CPU."
    )
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage (0, 1, 2 or 3).", choices=(0, 1, 2, 3))
    grad_clip: float = doc(1.0, "Gradient clipping norm (0 disables).", ge=0)
    label_smoothing: float = doc(0.0, "Label smoothing applied to the (soft) targets.", ge=0, lt=1)
    drw_start: float = doc(0.0, "Deferred re-weighting: from this fraction of steps on, weight classes by the "
                                "effective number (beta 0.9999); 0 disables.", ge=0, lt=1)
    eval_every: int = doc(100, "Evaluate every N steps (and at the end).", ge=1)
    log_every: int = doc(10, "Write train scalars every N steps.", ge=1)
    ckpt_every: int = doc(0, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    keep_last: int = doc(2, "Complete checkpoints to keep (the newest complete one is never deleted).", ge=1)
    max_bad_steps: int = doc(5, "Divergence guard: a micro-batch with a non-finite loss (or above train.max_loss) is "
                                "skipped and counted; this many in a row stop the run (exit 3); 0: off.", ge=0)
    max_loss: float = doc(0.0, "Divergence guard: a finite loss above this also counts as bad (0: no threshold).",
                          ge=0)
    guard_every: int = doc(0, "Divergence guard interval: 1 reads each micro-batch's loss on the host and skips a bad "
                              "one exactly (a device sync per micro-batch on GPU); N > 1 checks on the device and "
                              "reads every N steps (no per-step sync): a bad loss then stops the run (exit 3) "
                              "without saving the weights it reached; 0 (auto): 1 on CPU, train.log_every on CUDA.",
                           ge=0, note="0: auto")
    eval_batch_size: int = doc(256, "Per-rank eval batch size.", ge=1)
    eval_split: Literal["test", "val"] = doc(
        "test", "Split evaluated during and after training; 'val' (needs data.val_per_class or val_fraction) "
                "for tuning."
    )
    select: Literal["last", "val"] = doc(
        "last", "Which weights the final metrics describe: last, or val (the best val balanced accuracy over the "
                "evaluations, kept as checkpoint tag 'best'; needs data.val_per_class).")
    transform: Literal["none", "timm"] = doc(
        "none", "Real-image training transform: none (images as stored), or timm's create_transform: "
                "random-resized-crop from the full-resolution image, flip, colour jitter, train.randaugment.")
    crop_scale: list[float] = doc([0.08, 1.0], "transform=timm: random-resized-crop area range [lo, hi].")
    hflip: float = doc(0.5, "transform=timm: horizontal flip probability.", ge=0, le=1)
    color_jitter: float = doc(0.4, "transform=timm: brightness/contrast/saturation jitter (0: off; timm turns it "
                                   "off when train.randaugment is set).", ge=0)
    randaugment: str = doc("", "timm RandAugment spec for real images, e.g. 'rand-m9-mstd0.5' (empty: off).")
    mixup_alpha: float = doc(0.0, "timm Mixup alpha (0 disables).", ge=0)
    cutmix_alpha: float = doc(0.0, "timm CutMix alpha (0 disables).", ge=0)
    mix_prob: float = doc(1.0, "Probability of applying Mixup/CutMix to a batch.", ge=0, le=1)
    cmo_prob: float = doc(0.0, "CMO (Park et al. 2022): probability of pasting a CutMix box from a class-balanced "
                               "(minority) batch onto each batch; 0 disables.", ge=0, le=1)

    def validate(self, world_size: int = 1) -> None:
        """This section's keys; the batch split is checked for ``world_size`` (1 at load, the real one at launch)."""
        check_bounds(self, "train")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ConfigError("train.nesterov=true needs train.optimizer=sgd and train.momentum > 0")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"train.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.mixing and self.label_smoothing > 0:
            raise ConfigError("train.label_smoothing conflicts with Mixup/CutMix soft targets here: timm's Mixup "
                              "applies its own smoothing; set train.label_smoothing=0")
        self.check_world_size(world_size)

    @property
    def mixing(self) -> bool:
        """Mixup or CutMix is on."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def check_world_size(self, world_size: int) -> None:
        """The checks that depend on the number of ranks: the trainer calls this once the launcher has set it."""
        per_rank, rem = divmod(self.batch_size, world_size)
        if rem:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by the world size {world_size}")
        if self.micro_batch_size and per_rank % self.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size={self.micro_batch_size} does not divide the per-rank batch {per_rank} "
                f"(train.batch_size / world size)"
            )
        if self.mixing and ((self.micro_batch_size or per_rank) % 2):
            raise ConfigError("Mixup/CutMix need an even micro-batch (train.micro_batch_size or batch_size/world)")


@dataclass
class AugConfig:
    alpha: float = doc(0.0, "Fraction of each batch edited by the diffusion model (0 disables augmentation).", ge=0,
                       le=1)
    source_weight: Literal["uniform", "frequency"] = doc(
        "uniform", "Which batch images become edit sources: uniform, or frequency (weighted by their class's training "
                   "count: head images are edited toward the targets, the few tail images stay real; CMO's 'the "
                   "majority helps the minority').")
    exact_alpha: bool = doc(True, "True: exactly round(alpha*B) edits per batch; False: Bernoulli(alpha) each.")
    method: str = doc("custom", "Name of the method this config implements (one of config.METHODS; informational).",
                      choices=METHODS, note="'custom' for any other combination")
    strengths: list[float] = doc([0.5, 0.7, 0.9], "Set of SDEdit strengths s in (0, 1], drawn uniformly per image.",
                                 gt=0, le=1)
    strength_range: list[float] = doc([], "If [lo, hi] is given, s ~ U(lo, hi) instead of the set.")
    target_mode: Literal["intra", "inter", "uniformize"] = doc(
        "inter", "intra: target = source; inter: target ~ target_dist; uniformize: flatten real+synthetic classes."
    )
    target_dist: Literal["uniform", "inverse"] = doc("uniform", "inter mode: uniform, or p(c) ∝ 1/n_c^beta.")
    beta: float = doc(1.0, "Exponent of the inverse-frequency target distribution.", ge=0)
    gamma: float = doc(0.5, "Soft label weight on the target is s^gamma (Diff-Mix eq. 3).", gt=0)
    label_rates: str = doc("", "Calibrated soft labels: a JSON of per-class target rates (tools/edit_rates.py); the "
                               "target weight becomes s^gamma * rate(target), the rest stays on the source.")
    model: str = doc("models/tiny-sd-digits", "Stable Diffusion: Hugging Face id or local diffusers folder.")
    prompt: str = doc("a photo of the digit {name}", "Prompt template; {name} is the class name.")
    prompts: list[str] = doc([], "Prompt diversity: more templates beside aug.prompt; each edit draws one with the "
                                 "step RNG (all cached).")
    prompt_file: str = doc("", "Prompt diversity: a text file of more templates, one per line ('#' comments).")
    class_names: list[str] = doc([], "Class names used in prompts (default: the dataset's).")
    negative_prompt: str = doc("", "Unconditional / negative prompt for classifier-free guidance.")
    guidance_scale: float = doc(3.0, "Classifier-free guidance scale (<= 1 disables the unconditional pass).", ge=0)
    schedule: Literal["fewstep", "grid"] = doc("fewstep", "fewstep: K steps from t0=s*T; grid: diffusers img2img.")
    steps: int = doc(4, "fewstep: denoising steps K per edit.", ge=1, note="K")
    grid_steps: int = doc(25, "grid: N of the N-step schedule; a sample of strength s runs int(N*s) steps.", ge=1)
    scheduler: Literal["ddim", "euler", "lcm", "dpmsolver++"] = doc(
        "ddim", "Per-sample scheduler update (dpmsolver++: DPM-Solver++ multistep, Diff-Mix's sampler).")
    solver_order: int = doc(2, "dpmsolver++: solver order, 1 or 2 (2M, diffusers' default).")
    gen_from_noise: bool = doc(False, "Text-to-image Gen: a sample of strength 1 starts from pure noise, not from "
                                      "the noised reference (Diff-Mix §3.4 Real-/Diff-Gen).")
    resolution: int = doc(0, "Generation resolution in pixels (0: the model's native sample size).", ge=0)
    edit_source: Literal["auto", "view", "full"] = doc(
        "auto", "What an edit starts from: full = the stored image at the generator's resolution with the crop/flip "
                "of the classifier's view (read from the file), the edit then resized to data.image_size; view = the "
                "classifier's view resized up; auto = full for data.dataset=imagefolder, view otherwise.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = doc("auto", "Generator dtype: auto is fp16 on CUDA, fp32 on CPU.")
    latent_noise: float = doc(0.0, "Latent perturbation delta: z0 + delta*N(0,I) before SDEdit (semantic-aug §3.1).",
                              ge=0)
    queue_depth: int = doc(2, "Prefetch queue depth D (batches generated ahead).", ge=1)
    starvation: Literal["wait", "real"] = doc("wait", "Empty queue: wait (alpha exact) or train on the real batch.")
    prefetch: bool = doc(True, "Generate in a background producer; False runs the edit inside the step.")
    timeout_s: float = doc(300.0, "Producer fault: one generator step (a micro-batch's edit) running longer than "
                                  "this many seconds counts as hung (aug.on_fault).", gt=0,
                           note="seconds a generator step may take")
    on_fault: OnFault = doc(
        "stop", "A hung or dead producer (incl. CUDA out of memory): stop (checkpoint, exit 3) or real (go on with "
                "real batches, aug/producer_fault).")
    image_every: int = doc(50, "Write an aug/examples grid every N steps (0 disables).", ge=0)
    taesd: str = doc("", "Optional AutoencoderTiny (id or folder) used for encode/decode.")
    cuda_graph: Literal["auto", "always", "never"] = doc(
        "auto", "CUDA-graph the few-step UNet loop, captured once per shape in the producer: auto uses it on CUDA when "
                "the loop is static (fewstep, no masks; LCM's per-step noise is drawn before the loop); always also "
                "says why when it falls back to eager.")
    compile: bool = doc(False, "torch.compile the UNet on CUDA (instead of aug.cuda_graph; the first edits compile); "
                               "eager elsewhere, said in the log.")
    channels_last: bool = doc(True, "On CUDA, UNet and VAE weights in channels_last (faster fp16/bf16 convolutions).")
    filter_fraction: float = doc(0.0, "CLIP filter: drop this lowest-scoring fraction of edits (0 disables).", ge=0,
                                 lt=1)
    filter_model: str = doc("openai/clip-vit-base-patch32", "CLIP model used by the filter.")
    filter_metaclass: str = doc("digit", "Metaclass used in the filter prompts.")
    textual_inversion: str = doc("", "Folder written by tools/finetune_sd.py with learned class tokens.")
    lora: str | list[str] = doc("", "UNet LoRA: a folder written by tools/finetune_sd.py (or a diffusers LoRA folder "
                                    "or hub id), or a list of them stacked as diffusers adapters (set_adapters), each "
                                    "'path' or 'path:weight', e.g. [models/ft, latent-consistency/lcm-lora-sdv1-5:1.0]"
                                    "; merged into the UNet.")
    lora_scale: float = doc(1.0, "Weight of each aug.lora entry without its own ':weight' (diffusers' lora_scale): "
                                 "below 1 moves the fine-tuned generator back toward its base model's diversity.", gt=0,
                            note="1 = the LoRA as trained")
    finetune_command: str = doc("", "The tools/finetune_sd.py command whose --out is aug.textual_inversion / aug.lora; "
                                    "printed when that folder is missing.")
    adaptive: bool = doc(False, "Closed loop: the classifier's live per-class statistics steer targets, source->target "
                                "pairs and strengths (docs/closed-loop.md).")
    adaptive_every: int = doc(10, "Optimizer steps between statistics snapshots (also the all-reduce interval).", ge=1)
    adaptive_ema: float = doc(0.9, "EMA decay of the per-class statistics, per snapshot.", ge=0, lt=1)
    adaptive_tau: float = doc(1.0, "Targets q ∝ prior x (error + 1e-3)^tau (0: the static prior).", ge=0)
    adaptive_floor: float = doc(0.1, "Share of q spread uniformly over classes, so no class starves.", ge=0, le=1)
    adaptive_pairs: float = doc(0.5, "Share of edits whose target is drawn from the source's confusions.", ge=0, le=1)
    adaptive_strength: float = doc(0.0, "kappa in [-1, 1]: per-target strength mid + kappa*(hi-lo)/2*(2*edit_acc-1); "
                                        ">0 raises s where edits are already recognised, <0 lowers it; 0 off.",
                                ge=-1, le=1)
    dup_threshold: float = doc(0.05, "Near-duplicate guard: an edit whose RMS distance (8x8 gray) to its nearest "
                                     "training image of the target class is below this is counted in aug/near_dup.",
                               ge=0)
    label_correction: float = doc(0.0, "Labels the classifier corrects: an edit's soft label becomes (1 - beta) x the "
                                       "policy's + beta x the classifier's own prediction on it (soft bootstrapping, "
                                       "same forward); 0: off.", ge=0, lt=1)
    guard: Literal["on", "off"] = doc(
        "on", "Guard (docs/guard.md): on = edits go only toward the classes the generator audit says it can help "
              "(none: train on real images only, the generator not kept); off = edits as configured (a bad audit "
              "verdict is warned about).")
    audit: bool = doc(True, "Audit the generator before training (per class: does it draw the class, vary it, "
                            "copy it); printed, in TensorBoard aug/guard/* and <run>/audit.md.")
    audit_edits: int = doc(16, "Audit: edits toward each class (from other classes' training images, at the "
                               "highest strength).", ge=2, note="the spread needs pairs")
    audit_copy_dist: float = doc(0.05, "Audit: an edit closer than this (RMS, 8x8 gray) to a training image of its "
                                       "class counts as a copy.", gt=0, le=1)
    guard_min_target_rate: float = doc(0.2, "Guard: a class needs its audit edits judged as the class this much more "
                                            "often than the edits toward other classes are (the lift; 0 for a "
                                            "generator that ignores its prompt).", ge=0, le=1)
    guard_min_spread: float = doc(0.35, "Guard: a class's audit edits must spread at least this fraction of a real "
                                        "class's spread (below: one image repeated).", ge=0)
    guard_max_copy: float = doc(0.5, "Guard: at most this share of a class's audit edits may be copies of its "
                                     "training images.", ge=0, le=1)
    guard_min_share: float = doc(1.0, "Guard: the classes the generator can help must hold at least this share of "
                                      "the policy's target distribution, else no edits at all. 1 (default): all or "
                                      "nothing, the only rule equal to the baseline by construction; below 1 the "
                                      "partial guard (measured to cost the TI/LoRA generators 7-11 few-shot points: "
                                      "docs/guard.md).", ge=0, le=1)
    guard_fallback: Literal["source", "target"] = doc(
        "target", "Partial guard (aug.guard_min_share < 1): what an edit toward a class the generator cannot help "
                  "becomes. target: a real training image of that class, one-hot (class-balanced resampling there, "
                  "so the edits toward the classes that pass do not tilt the class prior toward them); source: its "
                  "real source row, one-hot (tilts it: docs/guard.md).")
    reuse: int = doc(1, "Reuse factor k: each edit is used in k consecutive steps (an in-memory ring, ~1/k of the "
                        "generator work; DA-Fusion's M); 1: every edit fresh.", ge=1,
                     note="times each edit is used; 1: all fresh")
    safety_checker: str = doc("", "SD safety checker: '' off; 'model' (aug.model's safety_checker/) or a folder/hub "
                                  "id. A flagged edit is re-sampled once, then replaced by its real image.")
    mask_mode: Literal["off", "foreground", "background"] = doc(
        "off", "Object-centric edits (semantic-aug §3.3): foreground edits only the (dilated) object mask, background "
               "only its complement; the rest of the image is kept pixel for pixel.")
    mask_source: str = doc("threshold", "Where object masks come from: threshold (the stroke mask, gray > "
                                        "aug.mask_threshold; the embedded digits) or a mask folder holding one mask "
                                        "per image of data.root at the same relative path (white = object).")
    mask_threshold: float = doc(0.25, "mask_source=threshold: a pixel whose gray level in [0, 1] is above this is "
                                      "the object.", ge=0, lt=1)
    mask_dilate: int = doc(16, "Object mask dilation in pixels at the generator's resolution (semantic-aug §4.2.1: "
                               "16 at 512).", ge=0)
    inpaint: Literal["unet", "blend"] = doc(
        "unet", "How a masked edit is made: unet (an SD-inpainting UNet, 9 input channels) or blend (masked SDEdit "
                "on a plain UNet: the kept region is re-noised from the source at every step).")

    def lora_stack(self) -> list[LoraEntry]:
        """``aug.lora`` as (path, weight) entries, in order (:func:`lora_entries`); empty for no LoRA."""
        return lora_entries(self.lora, self.lora_scale)

    def validate(self) -> None:
        """This section's keys. Files and folders (aug.model, ...) are checked by generator.preflight."""
        check_bounds(self, "aug")
        if self.adaptive:
            if self.alpha <= 0:
                raise ConfigError("aug.adaptive=true needs edits to steer: set aug.alpha > 0 (or aug.adaptive=false)")
            if self.target_mode == "intra" and self.adaptive_pairs > 0:
                raise ConfigError("aug.adaptive_pairs > 0 changes targets, which aug.target_mode=intra keeps equal "
                                  "to the source; set aug.adaptive_pairs=0 or target_mode inter/uniformize")
        if self.guard == "on" and not self.audit and self.alpha > 0:
            raise ConfigError("aug.guard=on acts on the generator audit: set aug.audit=true, or aug.guard=off to edit "
                              "without it")
        if self.reuse > 1 and not self.exact_alpha:
            raise ConfigError("aug.reuse > 1 reuses edits slot by slot, which needs the same number of edits every "
                              "step: set aug.exact_alpha=true (or aug.reuse=1)")
        if self.reuse > 1 and self.adaptive:
            raise ConfigError("aug.reuse > 1 reuses edits planned from older statistics, which aug.adaptive=true "
                              "steers step by step; set aug.reuse=1 or aug.adaptive=false")
        if self.scheduler == "dpmsolver++" and self.solver_order not in (1, 2):
            raise ConfigError(f"aug.solver_order={self.solver_order}: the per-sample DPM-Solver++ implements orders "
                              f"1 and 2; use 2 (2M)")
        if self.scheduler != "dpmsolver++" and self.solver_order != 2:
            raise ConfigError(f"aug.solver_order={self.solver_order} applies to aug.scheduler=dpmsolver++ only; "
                              f"leave it at 2 for aug.scheduler={self.scheduler}")
        if self.gen_from_noise and self.alpha > 0:
            hi = self.strength_range[1] if self.strength_range else max(self.strengths, default=0.0)
            if hi < 1:
                raise ConfigError("aug.gen_from_noise=true acts on strength-1 samples but no strength is 1; add 1.0 "
                                  "to aug.strengths (or set aug.gen_from_noise=false)")
        if self.prompt_file and not Path(self.prompt_file).is_file():
            raise ConfigError(f"aug.prompt_file={self.prompt_file!r} is not a file; give a text file with one prompt "
                              f"template per line, or leave it empty")
        loras = self.lora_stack()  # every entry's syntax, before anything is loaded
        if self.finetune_command:
            _check_finetune_command(self.finetune_command, self.textual_inversion, [e.path for e in loras])
        if self.mask_mode != "off" and not self.mask_source.strip():
            raise ConfigError("aug.mask_source is empty; use threshold or a mask folder (or aug.mask_mode=off)")
        if self.strength_range:
            lo_hi = self.strength_range
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                raise ConfigError(f"aug.strength_range must be [lo, hi] with 0 < lo <= hi <= 1, got {lo_hi}")
        elif not self.strengths and self.alpha > 0:
            raise ConfigError("aug.strengths is empty; give a set of strengths or aug.strength_range")
        if self.schedule == "grid" and self.alpha > 0:
            lo = self.strength_range[0] if self.strength_range else min(self.strengths)
            if int(self.grid_steps * lo) < 1:
                raise ConfigError(
                    f"aug.grid_steps={self.grid_steps} with strength {lo} gives int(N*s)=0 denoising steps; "
                    f"raise aug.grid_steps or the smallest strength"
                )
        if self.filter_fraction > 0 and self.alpha > 0 and not self.filter_metaclass.strip():
            raise ConfigError("aug.filter_metaclass is empty; name what every image shows (e.g. 'digit', 'bird') "
                              "or set aug.filter_fraction=0")
        if self.on_fault not in FAULT_MODES:
            raise ConfigError(f"aug.on_fault must be one of {', '.join(FAULT_MODES)}, got {self.on_fault!r}")
        if self.alpha > 0 and not self.model:
            raise ConfigError("aug.model is empty; give a local diffusers folder or a Hugging Face hub id "
                              "(or set aug.alpha=0)")



@dataclass
class SSLConfig:
    """Semi-supervised rows (docs/ssl.md): images without a trusted class, labelled by an EMA teacher (FixMatch with
    FlexMatch thresholds and ReMixMatch distribution alignment)."""

    source: Literal["off", "pool", "generator"] = doc(
        "off", "Unlabelled rows: off; pool = the generator pool's real images, labels dropped (the ceiling); "
               "generator = aug.model's images (SDEdit of training images at ssl.strengths, or from noise with "
               "aug.gen_from_noise at strength 1), the target class drawn at random and its label dropped.")
    mu: int = doc(1, "Unlabelled rows per labelled row of a micro-batch (FixMatch's mu).", ge=1)
    weight: float = doc(1.0, "lambda_u: weight of the unlabelled loss beside the labelled one.", ge=0)
    start: float = doc(0.3, "Fraction of the run trained on the labelled rows alone before the teacher's labels are "
                            "used (a teacher of random weights labels everything one class, which the low early "
                            "FlexMatch thresholds let through: confirmation bias).", ge=0, lt=1)
    threshold: float = doc(0.95, "tau: a pseudo-label trains only above this teacher confidence (FlexMatch: the "
                                 "top of the per-class thresholds).", ge=0, lt=1)
    thresholds: Literal["fixed", "flexmatch"] = doc(
        "flexmatch", "fixed: tau for every class; flexmatch: T_c = tau * b_c / (2 - b_c), b_c the class's share "
                     "of confident pseudo-labels (EMA counts, FlexMatch's warm-up: the unconfident count too).")
    dist_align: bool = doc(True, "ReMixMatch distribution alignment: p <- normalize(p * target / running mean(p)) "
                                 "before the threshold, so the tail is not starved.")
    align_target: Literal["uniform", "labelled"] = doc(
        "uniform", "Class marginal distribution alignment aims at: uniform, or the labelled split's class prior.")
    stats_ema: float = doc(0.99, "EMA decay, per micro-batch, of the running mean of p and the confident counts.",
                           ge=0, lt=1)
    teacher_decay: float = doc(0.99, "Teacher: EMA decay of the classifier's weights, per optimizer step (timm "
                                     "ModelEmaV3, kept in fp32).", ge=0, lt=1)
    teacher_warmup: bool = doc(True, "Teacher decay warm-up (timm): min(teacher_decay, 1 - s^(-2/3)) after optimizer "
                                     "step s (the first update copies the weights).")
    strong: str = doc("rand-m9-n2-mstd0.5", "timm RandAugment spec of the student's strong view (the weak view is "
                                            "the image as made).")
    strengths: list[float] = doc([1.0], "source=generator: SDEdit strengths drawn per unlabelled image (1 with "
                                        "aug.gen_from_noise: from noise).", gt=0, le=1)
    edit_sources: Literal["batch", "balanced"] = doc(
        "batch", "source=generator, strengths < 1: the images the SDEdit starts from: batch = the micro-batch's own "
                 "(long-tailed, as the loader draws them); balanced = training images of a class drawn uniformly "
                 "(the tail's few images varied as often as the head's).")

    def validate(self) -> None:
        check_bounds(self, "ssl")
        if self.source != "off" and not self.strong.startswith("rand"):
            raise ConfigError(f"ssl.strong={self.strong!r} is not a timm RandAugment spec; use e.g. "
                              f"rand-m9-n2-mstd0.5")
        if self.source == "generator" and not self.strengths:
            raise ConfigError("ssl.strengths is empty; give the SDEdit strengths of the unlabelled images (e.g. [1.0])")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def full_res_edit_source(self) -> bool:
        """``aug.edit_source`` resolved: do edits start from the stored image at the generator's resolution? auto
        picks it where the stored images are files (imagefolder: photos larger than data.image_size); digits and
        CIFAR store images no larger than the classifier's view, so there the view is the source (bit for bit)."""
        if self.aug.edit_source == "auto":
            return self.data.dataset == "imagefolder"
        return self.aug.edit_source == "full"

    def validate(self, *, cuda_available: bool | None = None, world_size: int = 1) -> None:
        """Every section's own checks, then those that span sections; all before any heavy work.

        ``load_config`` runs this once (world size 1); the trainer then runs ``train.check_world_size`` for the real
        world size. ``cuda_available`` defaults to ``torch.cuda.is_available()``.
        """
        self.run.validate()
        self.data.validate()
        self.model.validate()
        self.train.validate(world_size)
        self.aug.validate()
        self.ssl.validate()
        self.check_across_sections(cuda_available)

    def check_across_sections(self, cuda_available: bool | None = None) -> None:
        """The rules that read keys of more than one section, all of them here; ``cuda_available`` defaults to
        ``torch.cuda.is_available()``."""
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        d, t, a = self.data, self.train, self.aug
        on_cpu = self.run.device == "cpu" or (self.run.device == "auto" and not cuda_available)
        if self.run.device == "cuda" and not cuda_available:
            raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
        fp16_needs_cuda("train.precision", t.precision, on_cpu)
        if a.alpha > 0:  # no generator is built otherwise
            fp16_needs_cuda("aug.dtype", a.dtype, on_cpu)
        if a.label_correction > 0 and a.alpha > 0 and t.mixing:
            raise ConfigError("aug.label_correction corrects each edit's own label, which Mixup/CutMix blend across "
                              "rows: set train.mixup_alpha=0 and train.cutmix_alpha=0, or aug.label_correction=0")
        if a.mask_mode != "off" and a.alpha > 0 and a.mask_source != "threshold":
            if d.dataset != "imagefolder":
                raise ConfigError(f"aug.mask_source={a.mask_source!r}: a mask folder mirrors data.root's image files, "
                                  f"so it needs data.dataset=imagefolder (or aug.mask_source=threshold)")
            if t.transform != "none" or t.randaugment:
                raise ConfigError("aug.mask_source is a mask folder but the training transform (train.transform / "
                                  "train.randaugment) would move the image away from its mask; turn it off or use "
                                  "aug.mask_source=threshold")
        if self.ssl.source != "off":
            self._check_ssl()
        if t.eval_split == "val" and d.val_fraction <= 0 and d.val_per_class <= 0:
            raise ConfigError("train.eval_split=val needs a validation split: set data.val_per_class (e.g. 10)")
        if t.select == "val" and d.val_fraction <= 0 and d.val_per_class <= 0:
            raise ConfigError("train.select=val picks the best weights on a validation split: set "
                              "data.val_per_class (e.g. 10), or train.select=last")

    def _check_ssl(self) -> None:
        """ssl.* against the other sections (docs/ssl.md)."""
        s, t, a, d = self.ssl, self.train, self.aug, self.data
        if t.mixing:
            raise ConfigError("ssl.source: the pseudo-labels and masks are per row, which Mixup/CutMix blend across "
                              "rows; set train.mixup_alpha=0 and train.cutmix_alpha=0, or ssl.source=off")
        if t.zero_stage == 3:
            raise ConfigError("ssl.source: the teacher copies the classifier's weights, which train.zero_stage=3 "
                              "partitions across ranks; use train.zero_stage 0, 1 or 2, or ssl.source=off")
        if a.alpha > 0:
            raise ConfigError("ssl.source with aug.alpha > 0: the producer makes either labelled edits or unlabelled "
                              "rows, not both yet; set aug.alpha=0 (the generator settings aug.* still apply)")
        if s.source == "pool" and (d.pool_fraction <= 0 or d.train_with_pool):
            raise ConfigError("ssl.source=pool takes the generator pool's images unlabelled: set data.pool_fraction "
                              "> 0 and data.train_with_pool=false")
        if s.source == "generator" and not a.model:
            raise ConfigError("ssl.source=generator needs aug.model (a diffusers folder or hub id)")

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
        if isinstance(value, bool) and {"on", "off"} <= set(choices):  # YAML 1.1 reads a bare on/off as a bool
            value = "on" if value else "off"
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


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one YAML mapping (see :class:`_StrictLoader`)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in one mapping without a word, so a file that says ``set:`` (or
    ``aug:``) twice silently loses the first; this loader refuses it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(f"key {key!r} appears twice in one mapping (line "
                                        f"{key_node.start_mark.line + 1}): merge the two into one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML as ``yaml.safe_load`` reads it, except that a key repeated within one mapping is an error."""
    return yaml.load(text, Loader=_StrictLoader)


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
            data = load_yaml(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {str(p)!r} cannot be read as YAML: {' '.join(str(e).split())}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        data.pop(RESOLVED, None)  # a run's derived facts (save_config), not settings
        _apply(cfg, data)
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested)
    cfg.validate()
    return cfg


RESOLVED = "resolved"  # the section of a run's config.yaml that records what the run derived from its config


def save_config(cfg: Config, path: str | Path, resolved: dict[str, Any] | None = None) -> None:
    """The config as loaded, plus (for a run directory) a ``resolved:`` section with what the run derived from it,
    e.g. the optimizer steps that ``train.epochs`` decided. The config itself is never changed after loading, so the
    saved settings are the asked ones (tools/compare.py reuses a finished run by comparing them);
    :func:`load_config` skips the ``resolved`` section."""
    data = cfg.to_dict()
    if resolved:
        data[RESOLVED] = dict(resolved)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def read_resolved(path: str | Path) -> dict[str, Any]:
    """The ``resolved:`` section of a run's config.yaml ({} when absent, e.g. a run written before it existed)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return dict(data.get(RESOLVED) or {}) if isinstance(data, dict) else {}


def planned_steps(path: str | Path, cfg: Config) -> int:
    """The optimizer steps the run whose config.yaml is ``path`` (loaded as ``cfg``) planned: the ``resolved:``
    record, or ``train.steps`` for a run written before the record existed (the count was written there then)."""
    return int(read_resolved(path).get("train_steps", cfg.train.steps))


# ---------------------------------------------------------------- validation


def _check_finetune_command(command: str, textual_inversion: str, loras: list[str]) -> None:
    """aug.finetune_command must be a tools/finetune_sd.py command whose --out is the folder the keys name: the
    tokens' folder, and the one LoRA, or one of several stacked (the others, such as a public LCM-LoRA, are not made
    by the command)."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError as e:
        raise ConfigError(f"aug.finetune_command cannot be parsed as a shell command ({e}); quote it properly") from e
    outs = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--out"]
    outs += [w.split("=", 1)[1] for w in words if w.startswith("--out=")]
    named = [f for f in [textual_inversion, *loras] if f]
    if "tools/finetune_sd.py" not in command or len(outs) != 1:
        raise ConfigError(f"aug.finetune_command={command!r} must run tools/finetune_sd.py with one --out FOLDER "
                          f"(the folder aug.textual_inversion / aug.lora name)")
    out = Path(outs[0])
    lora_ok = (all(Path(f) == out for f in loras) if len(loras) < 2 else any(Path(f) == out for f in loras))
    if not named or (textual_inversion and Path(textual_inversion) != out) or not lora_ok:
        raise ConfigError(f"aug.finetune_command writes --out {outs[0]!r} but aug.textual_inversion / aug.lora name "
                          f"{named or 'no folder'}; point them at {outs[0]!r} (or leave aug.finetune_command empty)")


def describe() -> str:
    """Markdown table of every config key with its default, its numeric range (the bounds :func:`check_bounds`
    enforces; of each item for a list) and its doc."""
    rows = ["| key | default | range | meaning |", "|---|---|---|---|"]
    for sec in dataclasses.fields(Config):
        sub = sec.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(sub):
            val = getattr(sub, f.name)
            bounds = f.metadata.get("bounds")
            interval = bounds.interval() if bounds is not None else ""
            rng = f"`{interval}`" if interval else ""
            rows.append(f"| `{sec.name}.{f.name}` | `{val!r}` | {rng} | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(describe())
