"""Monitoring on the main rank: TensorBoard scalars and image grids, the dashboards (custom-scalars layout, HParams),
``summary.csv``, a progress bar, the final table.

Other ranks get a :class:`NullMonitor`, so callers never branch on rank (torchtitan's no-op logger pattern).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .metrics import fmt

# The HParams tab's columns: the config keys that tell the benchmark's rows apart. A key the config does not have
# (an older or newer version) is left out; lists become comma-separated strings, bools "true"/"false".
HPARAM_KEYS = ("run.name", "run.seed", "data.dataset", "data.imbalance_ratio", "data.image_size", "data.sampler",
               "model.name", "model.pretrained", "train.steps", "train.lr", "train.batch_size", "train.optimizer",
               "train.transform", "train.mixup_alpha", "train.cutmix_alpha", "train.cmo_prob", "train.drw_start",
               "train.label_smoothing", "train.select", "train.eval_split", "aug.method", "aug.alpha", "aug.model",
               "aug.prompt", "aug.textual_inversion", "aug.lora", "aug.strengths", "aug.strength_range",
               "aug.target_mode", "aug.target_dist", "aug.guidance_scale", "aug.steps", "aug.reuse", "aug.adaptive",
               "aug.guard")
# The final evaluation (the final table's rows), written once at the end under final/*: the HParams tab's metrics.
# One tag family whatever train.select is (with select=val, eval/* holds the val curve and selected/* the result).
FINAL_METRICS = ("top1", "balanced_acc", "acc_many", "acc_medium", "acc_few")
# The guard's scalars (aug/guard/<what> for the run, aug/guard/<what>/<class> per class) as regexes, so the charts
# follow whatever the guard logs.
GUARD_TAGS = (r"aug/guard/[^/]+$", r"aug/guard/.+/")


def dashboard_layout(augmented: bool) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout (``SummaryWriter.add_custom_scalars``): {category: {chart: ["Multiline",
    [tag regex, ...]]}}. Runs without augmentation leave out its category; TensorBoard merges the layouts of the runs
    under one logdir by category title, so a mixed benchmark folder still shows it. Augmentation comes last, so the
    merged order does not depend on which run sorts first."""
    layout: dict[str, dict[str, list]] = {
        "accuracy": {
            "many / medium / few-shot accuracy": ["Multiline", ["eval/acc_many", "eval/acc_medium", "eval/acc_few"]],
            "top-1 and balanced accuracy": ["Multiline", ["eval/top1", "eval/balanced_acc"]],
        },
        "training": {
            "loss": ["Multiline", ["train/loss"]],
            "learning rate": ["Multiline", ["train/lr"]],
            "images per second": ["Multiline", ["train/images_per_s"]],
        },
    }
    if augmented:
        layout["augmentation health"] = {
            "effective alpha (share of the batch trained on an edit)": ["Multiline", ["aug/effective_alpha"]],
            "trainer stall and generation time (ms per batch)": ["Multiline", ["aug/stall_ms", "aug/gen_ms"]],
            "prefetch queue depth": ["Multiline", ["aug/queue_depth"]],
            "near-duplicates (share; distance to the nearest training image)": ["Multiline", ["aug/near_dup",
                                                                                              "aug/nn_dist"]],
            "guard": ["Multiline", [GUARD_TAGS[0]]],
            "guard, per class": ["Multiline", [GUARD_TAGS[1]]],
        }
    return layout


def hparams_of(cfg: Config, steps: int) -> dict[str, Any]:
    """The run's :data:`HPARAM_KEYS` as a flat dict of numbers and strings (``steps``: the resolved step count)."""
    flat: dict[str, Any] = {}

    def put(key: str, v: Any) -> None:
        if isinstance(v, dict):  # a section-like key: its leaves, dotted
            for k, x in v.items():
                put(f"{key}.{k}", x)
        elif isinstance(v, bool):
            flat[key] = "true" if v else "false"
        elif isinstance(v, (list, tuple)):
            flat[key] = ",".join(str(x) for x in v)
        elif isinstance(v, (int, float, str)):
            flat[key] = v
        elif v is not None:
            flat[key] = str(v)

    sections = cfg.to_dict()
    for key in HPARAM_KEYS:
        section, _, name = key.partition(".")
        if name in sections.get(section, {}):
            put(key, sections[section][name])
    flat["train.steps"] = int(steps)  # train.epochs > 0 decides it; config.yaml's resolved: section has the same
    return flat


class NullMonitor:
    """The no-op monitor of non-zero ranks."""

    def start(self, cfg: Config) -> None: ...

    def final(self, metrics: dict[str, float]) -> None: ...

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def images(self, tag: str, step: int, grid: torch.Tensor, caption: str = "") -> None: ...

    def summary_row(self, row: dict[str, Any]) -> None: ...

    def progress(self, n: int = 1, **postfix: Any) -> None: ...

    def print(self, text: str) -> None: ...

    def audit(self, audit: Any, step: int) -> None: ...

    def close(self) -> None: ...


class Monitor(NullMonitor):
    """TensorBoard writer, summary.csv and a tqdm bar for the main rank."""

    def __init__(self, run_dir: Path, total_steps: int, initial_step: int = 0, show_progress: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        # a resumed run replaces what a killed run logged after its checkpoint: TensorBoard hides those steps
        # (purge_step) and summary.csv drops their rows
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=initial_step + 1 if initial_step else None)
        self.csv_path = self.run_dir / "summary.csv"
        if initial_step and self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                keys, rows = reader.fieldnames or [], list(reader)
            kept = [r for r in rows if not str(r.get("step", "")).isdigit() or int(r["step"]) <= initial_step]
            if len(kept) < len(rows):
                with open(self.csv_path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=keys)
                    w.writeheader()
                    w.writerows(kept)
        # Off a terminal (a log file, a cluster job's stdout) every redraw is a new line; one line every 30 s keeps
        # the log readable and still shows the run is alive.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                        disable=not show_progress, mininterval=0.1 if interactive else 30.0)
        self.total_steps, self.initial_step = total_steps, initial_step

    def start(self, cfg: Config) -> None:
        """The dashboards, once per run directory: the custom-scalars layout and the HParams session start (the
        config's :data:`HPARAM_KEYS`, the :data:`FINAL_METRICS` declared as final/*; :meth:`final` writes their
        values). A resumed run writes neither again: TensorBoard keeps the first session start of a run anyway, and
        the run's row stays the configuration it started with."""
        if self.initial_step:
            return
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_custom_scalars(dashboard_layout(cfg.aug.alpha > 0))
        experiment, session_start, _ = hparams(hparams_of(cfg, self.total_steps),
                                               {f"final/{k}": math.nan for k in FINAL_METRICS})
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        self.writer.flush()  # the dashboards show from the first minute, not after the first flush_secs

    def final(self, metrics: dict[str, float]) -> None:
        """The final evaluation as final/* at the last step (the HParams metrics; a non-finite one stays empty),
        and the session's end (status: success)."""
        if not metrics:
            return
        from torch.utils.tensorboard.summary import hparams

        self.scalars(self.total_steps, {f"final/{k}": metrics.get(k, math.nan) for k in FINAL_METRICS})
        _, _, session_end = hparams({}, {})
        self.writer.file_writer.add_summary(session_end)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(k, v, step)

    def images(self, tag: str, step: int, grid: torch.Tensor, caption: str = "") -> None:
        self.writer.add_image(tag, grid.clamp(0, 1), step)
        if caption:
            self.writer.add_text(tag + "/caption", caption, step)

    def summary_row(self, row: dict[str, Any]) -> None:
        """Append one row (timm's summary.csv); the header is written with the first row, or rewritten if
        a resumed run adds new columns."""
        rows: list[dict[str, Any]] = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def progress(self, n: int = 1, **postfix: Any) -> None:
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def print(self, text: str) -> None:
        self.bar.write(text)

    def audit(self, audit: Any, step: int) -> None:
        """The generator audit (:class:`~online_aug.audit.Audit`): ``audit.json``/``audit.md`` in the run directory,
        and per class ``aug/guard/on/<class>`` (1: edits go toward it), ``aug/guard/target_rate/<class>``,
        ``aug/guard/spread/<class>``, with ``aug/guard/classes_on``."""
        audit.write(self.run_dir)
        values = {"aug/guard/classes_on": float(audit.allowed.sum()), "aug/guard/share": audit.partial_share,
                  "aug/guard/baseline": float(audit.baseline)}
        for c in audit.classes:
            values[f"aug/guard/on/{c.name}"] = float(c.helps)
            values[f"aug/guard/target_rate/{c.name}"] = c.target_rate
            values[f"aug/guard/spread/{c.name}"] = c.spread
        self.scalars(step, values)

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()
        self.writer.close()


def confusion_image(pred: np.ndarray, labels: np.ndarray, num_classes: int, cell: int = 8) -> torch.Tensor:
    """Row-normalised confusion matrix (row: true class, column: predicted) as a [3, H, W] heat map in [0, 1]."""
    conf = np.zeros((num_classes, num_classes))
    np.add.at(conf, (labels, pred), 1)
    conf = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    img = torch.as_tensor(conf, dtype=torch.float32).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return img[None].repeat(3, 1, 1)


def gain_sentence(metrics: dict[str, float], ref: dict[str, float], class_names: list[str],
                  train_counts: list[int]) -> str:
    """One sentence: what this run gained (or lost) against the reference row, and on which classes (the tail)."""
    parts = []
    for key, what in (("acc_few", "few-shot"), ("top1", "top-1")):
        if key in ref and key in metrics:
            d = 100 * metrics[key] - ref[key]
            parts.append(f"{what} {'+' if d >= 0 else ''}{d:.1f} points ({100 * metrics[key]:.1f} vs {ref[key]:.1f})")
    tail = sorted(range(len(class_names)), key=lambda c: train_counts[c])[:4]
    where = ", ".join(f"{class_names[c]} (n={train_counts[c]}) {100 * metrics.get(f'class_acc/{c}', math.nan):.0f}%"
                      for c in tail)
    return f"against the reference: {'; '.join(parts)}; the rarest classes: {where}"


def final_report(metrics: dict[str, float], class_names: list[str], train_counts: list[int], eval_split: str,
                 run_dir: Path, reference: str = "", selected_step: int | None = None) -> str:
    """The lines a finished run ends with: the final evaluation table (with the ``run.reference`` column when the
    split is test), where the run lives and the TensorBoard command."""
    selected = f", the weights of step {selected_step} (best val)" if selected_step is not None else ""
    lines = [f"\nfinal evaluation ({eval_split} split{selected}, %):"]
    ref = None
    if reference and eval_split == "test":
        ref = load_reference(reference)
        if ref is None:
            lines.append(f"(run.reference={reference!r}: no such file or row; no reference column)")
    lines.append(eval_table(metrics, class_names, train_counts, ref))
    if ref is not None:
        lines.append(f"reference column: {reference} (tools/compare.py, same split, mean over seeds)")
        lines.append(gain_sentence(metrics, ref[1], class_names, train_counts))
    lines += [f"\nrun directory: {run_dir}", f"tensorboard --logdir {run_dir / 'tb'}"]
    return "\n".join(lines)


def eval_table(metrics: dict[str, float], class_names: list[str], train_counts: list[int],
               reference: tuple[str, dict[str, float]] | None = None) -> str:
    """The final evaluation as a plain-text table (percentages); ``reference`` = (label, metrics in %) adds a column
    (a committed baseline on the same split, see :func:`load_reference`)."""
    ref_label, ref = reference if reference else ("", {})
    width = max(8, len(ref_label) + 2)
    head = f"{'metric':<22}{'value':>8}" + (f"{ref_label:>{width}}" if reference else "")
    rule = "-" * len(head)
    lines = [head, rule]
    for k in ("top1", "balanced_acc", "acc_many", "acc_medium", "acc_few"):
        row = f"{k:<22}{fmt(metrics.get(k, math.nan)):>8}"
        if reference:
            v = ref.get(k, math.nan)
            row += f"{('n/a' if math.isnan(v) else f'{v:.2f}'):>{width}}"
        lines.append(row)
    lines.append(rule)
    for c, name in enumerate(class_names):
        lines.append(f"{name + f' (n={train_counts[c]})':<22}{fmt(metrics.get(f'class_acc/{c}', math.nan)):>8}")
    return "\n".join(lines)


def read_summary(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of a run's ``summary.csv`` (written by :class:`Monitor`), as strings; [] when it has none yet."""
    path = Path(run_dir) / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_reference(spec: str) -> tuple[str, dict[str, float]] | None:
    """``run.reference`` = ``<results.csv>:<row>`` (a tools/compare.py table): the row's mean over its seeds, in %.

    Returns None (and the caller prints why) when the file or row is missing: the reference is a courtesy column,
    never a reason to fail a run that has trained."""
    path, _, row = spec.rpartition(":")
    if not path or not Path(path).is_file():
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("preset") == row and r.get("split", "test") == "test"]
    if not rows:
        return None
    keys = ("top1", "balanced_acc", "acc_many", "acc_medium", "acc_few")
    means = {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys if all(r.get(k) for r in rows)}
    return f"{row} ({len(rows)} seeds)", means
