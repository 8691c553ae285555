"""The teacher's side of semi-supervised training (``ssl.*``, docs/ssl.md): FixMatch with an EMA teacher,
FlexMatch's per-class thresholds and ReMixMatch's distribution alignment.

For the unlabelled rows of a micro-batch (:mod:`online_aug.unlabelled` made them), in the trainer's step:

1. the teacher (an EMA of the classifier's weights, timm ``ModelEmaV3`` in fp32, eval mode) predicts p on the weak
   view;
2. distribution alignment (ReMixMatch): the running mean of p is updated with the batch's, then
   p <- normalize(p * target / running_mean), target uniform or the labelled prior (``ssl.align_target``);
3. thresholds: tau for every class, or FlexMatch's T_c = tau * M(b_c), M(x) = x / (2 - x), b_c = s_c / max(max_c s,
   s_unconfident), where s_c counts the rows predicted c with confidence > tau and s_unconfident the others (EMAs of
   per-micro-batch counts: a stream has no fixed unlabelled set to keep a last prediction per sample for, as
   FlexMatch does);
4. the student is trained on the strong view toward the argmax, masked where max p < T_argmax (FixMatch):
   loss_u = mean_i mask_i * CE(student(strong_i), argmax p_i), added to the labelled loss with weight ``ssl.weight``.

The teacher is updated after every optimizer step. Everything here (teacher weights, running mean, counts, the log
interval's sums) is in the checkpoint, so a resumed run continues bit for bit. The statistics stay on the device
(no host sync per step); with several ranks they are all-reduced, so every rank holds the same thresholds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import SSLConfig


def align_distribution(p: torch.Tensor, target: torch.Tensor, running_mean: torch.Tensor) -> torch.Tensor:
    """ReMixMatch distribution alignment: p <- normalize(p * target / running_mean), row by row."""
    q = p * (target / running_mean.clamp_min(1e-12))[None, :]
    return q / q.sum(-1, keepdim=True)


def flexmatch_thresholds(tau: float, confident: torch.Tensor, unconfident: torch.Tensor) -> torch.Tensor:
    """FlexMatch's per-class thresholds with its warm-up: T_c = tau * b_c / (2 - b_c), b_c = s_c / max(max s,
    s_unconfident). A class the teacher is rarely sure of gets a low threshold (its rows are not starved); none is
    above tau. Before any count, every threshold is 0 (FlexMatch starts that way too)."""
    norm = torch.maximum(confident.max(), unconfident).clamp_min(1e-12)
    beta = confident / norm
    return tau * beta / (2 - beta)


def confident_rows(p: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels [U] = argmax p, mask [U] bool: max p >= the threshold of the argmax class)."""
    conf, pseudo = p.max(-1)
    return pseudo, conf >= thresholds[pseudo]


class PseudoLabeler:
    """The EMA teacher, its running statistics and the unlabelled loss."""

    def __init__(self, cfg: SSLConfig, model: nn.Module, class_counts: list[int], class_names: list[str],
                 device: torch.device, world: int = 1):
        from timm.utils import ModelEmaV3

        self.cfg, self.class_names, self.device, self.world = cfg, class_names, device, world
        c = len(class_names)
        # fp32 EMA: a bf16 one would need timm's stochastic rounding, whose generator no checkpoint holds
        self.teacher = ModelEmaV3(model, decay=cfg.teacher_decay, use_warmup=cfg.teacher_warmup, dtype=torch.float32)
        counts = torch.tensor(class_counts, dtype=torch.float32, device=device).clamp_min(0)
        self.target = (counts / counts.sum() if cfg.align_target == "labelled"
                       else torch.full((c,), 1.0 / c, device=device))
        z = torch.zeros(c, device=device)
        self.state: dict[str, torch.Tensor] = {
            "p_mean": torch.full((c,), 1.0 / c, device=device),  # running mean of the teacher's p (before alignment)
            "confident": z.clone(), "unconfident": torch.zeros((), device=device),  # FlexMatch counts (EMAs)
            # the log interval's sums, and the run's totals (the final report)
            "i_rows": torch.zeros((), device=device), "i_used": torch.zeros((), device=device),
            "i_pseudo": z.clone(), "rows": torch.zeros((), dtype=torch.float64, device=device),
            "used": torch.zeros((), dtype=torch.float64, device=device),
        }
        self.last_decay = 0.0  # the teacher's last EMA decay (TensorBoard)

    def thresholds(self) -> torch.Tensor:
        s = self.state
        if self.cfg.thresholds == "flexmatch":
            return flexmatch_thresholds(self.cfg.threshold, s["confident"], s["unconfident"])
        return torch.full_like(s["confident"], self.cfg.threshold)

    @torch.no_grad()
    def label(self, weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's pseudo-labels [U] and mask [U] (float) for the weak views; updates the statistics."""
        s, m = self.state, self.cfg.stats_ema
        p = torch.softmax(self.teacher.module(weak.float()).float(), -1)
        if self.cfg.dist_align:
            s["p_mean"].mul_(m).add_(self._mean(p.mean(0)), alpha=1 - m)
            p = align_distribution(p, self.target, s["p_mean"])
        pseudo, mask = confident_rows(p, self.thresholds())  # this micro-batch is judged by the earlier counts
        sure = p.max(-1).values > self.cfg.threshold
        counts = torch.zeros_like(s["confident"]).index_add_(0, pseudo, sure.float())
        unsure = (~sure).float().sum()
        if self.world > 1:
            both = torch.cat([counts, unsure[None]])
            dist.all_reduce(both)
            counts, unsure = both[:-1], both[-1]
        s["confident"].mul_(m).add_(counts, alpha=1 - m)
        s["unconfident"].mul_(m).add_(unsure, alpha=1 - m)
        maskf = mask.float()
        s["i_rows"] += len(mask)
        s["i_used"] += maskf.sum()
        s["i_pseudo"].index_add_(0, pseudo, maskf)
        s["rows"] += len(mask)
        s["used"] += maskf.sum().double()
        return pseudo, maskf

    def _mean(self, v: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            v = v.clone()
            dist.all_reduce(v)
            v /= self.world
        return v

    def loss(self, strong_logits: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
        """``ssl.weight`` x mean_i mask_i CE(student on strong_i, teacher's pseudo-label_i) (FixMatch)."""
        pseudo, mask = self.label(weak)
        ce = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
        return self.cfg.weight * (ce * mask).mean()

    @torch.no_grad()
    def update_teacher(self, model: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (1-based): EMA of the weights (timm's warm-up reads the step)."""
        at = step if self.cfg.teacher_warmup else None
        self.last_decay = self.teacher.get_decay(at)
        self.teacher.update(model, step=at)

    def scalars(self) -> dict[str, float]:
        """The log interval's TensorBoard scalars (one host read), and the interval's sums reset."""
        s = self.state
        th = self.thresholds()
        rows = float(s["i_rows"])
        out = {"ssl/mask_rate": float(s["i_used"]) / rows if rows else float("nan"),
               "ssl/threshold_mean": float(th.mean()), "ssl/used_rows": float(s["used"]),
               "ssl/teacher_decay": float(self.last_decay)}
        for name, n, t in zip(self.class_names, s["i_pseudo"].tolist(), th.tolist(), strict=True):
            out[f"ssl/pseudo/{name}"] = n
            out[f"ssl/threshold/{name}"] = t
        for k in ("i_rows", "i_used", "i_pseudo"):
            s[k].zero_()
        return out

    def report(self) -> str:
        rows, used = int(self.state["rows"]), int(self.state["used"])
        share = f"{100 * used / rows:.1f} %" if rows else "-"
        return (f"ssl ({self.cfg.source}): {rows} unlabelled rows seen, {used} used ({share} above the teacher's "
                f"threshold)")

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": {k: v.detach().clone() for k, v in self.teacher.module.state_dict().items()},
                "stats": {k: v.detach().clone() for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.module.load_state_dict(state["teacher"])
        for k, v in state["stats"].items():
            self.state[k].copy_(v)
