"""A comparison's reports: ``results.csv`` (one line per run), ``table.md`` (mean ± std over seeds per row) and
``plot.png``. Rewritten after every finished run, so a long comparison shows (and keeps) partial results."""

from __future__ import annotations

import csv
import math
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..monitor import read_summary
from .suites import Plan

METRICS = [("top1", "top-1"), ("balanced_acc", "balanced"), ("acc_many", "many"), ("acc_medium", "medium"),
           ("acc_few", "few")]
COLUMNS = ["preset", "seed", "split", "steps", *[m for m, _ in METRICS], "wall_s", "run_dir"]


@dataclass
class Failure:
    """A (row, seed) whose training failed: reported under the table instead of in it."""

    row: str
    seed: int
    reason: str

    def __str__(self) -> str:
        first = self.reason.splitlines()[0] if self.reason else "failed"
        return f"{self.row} seed {self.seed} ({first})"


def collect(run: Path) -> dict[str, Any]:
    """A finished run's line of results.csv, less the row's name, seed, split and wall time: its final step and
    final evaluation, in %."""
    last = read_summary(run)[-1]
    return {"steps": int(last["step"]), **{m: 100 * float(last[f"eval_{m}"]) for m, _ in METRICS}}


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})


def read_results(path: Path) -> list[dict[str, Any]]:
    """results.csv back as the rows :func:`write_results` wrote (numbers as numbers)."""
    with open(path, newline="") as f:
        return [{**r, "seed": int(r["seed"]), "steps": int(r["steps"]),
                 **{k: float(r[k]) for k in (*[m for m, _ in METRICS], "wall_s")}} for r in csv.DictReader(f)]


def row_stats(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per row name (in first-seen order), each metric's mean and std over its seeds."""
    names = list(dict.fromkeys(r["preset"] for r in rows))
    return {p: {m: mean_std([r[m] for r in rows if r["preset"] == p]) for m, _ in METRICS} for p in names}


def split_word(split: str) -> str:
    return "validation" if split == "val" else "test"


def table(rows: list[dict[str, Any]], plan: Plan, failures: Sequence[Failure] = ()) -> str:
    stats = row_stats(rows)
    steps = sorted({r["steps"] for r in rows})
    total_wall = sum(r["wall_s"] for r in rows if not math.isnan(r["wall_s"]))
    lines = [f"{plan.title}, {split_word(plan.split)} accuracy (%), mean ± std over seeds "
             f"{' '.join(map(str, plan.seeds))} ({len(rows)} runs, {', '.join(map(str, steps))} steps each; summed "
             f"wall time of the runs {total_wall / 60:.1f} min, {plan.jobs} at a time on this machine).",
             "",
             "| preset | " + " | ".join(label for _, label in METRICS) + " | wall s/run |",
             "|---|" + "---:|" * (len(METRICS) + 1)]
    for p in stats:
        cells = [f"{stats[p][m][0]:.2f} ± {stats[p][m][1]:.2f}" for m, _ in METRICS]
        wall, _ = mean_std([r["wall_s"] for r in rows if r["preset"] == p])
        seeds = sorted({r["seed"] for r in rows if r["preset"] == p})
        # a row with a failed or missing run must not pass for the title's seeds
        name = p if len(seeds) >= len(plan.seeds) else f"{p} (seeds {' '.join(map(str, seeds))} only)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall:.0f} |")
    if failures:
        lines += ["", "Failed runs (not in the table): " + "; ".join(map(str, failures))]
    lines += ["", f"Command: `{plan.command}`", ""]
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict[str, Any]], plan: Plan, failures: Sequence[Failure] = ()) -> None:
    write_results(out / "results.csv", rows)
    # the table from the values as written (rounded): a mean of the unrounded ones can round the other way, and
    # table.md must be what results.csv renders to
    rows = read_results(out / "results.csv")
    (out / "table.md").write_text(table(rows, plan, failures))
    if rows:
        plot(out / "plot.png", row_stats(rows), split_word(plan.split), plan.title)
    else:  # every run so far failed: no plot rather than a stale one
        (out / "plot.png").unlink(missing_ok=True)


def plot(path: Path, stats: dict[str, dict[str, tuple[float, float]]], split: str,
         title: str = "digits long-tail") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt
    import numpy as np

    presets = list(stats)
    x = np.arange(len(METRICS))
    width = 0.8 / max(1, len(presets))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(METRICS) + 0.4 * len(presets)), 4.6))
    for i, p in enumerate(presets):
        means = [stats[p][m][0] for m, _ in METRICS]
        stds = [stats[p][m][1] for m, _ in METRICS]
        # a suite's row names run long ("Diff-Mix partial guard + real fallback, pool-agnostic SD + ..."): wrapped
        ax.bar(x + (i - (len(presets) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=textwrap.fill(p, 44))
    ax.set_xticks(x, [label for _, label in METRICS])
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{title}: mean ± std over seeds")
    longest = max((len(p) for p in presets), default=0)
    ax.legend(fontsize=8, ncol=min(5 if longest <= 24 else 2, len(presets)), loc="upper center",
              bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend below the axes is kept whole
    plt.close(fig)
