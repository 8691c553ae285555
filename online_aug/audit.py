"""The generator audit and the guard that acts on it: edits go only toward classes the generator can help.

The long-tail benchmark showed the risk (docs/benchmark.md): a generator that knows the classes lifts few-shot
accuracy by ~31 points, one that has to learn a 1-2-image class from those images copies them and costs ~22. A user
cannot tell in advance which case they are in, so before training the run audits its own generator with what any
user has — the training split and the generator itself (no benchmark pool):

- **draws the class** (``target_rate`` over ``base_rate``): ``aug.audit_edits`` edits toward class c, from training
  images of other classes at the policy's highest strength (what Diff-Mix's inter-class edits do to the tail),
  judged by a class-balanced logistic regression fit on the training split (and jittered views of it) — on the
  classifier's pretrained backbone features when ``model.pretrained``, else on 16x16 grayscale pixels. The verdict
  uses the lift: the share judged c among the edits toward c, minus the share judged c among the edits toward the
  other classes (what the judge says c for anyway; ~0 for a generator that ignores its prompt);
- **varies it, or copies** (``spread``): the mean pairwise distance of those edits in the near-duplicate guard's
  feature space (8x8 grayscale RMS), over the typical spread of a real class of the training split (the median over
  classes with at least 3 images). Edits that come out the same whatever the source are the training image learned
  by heart;
- **copies** (``copy_share``): the share of those edits closer than ``aug.audit_copy_dist`` to a training image of c.

A class *can be helped* when its edits land on it (lift >= ``aug.guard_min_target_rate``), vary (spread >=
``aug.guard_min_spread``) and are not copies (copy share <= ``aug.guard_max_copy``). With ``aug.guard=on`` an edit
toward any other class stays a real row (the baseline's; policy.AugPolicy); when no class can be helped, the run
says so and trains on real images only, without keeping the generator (exactly the baseline's batches).
``aug.guard=off`` edits as configured and warns when the verdict is bad; ``aug.audit=false`` skips the measurement.
The audit never touches the run's random streams, so ``aug.guard=off`` trains exactly as before the guard existed.

Cost: ``C x aug.audit_edits`` edits of K steps (10 x 16 x 4 UNet evaluations on the embedded default: seconds on a
CPU). At 512 px on SD 1.5 (fp16, one A100-class GPU: ~20 img/s for K = 4 with CFG) 100 classes x 16 edits is ~80 s;
lower ``aug.audit_edits`` for many classes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, ConfigError
from .duplicates import NearDuplicateGuard

JUDGE_SIZE = 16  # pixel judge: 16x16 grayscale (digits at 8x8 lose the strokes; larger buys nothing here)
JUDGE_VIEWS = 8  # jittered copies of each training image the judge is fit on
MIN_REF_IMAGES = 3  # a class needs this many training images to say what a real class's spread is
JUDGE_WEAK = 0.5  # a refusal for the target rate is called uncertain below this judge recall on held-out images


@dataclass
class ClassVerdict:
    name: str
    n_train: int
    target_rate: float  # share of its edits the judge calls the class
    base_rate: float  # share of the edits toward other classes the judge calls the class
    spread: float  # edits' mean pairwise distance / the typical real class spread
    copy_share: float
    helps: bool
    why: str  # the failed criterion, or "ok"
    # share of held-out real images of the class (the validation split) the judge calls the class: how far its
    # target rate can be trusted (a judge that knows one training image of a class may miss most real ones); nan
    # when there is no held-out image. Said beside a refusal, never used to decide.
    judge_recall: float = float("nan")


@dataclass
class Audit:
    classes: list[ClassVerdict]
    judge: str
    edits_per_class: int
    strength: float
    real_spread: float
    seconds: float
    thresholds: dict[str, float] = field(default_factory=dict)
    partial_share: float = 1.0  # share of the target distribution the allowed classes hold (set by the guard)
    baseline: bool = False  # the guard trains on real images only (no class, or too small a share, can be helped)

    @property
    def allowed(self) -> torch.Tensor:
        """[C] bool: the classes the generator can help."""
        return torch.tensor([c.helps for c in self.classes], dtype=torch.bool)

    def table(self) -> str:
        head = (f"{'class':<16}{'n':>5}{'target rate':>13}{'(others)':>10}{'(real)':>8}{'spread':>8}{'copies':>8}"
                "  verdict")
        lines = [head, "-" * len(head)]
        for c in self.classes:
            verdict = "edits help" if c.helps else f"no edits ({c.why})"
            if not c.helps and c.judge_recall < JUDGE_WEAK and "does not draw" in c.why:
                verdict += (f" [uncertain: the judge calls only {c.judge_recall:.0%} of held-out real images of the "
                            f"class by its name]")
            lines.append(f"{c.name:<16}{c.n_train:>5}{c.target_rate:>13.2f}{c.base_rate:>10.2f}"
                         f"{c.judge_recall:>8.2f}{c.spread:>8.2f}{c.copy_share:>8.2f}  {verdict}")
        return "\n".join(lines)

    def share(self, target_p: torch.Tensor) -> float:
        """The share of the policy's target distribution (intra-class methods: uniform) the allowed classes hold."""
        return float(target_p.double()[self.allowed].sum() / target_p.double().sum().clamp(min=1e-12))

    def summary(self) -> str:
        on = [c.name for c in self.classes if c.helps]
        if not on:
            return "the generator cannot help any class"
        if len(on) == len(self.classes):
            return "the generator can help every class"
        return f"edits only toward {', '.join(on)} ({len(on)} of {len(self.classes)} classes)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, run_dir: Path) -> None:
        """``audit.json`` (every measurement) and ``audit.md`` (the table) in the run directory."""
        (run_dir / "audit.json").write_text(json.dumps(self.to_dict(), indent=2))
        (run_dir / "audit.md").write_text(
            f"# Generator audit\n\n{self.summary()}.\n\nJudge: {self.judge}; {self.edits_per_class} edits per class "
            f"at s={self.strength:g}; real class spread {self.real_spread:.3f}; thresholds {self.thresholds}; "
            f"{self.seconds:.1f} s.\n\n```\n{self.table()}\n```\n")


def _gray(x: torch.Tensor, size: int) -> np.ndarray:
    g = torch.nn.functional.interpolate(x.float().mean(1, keepdim=True), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return g.flatten(1).cpu().numpy()


def _jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random small affine views (rotation +-12 degrees, scale 0.85-1.15, shift +-10 %), one per image."""
    n = len(x)
    angle = (torch.rand(n, generator=g) - 0.5) * (2 * np.pi * 12 / 180)
    scale = 0.85 + 0.3 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    bg = x.float().flatten(2).median(2).values[:, :, None, None]  # pad with the image's own background
    return (torch.nn.functional.grid_sample(x.float() - bg, grid, align_corners=False) + bg).clamp(0, 1)


class _Judge:
    """Which class does an image show? Fit on the training split only (balanced: the tail is not out-voted)."""

    def __init__(self, cfg: Config, images: torch.Tensor, labels: np.ndarray, device: torch.device):
        from sklearn.linear_model import LogisticRegression

        self.backbone = None
        if cfg.model.pretrained:  # the classifier's own pretrained features know more than pixels
            from .model import create_classifier

            self.backbone = create_classifier(cfg.model, 2).to(device).eval()
            self.device = device
            self.name = f"logistic regression on {cfg.model.name}'s pretrained features (training split)"
        else:
            self.name = f"logistic regression on {JUDGE_SIZE}x{JUDGE_SIZE} grayscale pixels (training split)"
        # a tail class may have one training image: the judge also sees small shifts, rotations and rescalings of
        # every image, so a differently drawn instance of the class is not judged by one exact pose
        views, view_labels = [images], [labels]
        g = torch.Generator().manual_seed(0)
        for _ in range(JUDGE_VIEWS):
            views.append(_jitter(images, g))
            view_labels.append(labels)
        x, y = torch.cat(views), np.concatenate(view_labels)
        self.clf = LogisticRegression(max_iter=2000, class_weight="balanced").fit(self.features(x), y)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        if self.backbone is None:
            return _gray(x, JUDGE_SIZE)
        f = self.backbone.forward_head(self.backbone.forward_features(x.to(self.device)), pre_logits=True)
        return f.float().cpu().numpy()

    def predict(self, x: torch.Tensor) -> np.ndarray:
        return self.clf.predict(self.features(x))


def fit_judge(cfg: Config, bank: list[torch.Tensor], device: torch.device) -> _Judge:
    """The audit's judge fit on ``bank`` (images per class) instead of the training split: for a generator's own
    evaluation (the generator pool knows every class; a run's guard never uses it)."""
    judge = _Judge(cfg, torch.cat(bank), np.concatenate([np.full(len(x), c) for c, x in enumerate(bank)]), device)
    judge.name = judge.name.replace("(training split)", "(the judge bank: not the training split)")
    return judge


def _pairwise_mean(f: torch.Tensor) -> float:
    return float(torch.pdist(f).mean()) / NearDuplicateGuard.SIZE if len(f) > 1 else float("nan")


@torch.no_grad()
def audit_generator(cfg: Config, editor: Any, bank: list[torch.Tensor], class_names: list[str],
                    class_counts: list[int], device: torch.device,
                    held_out: list[torch.Tensor] | None = None,
                    judge_bank: list[torch.Tensor] | None = None) -> Audit:
    """Audit ``editor`` (an :class:`~online_aug.generator.SDEditGenerator`) on ``bank`` (training images per class,
    [n_c, 3, S, S] in [0, 1]); deterministic in ``run.seed`` and never touches the run's random streams.
    ``held_out``: real images per class the judge was not fit on (the validation split), to say how well the judge
    itself recognises each class (the ``(real)`` column); the verdicts do not depend on them. ``judge_bank``: the
    images per class the judge is fit on instead of ``bank`` (a generator's own evaluation with a judge that knows
    more than a 1-image class, e.g. the generator pool; a run's guard never uses it: its judge sees the training
    split only); the edits' sources stay ``bank``'s."""
    a = cfg.aug
    t0 = time.perf_counter()
    num_classes = len(bank)
    present = [int(n) > 0 for n in class_counts]  # a class without training images: nothing to judge it by
    if sum(present) < 2:
        raise ConfigError("the generator audit needs training images of at least 2 classes to judge its edits by; "
                          "set aug.audit=false and aug.guard=off to edit without it")
    images = torch.cat([x for x, ok in zip(bank, present) if ok])
    labels = np.concatenate([np.full(len(x), c) for c, (x, ok) in enumerate(zip(bank, present)) if ok])
    bank = [x if ok else images[:0] for x, ok in zip(bank, present)]
    judge = _Judge(cfg, images, labels, device) if judge_bank is None else fit_judge(cfg, judge_bank, device)
    feat = NearDuplicateGuard.features
    bank_f = [feat(x) for x in bank]
    spreads = [_pairwise_mean(f) for f in bank_f if len(f) >= MIN_REF_IMAGES]
    real_spread = float(np.median(spreads)) if spreads else float("nan")
    strength = float(a.strength_range[1]) if a.strength_range else float(max(a.strengths, default=1.0))
    rng = np.random.default_rng([cfg.run.seed, 7])
    preds: list[np.ndarray] = []  # the judge's classes for the edits toward each class
    measured: list[tuple[float, float]] = []  # (spread, copy share) per class
    with torch.random.fork_rng(devices=[]):
        for c in range(num_classes):
            others = np.flatnonzero(labels != c) if num_classes > 1 else np.arange(len(labels))
            pick = rng.choice(others, size=a.audit_edits, replace=len(others) < a.audit_edits)
            src = images[pick].to(device)
            g = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
            kw = {}
            if getattr(editor, "mask_mode", "off") != "off":
                # object-centric edits change only the object (or only the background): the audit asks whether the
                # generator can draw the class at all, so its edit region is the whole image
                whole = 1.0 if editor.mask_mode == "foreground" else 0.0
                kw["masks"] = torch.full((len(pick), 1, *src.shape[-2:]), whole, device=device)
            edited, finite = editor.edit(src, torch.full((len(pick),), strength),
                                         torch.full((len(pick),), c, dtype=torch.long), generator=g, **kw)
            edited = edited.float().cpu()
            if edited.shape[-2:] != images.shape[-2:]:
                edited = torch.nn.functional.interpolate(edited, size=images.shape[-2:], mode="bilinear",
                                                         antialias=True, align_corners=False).clamp(0, 1)
            edited = edited[finite.cpu()]
            preds.append(judge.predict(edited) if len(edited) else np.full(1, -1))
            f = feat(edited)
            spread = _pairwise_mean(f) / real_spread if real_spread == real_spread else float("nan")
            d = (torch.cdist(f, bank_f[c]).min(1).values / NearDuplicateGuard.SIZE if len(bank_f[c]) and len(f)
                 else torch.zeros(1))
            measured.append((spread, float((d < a.audit_copy_dist).float().mean())))
    verdicts = []
    for c in range(num_classes):
        rate = float((preds[c] == c).mean())
        # what the judge calls c anyway, for edits asked to be other classes: a generator that ignores the prompt
        # (or a judge biased toward a varied head class) scores there as high as on its own target
        base = float(np.mean([(preds[o] == c).mean() for o in range(num_classes) if o != c])) if num_classes > 1 \
            else 0.0
        lift = rate - base
        spread, copy = measured[c]
        why = [] if present[c] else ["no training image of the class to judge its edits by"]
        if present[c] and lift < a.guard_min_target_rate:
            why.append(f"target rate {rate:.2f} is only {lift:+.2f} over the {base:.2f} its other edits get: "
                       f"it does not draw the class")
        if not spread >= a.guard_min_spread:
            why.append(f"spread {spread:.2f} < {a.guard_min_spread:g}: it repeats one image")
        if copy > a.guard_max_copy:
            why.append(f"copies {copy:.2f} > {a.guard_max_copy:g}: it copies the training images")
        recall = float("nan")
        if held_out is not None and c < len(held_out) and len(held_out[c]):
            recall = float((judge.predict(held_out[c].float()) == c).mean())
        verdicts.append(ClassVerdict(class_names[c], int(class_counts[c]), rate, base, spread, copy, not why,
                                     "; ".join(why) or "ok", recall))
    thresholds = {"min_target_rate": a.guard_min_target_rate, "min_spread": a.guard_min_spread,
                  "max_copy": a.guard_max_copy, "copy_dist": a.audit_copy_dist}
    return Audit(verdicts, judge.name, a.audit_edits, strength, real_spread, time.perf_counter() - t0, thresholds)


def guard_decides_baseline(audit: Audit, target_p: torch.Tensor, min_share: float) -> bool:
    """``aug.guard=on``: train as the baseline (no edits, no generator) when no class can be helped, or when the
    classes that can hold less than ``min_share`` of the target distribution ``target_p``. Records the share and the
    decision on ``audit``."""
    audit.partial_share = audit.share(target_p)
    audit.baseline = not bool(audit.allowed.any()) or audit.partial_share < min_share
    return audit.baseline
