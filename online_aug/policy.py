"""Augmentation planning: which samples are edited, at what strength, toward which class, with what label.

A pure function of (labels, rng, config). Methods:
- DA-Fusion (Trabucco et al. 2024): intra-class edits, t0 ~ U{0.25, 0.5, 0.75, 1.0}.
- Diff-Mix (Wang et al. 2024): inter-class edits, s ~ U{0.5, 0.7, 0.9}, soft label eq. 3:
  y = (1 - s^gamma) * onehot(source) + s^gamma * onehot(target).
- Long-tail rebalancing: targets p(c) ∝ 1/n_c^beta, or ``uniformize``: the water-filling q that makes
  (1 - alpha) * pi + alpha * q as flat as alpha allows (pi = the real class prior).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .class_stats import Snapshot
from .config import AugConfig, ConfigError
from .rng import step_rng as step_rng  # the rng a plan is drawn with; re-exported for the policy's callers


@dataclass
class AugPlan:
    """What to do with one batch. Index tensors refer to positions in the batch."""

    index: torch.Tensor  # [M] long, batch positions to edit
    strength: torch.Tensor  # [M] float, SDEdit strength per edited sample
    source: torch.Tensor  # [M] long, the real class of each edited sample
    target: torch.Tensor  # [M] long, the prompt class of each edited sample
    soft_label: torch.Tensor  # [B, C] float, labels for the whole batch (real rows one-hot)
    template: torch.Tensor | None = None  # [M] long, prompt template per edit (prompt diversity); None: template 0
    # aug.guard_fallback=target: batch positions whose refused edit becomes a real image of its target class [R],
    # those classes [R], and a uniform draw in [0, 1) per position that picks which of the class's images [R]
    refill_index: torch.Tensor | None = None
    refill_class: torch.Tensor | None = None
    refill_pick: torch.Tensor | None = None

    @property
    def num_edits(self) -> int:
        return int(self.index.numel())


def uniformize_targets(class_counts: list[int] | np.ndarray, alpha: float) -> np.ndarray:
    """Water-filling target distribution q over classes.

    Real samples arrive with prior pi (the class frequencies); a fraction alpha is replaced by synthetic samples of
    class q. We choose q (a distribution) so that the expected mix m = (1 - alpha) * pi + alpha * q is as flat as
    possible: m_c = max(level, (1 - alpha) * pi_c), with the level set so that sum(m) = 1. Classes already above the
    level get no synthetic targets; if alpha is large enough, m is exactly uniform.

    Note the sources of the edits are drawn from the batch itself, so the real rows that are *replaced* are
    distributed as pi too; the formula above accounts for that.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ConfigError("target_mode=uniformize needs the long-tail training class counts (all >= 0, not all 0)")
    if alpha <= 0:
        return np.full(counts.size, 1.0 / counts.size)
    pi = counts / counts.sum()
    real = (1 - alpha) * pi
    # find level L with sum(max(L, real)) = 1 by sorting (exact water-filling)
    srt = np.sort(real)
    c = counts.size
    level = 1.0 / c
    for k in range(c):  # k lowest classes are filled up to L; the rest stay at their real mass
        rest = srt[k + 1:].sum() if k + 1 < c else 0.0
        cand = (1.0 - rest) / (k + 1)
        if k + 1 == c or cand <= srt[k + 1]:
            level = cand
            break
    mix = np.maximum(level, real)
    q = (mix - real) / alpha
    q = np.clip(q, 0, None)
    return q / q.sum()


def target_distribution(cfg: AugConfig, class_counts: list[int] | None, num_classes: int) -> np.ndarray:
    """The class distribution targets are drawn from (inter / uniformize); uniform when no counts are needed."""
    if cfg.target_mode == "uniformize":
        if class_counts is None:
            raise ConfigError("aug.target_mode=uniformize needs the training class counts (a long-tail dataset)")
        return uniformize_targets(class_counts, cfg.alpha)
    if cfg.target_mode == "inter" and cfg.target_dist == "inverse":
        if class_counts is None:
            raise ConfigError("aug.target_dist=inverse needs the training class counts")
        n = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
        p = n ** (-cfg.beta)
        return p / p.sum()
    return np.full(num_classes, 1.0 / num_classes)


def adaptive_targets(prior: torch.Tensor, acc: torch.Tensor, tau: float, floor: float) -> torch.Tensor:
    """q ∝ prior x (error + 1e-3)^tau, then a ``floor`` share spread uniformly (no class starves)."""
    err = (1.0 - acc.double()).clamp(min=0) + 1e-3
    q = prior.double() * err.pow(tau)
    q = q / q.sum()
    return (1 - floor) * q + floor / q.numel()


def pair_distributions(q: torch.Tensor, confusion: torch.Tensor, pairs: float) -> torch.Tensor:
    """[C, C]: row j is p(target | source j) = (1 - pairs) q + pairs x normalise(q_i x conf_sym[j, i], i != j).

    conf_sym = (confusion + confusion^T) / 2: edits of class j go toward the classes the classifier mixes up with j,
    in either direction (hard, label-changing examples); the (1 - pairs) share follows q (exploration)."""
    c = q.numel()
    conf = confusion.double()
    sym = (conf + conf.T) / 2 * (1 - torch.eye(c, dtype=torch.float64))
    hard = q.double()[None, :] * (sym + 1e-6 * (1 - torch.eye(c, dtype=torch.float64)))
    hard = hard / hard.sum(1, keepdim=True)
    return (1 - pairs) * q.double()[None, :] + pairs * hard


def adaptive_strengths(target: torch.Tensor, edit_acc: torch.Tensor, kappa: float, bounds: tuple[float, float],
                       u: torch.Tensor) -> torch.Tensor:
    """s = clip(mid + kappa (hi - lo)/2 (2 edit_acc[target] - 1) + (u - 1/2)(hi - lo)/2, lo, hi): kappa > 0 raises
    the strength toward classes whose edits the classifier already recognises, kappa < 0 lowers it."""
    lo, hi = bounds
    half = (hi - lo) / 2
    centre = (lo + hi) / 2 + kappa * half * (2 * edit_acc.float()[target] - 1)
    return (centre + (u.float() - 0.5) * half).clamp(lo, hi)


def mix_labels(source: torch.Tensor, target: torch.Tensor, strength: torch.Tensor, gamma: float,
               num_classes: int, target_rates: torch.Tensor | None = None) -> torch.Tensor:
    """Diff-Mix eq. 3 for M edits: [M, C] rows (1 - s^gamma) on the source class and s^gamma on the target.

    With ``target_rates`` ([C], aug.label_rates) the target weight is s^gamma * rate(target): an edit toward a class
    the generator draws only some of the time claims only that share of it, the rest stays on the source."""
    # scatter_add makes target == source (every intra edit) a hard label: (1 - w) + w on one class
    w = strength.float().pow(gamma)
    if target_rates is not None:
        w = w * target_rates.float()[target]
    edited = torch.zeros(len(source), num_classes)
    edited.scatter_add_(1, source[:, None], (1 - w)[:, None])
    edited.scatter_add_(1, target[:, None], w[:, None])
    return edited


def read_label_rates(path: str, num_classes: int) -> torch.Tensor:
    """aug.label_rates: the ``target_rate`` per class of a tools/edit_rates.py JSON, as a [C] tensor in [0, 1]."""
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"aug.label_rates: {path} is not a file; write it with tools/edit_rates.py --config <this "
                          f"config> --out {path}, or set aug.label_rates= to keep Diff-Mix's labels")
    try:
        rates = json.loads(file.read_text())["target_rate"]
        values = [float(rates[str(c)]) for c in range(num_classes)]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"aug.label_rates: {path} has no 'target_rate' for each of the {num_classes} classes "
                          f"({type(e).__name__}: {e}); rewrite it with tools/edit_rates.py") from None
    if len(rates) != num_classes:  # rates measured on another data set: its classes are not these
        raise ConfigError(f"aug.label_rates: {path} has target rates for {len(rates)} classes but the dataset has "
                          f"{num_classes}; measure them on this data set with tools/edit_rates.py --config <this "
                          f"config> --out {path}")
    if not all(0 <= v <= 1 for v in values):
        raise ConfigError(f"aug.label_rates: {path} has rates outside [0, 1]: {values}")
    return torch.tensor(values)


def capped_proportional(w: torch.Tensor, total: float) -> torch.Tensor:
    """Probabilities p_i = min(1, c * w_i) with sum(p) = total (c found by water-filling: the capped entries give
    their excess to the others), so a Bernoulli draw with them edits ``total`` images on average."""
    p = torch.zeros_like(w)
    capped = torch.zeros(len(w), dtype=torch.bool)
    for _ in range(len(w)):
        free = ~capped
        if not bool(free.any()):
            break
        c = (total - float(capped.sum())) / float(w[free].sum())
        p = torch.where(capped, torch.ones_like(w), (c * w).clamp(max=1.0))
        newly = free & (c * w >= 1.0)
        if not bool(newly.any()):
            break
        capped |= newly
    return p


class AugPolicy:
    """Plans one batch. Holds only derived constants; all randomness comes from the ``rng`` passed to ``plan``."""

    def __init__(self, cfg: AugConfig, num_classes: int, class_counts: list[int] | None = None,
                 num_templates: int = 1, label_rates: torch.Tensor | None = None, allowed: torch.Tensor | None = None):
        """``num_templates``: prompt templates per class the generator holds (aug.prompt, aug.prompts,
        aug.prompt_file); with more than one, each edit draws one uniformly. ``label_rates``: [C] target rates
        (:func:`read_label_rates`) that scale the soft label's target weight. ``allowed``: [C] bool, the classes
        edits may go toward (the guard, :mod:`online_aug.audit`); None or all true: every class, and the plan is
        exactly the unguarded one."""
        self.label_rates = label_rates
        self.allowed = None if allowed is None or bool(allowed.all()) else allowed.bool().cpu()
        if num_classes < 2 and cfg.target_mode != "intra":
            raise ConfigError(f"aug.target_mode={cfg.target_mode} needs at least 2 classes")
        self.cfg = cfg
        self.num_classes = num_classes
        # aug.guard_fallback=target with a class refused: some edits become real images of their target class
        self.refills = self.allowed is not None and cfg.guard_fallback == "target"
        self.num_templates = int(num_templates)
        self.target_p = torch.as_tensor(target_distribution(cfg, class_counts, num_classes), dtype=torch.float64)
        self.strength_set = torch.tensor(cfg.strengths, dtype=torch.float32)
        # aug.source_weight=frequency: a source is drawn with weight n_c (its class's training count; 1 if unknown)
        counts = class_counts if class_counts is not None else [1] * num_classes
        self.class_counts = torch.tensor([int(n) for n in counts], dtype=torch.long)
        self.class_weight = torch.tensor([max(int(n), 1) for n in counts], dtype=torch.float64)
        self.strength_bounds = (tuple(cfg.strength_range) if cfg.strength_range
                                else (min(cfg.strengths, default=1.0), max(cfg.strengths, default=1.0)))

    def plan(self, labels: torch.Tensor, rng: torch.Generator, snapshot: Snapshot | None = None) -> AugPlan:
        """Plan edits for a batch of hard ``labels`` [B] (CPU tensor) with a CPU ``rng``; with ``aug.adaptive``,
        targets, pairs and strengths also follow the classifier's statistics in ``snapshot``."""
        cfg, b = self.cfg, labels.numel()
        labels = labels.long().cpu()
        if cfg.source_weight == "frequency":  # P(image i is a source) grows with its class's training count
            w = self.class_weight[labels]
            if cfg.exact_alpha:
                m = int(round(cfg.alpha * b))
                index = torch.multinomial(w, m, replacement=False, generator=rng).sort().values if m else labels[:0]
            else:
                index = torch.nonzero(torch.rand(b, generator=rng) < capped_proportional(w, cfg.alpha * b)).flatten()
        elif cfg.exact_alpha:
            m = int(round(cfg.alpha * b))
            index = torch.randperm(b, generator=rng)[:m].sort().values
        else:
            index = torch.nonzero(torch.rand(b, generator=rng) < cfg.alpha).flatten()
        m = index.numel()
        if cfg.strength_range:
            lo, hi = cfg.strength_range
            strength = lo + (hi - lo) * torch.rand(m, generator=rng)
        else:
            strength = self.strength_set[torch.randint(len(self.strength_set), (m,), generator=rng)]
        source = labels[index]
        adaptive = cfg.adaptive and snapshot is not None
        if cfg.target_mode == "intra" or not m:
            target = source.clone()
        elif adaptive:
            q = adaptive_targets(self.target_p, snapshot.acc, cfg.adaptive_tau, cfg.adaptive_floor)
            rows = pair_distributions(q, snapshot.confusion, cfg.adaptive_pairs)[source]  # [M, C], p(target | source)
            target = torch.multinomial(rows, 1, replacement=True, generator=rng).flatten()
        else:
            target = torch.multinomial(self.target_p, m, replacement=True, generator=rng)
        refill = None
        if self.allowed is not None and m:
            # an edit toward a class the generator cannot help stays a real row (the baseline's), and the allowed
            # classes get exactly the edits they would get unguarded: the targets are not renormalised over them,
            # which would pour all of alpha into a few classes and tilt the class prior the classifier learns.
            # aug.guard_fallback=target: the row becomes a real image of its target class instead (a class without
            # training images has none: its row stays the source's)
            keep = self.allowed[target]
            if cfg.guard_fallback == "target":
                swap = ~keep & (self.class_counts[target] > 0)
                refill = (index[swap], target[swap])
            index, strength, source, target = index[keep], strength[keep], source[keep], target[keep]
            m = index.numel()
        if adaptive and cfg.adaptive_strength != 0 and m:
            strength = adaptive_strengths(target, snapshot.edit_acc, cfg.adaptive_strength, self.strength_bounds,
                                          torch.rand(m, generator=rng))
        soft = torch.nn.functional.one_hot(labels, self.num_classes).float()
        if m:
            soft[index] = mix_labels(source, target, strength, cfg.gamma, self.num_classes, self.label_rates)
        template = None
        if self.num_templates > 1:  # drawn last: with one template the rng stream is what it always was
            template = torch.randint(self.num_templates, (m,), generator=rng)
        plan = AugPlan(index=index, strength=strength.float(), source=source, target=target, soft_label=soft,
                       template=template)
        if refill is not None:  # drawn after everything else: the edits' plan is the same as with fallback=source
            plan.refill_index, plan.refill_class = refill
            plan.refill_pick = torch.rand(len(refill[0]), generator=rng)
            soft[plan.refill_index] = torch.nn.functional.one_hot(plan.refill_class, self.num_classes).float()
        return plan
