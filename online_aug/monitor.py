"""Monitoring on the main rank: TensorBoard scalars and image grids, ``summary.csv``, a progress bar, the final table.

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

from .metrics import fmt


class NullMonitor:
    """The no-op monitor of non-zero ranks."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def images(self, tag: str, step: int, grid: torch.Tensor, caption: str = "") -> None: ...

    def summary_row(self, row: dict[str, Any]) -> None: ...

    def progress(self, n: int = 1, **postfix: Any) -> None: ...

    def print(self, text: str) -> None: ...

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
