"""Compare presets on the embedded digits long-tail task over several seeds: results.csv, table.md, plot.png.

Every (preset, seed) is its own ``python train.py`` subprocess, so DeepSpeed and the process group start clean and
a crash in one run cannot leak state into the next. All runs share the step count, batch size and classifier recipe
(the presets keep them equal and the command-line overrides here apply to every run alike); only ``run.seed``
varies, while ``data.split_seed`` stays fixed, so every run sees the same long-tail training split, the one the
committed tiny SD was trained on, and none of them has seen a test image.

Never tune on the test split: ``--val`` carves a validation split out of the training data (``data.val_fraction``)
and evaluates on it (``train.eval_split=val``); use it for any choice (alpha, s, gamma, guidance, steps) and report
test numbers only for the final choice.

    python tools/compare.py --out reports/compare --seeds 0 1 2 --steps 300
    python tools/compare.py --out reports/tune --val --presets diff-mix-uniformize --set aug.gamma=0.1
    python tools/compare.py --out /tmp/q --quick --model /tmp/tiny-sd      # smoke test: 2 presets, 1 seed, 2 steps
    python tools/compare.py --suite longtail --jobs 2                       # the long-tail benchmark's main table

A suite (``configs/suites/<name>.yaml``) names its rows (a preset plus overrides each), seeds and output folder; see
``configs/suites/longtail.yaml``. ``--jobs N`` runs N trainings at once, each with 1/N of the cores' threads.

Runs that already finished under ``<out>/runs`` with the same name and the same resolved config are reused (an
interrupted comparison continues where it stopped; a changed preset or override trains again); ``--fresh`` ignores
them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from online_aug.config import ConfigError, load_config
from online_aug.monitor import read_summary

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_PRESETS = ["baseline", "real-guidance", "real-gen", "diff-mix", "diff-mix-uniformize"]
METRICS = [("top1", "top-1"), ("balanced_acc", "balanced"), ("acc_many", "many"), ("acc_medium", "medium"),
           ("acc_few", "few")]
QUICK_OVERRIDES = ["train.batch_size=8", "data.image_size=16", "aug.steps=1", "aug.image_every=0",
                   "aug.queue_depth=1", "train.log_every=1"]


@dataclass
class Row:
    """One line of the table: a preset plus overrides, run once per seed."""

    name: str
    preset: str
    overrides: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def load_suite(name: str) -> dict[str, Any]:
    """configs/suites/<name>.yaml: {title, out, seeds, rows: [{name, preset, set: [key=value, ...]}]}."""
    path = ROOT / "configs" / "suites" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (ROOT / "configs" / "suites").glob("*.yaml"))
        raise ConfigError(f"--suite {name}: {path.relative_to(ROOT)} not found (suites: {', '.join(known)})")
    data = yaml.safe_load(path.read_text())
    rows = []
    for i, r in enumerate(data.get("rows", [])):
        if not isinstance(r, dict) or "name" not in r or "preset" not in r:
            raise ConfigError(f"{path.relative_to(ROOT)}: rows[{i}] needs a name and a preset")
        flat: list[str] = []
        for x in r.get("set", []):  # a YAML alias (&common / *common) nests a shared list: flatten it
            flat += [str(y) for y in x] if isinstance(x, list) else [str(x)]
        rows.append(Row(str(r["name"]), str(r["preset"]), flat))
    data["rows"] = rows
    return data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (results.csv, table.md, plot.png, runs/, logs/); "
                                               "default: the suite's")
    p.add_argument("--suite", default=None, help="configs/suites/<name>.yaml: rows, seeds and output folder")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once (each gets cores/jobs threads)")
    p.add_argument("--title", default="Digits long-tail", help="first words of table.md")
    p.add_argument("--presets", nargs="+", default=None, help=f"configs/<name>.yaml (default: {DEFAULT_PRESETS})")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="run.seed values; the data split stays fixed (default: 0 1 2, or 0 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="train.steps for every run (default: the presets')")
    p.add_argument("--model", default=None, help="aug.model for every augmented run (default: the presets'); the "
                   "presets' learned tokens / LoRA are dropped (they belong to their own base model)")
    p.add_argument("--val", action="store_true",
                   help="evaluate on a validation split carved from training data (for tuning), not on test")
    p.add_argument("--val-fraction", type=float, default=0.2, help="data.val_fraction used by --val")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 presets, seed 0, 2 steps, batch 8, 16 px (pair with --model <tiny SD>)")
    p.add_argument("--fresh", action="store_true", help="rerun even when a finished run is found under <out>/runs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.suite:
        if args.presets:
            p.error("--suite and --presets are exclusive (a suite lists its rows)")
        try:
            suite = load_suite(args.suite)
        except ConfigError as e:
            p.error(str(e))
        args.rows = suite["rows"][:2] if args.quick else suite["rows"]
        args.seeds = args.seeds or ([0] if args.quick else suite.get("seeds"))
        args.out = args.out or suite.get("out")
        args.title = suite.get("title", args.title)
        args.runs = suite.get("runs")
    else:
        args.rows = [Row(n, n) for n in (args.presets or (DEFAULT_PRESETS[:2] if args.quick else DEFAULT_PRESETS))]
    if not args.out:
        p.error("--out is required (or a --suite that names one)")
    if args.quick:
        args.seeds = args.seeds or [0]
        args.steps = args.steps or 2
    args.seeds = args.seeds or [0, 1, 2]
    for row in args.rows:
        if not (ROOT / "configs" / f"{row.preset}.yaml").is_file():
            p.error(f"--presets: configs/{row.preset}.yaml not found")
    return args


def runs_dir(args: argparse.Namespace) -> Path:
    """Where the runs live: ``<out>/runs``, or a suite's ``runs:`` folder shared with another suite (a row with the
    same name and resolved config is then trained once and reported in both tables)."""
    return Path(args.runs) if getattr(args, "runs", None) else Path(args.out) / "runs"


def run_overrides(args: argparse.Namespace, row: Row | str, seed: int) -> list[str]:
    row = Row(row, row) if isinstance(row, str) else row
    preset = row.preset
    out = [f"run.name={row.slug}-seed{seed}", f"run.seed={seed}", f"run.out_dir={runs_dir(args)}"]
    if args.steps:
        # one evaluation at the end: intermediate test numbers invite picking the best step, which is tuning on test
        out += [f"train.steps={args.steps}", f"train.eval_every={args.steps}"]
    if args.quick:
        out += QUICK_OVERRIDES + ["train.warmup_steps=1"]
    if args.model:
        out.append(f"aug.model={args.model}")
        # A preset's learned tokens / LoRA belong to its own base model (loading them onto another is an error):
        # drop them, and let a {token} prompt fall back to the class name. --set can add ones learned on --model.
        out += ["aug.textual_inversion=", "aug.lora="]
        prompt = load_config(ROOT / "configs" / f"{preset}.yaml").aug.prompt
        if "{token}" in prompt:
            out.append(f"aug.prompt={prompt.replace('{token}', '{name}')}")
    if args.val:
        split = load_config(ROOT / "configs" / f"{preset}.yaml").data
        # presets with the protocol split already hold a balanced validation split; older ones carve one
        out += [] if split.val_per_class else [f"data.val_fraction={args.val_fraction}"]
        out.append("train.eval_split=val")
    return out + row.overrides + list(args.set)


GENERATORS_FILE = "compare_generators.json"  # what the run's generator folders held (a resumed comparison checks it)


def generator_fingerprint(aug: dict[str, Any]) -> dict[str, str]:
    """Content fingerprints of the run's generator inputs (aug.model, textual_inversion, lora, label_rates): a folder
    rebuilt in place (same path, new weights) must not let a comparison reuse runs made with the old one. Each file
    counts by its path, size and the SHA-256 of its first and last MiB (cheap for a multi-GB SD); checkpoints/ is
    skipped; a hub id counts as itself. Empty at alpha 0 (no generator)."""
    import hashlib

    if not aug.get("alpha"):
        return {}
    out = {}
    for key in ("model", "textual_inversion", "lora", "label_rates"):
        ref = aug.get(key) or ""
        path = Path(ref).expanduser()
        if not path.is_absolute():
            path = ROOT / path
        if not ref or not path.exists():
            out[key] = ref
            continue
        h = hashlib.sha256()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                      if p.is_file() and "checkpoints" not in p.relative_to(path).parts)
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(path.parent)}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
        out[key] = h.hexdigest()[:16]
    return out


def run_dirs(runs: Path, name: str) -> set[Path]:
    """The run folders of ``name``: exactly ``<date>-<time>-<name>`` (a bare ``*-{name}`` would also match another
    row's ``...-intra-...-cb-resampling-seed0`` when looking for ``cb-resampling-seed0``)."""
    pattern = re.compile(rf"\d{{8}}-\d{{6}}-{re.escape(name)}")
    return {p for p in runs.glob(f"*-{name}") if pattern.fullmatch(p.name)}


def finished_run(runs: Path, name: str, want: dict[str, Any]) -> Path | None:
    """The newest run folder of this name that reached its final step with exactly the config ``want`` (the
    resolved config this comparison would run, as a dict); None if there is none.

    Matching the whole resolved config, not just the name and step count, means a preset edited since (say, pointed
    at a fine-tuned generator) is rerun instead of silently reusing results of the old settings.
    """
    for run in sorted(run_dirs(runs, name), reverse=True):
        rows = read_summary(run)
        if not rows or not (run / "config.yaml").is_file():
            continue
        try:
            got = asdict(load_config(run / "config.yaml"))
        except (ConfigError, OSError, yaml.YAMLError):  # another version's keys, or unreadable: not reused
            continue
        if got != want:
            diff = [f"{sec}.{k}" for sec in want for k in want[sec] if got.get(sec, {}).get(k) != want[sec][k]]
            print(f"note: {run} finished with other settings ({', '.join(diff[:4])}); not reused", file=sys.stderr)
            continue
        saved = run / GENERATORS_FILE  # runs from before it was written: reused on their config alone
        if saved.is_file() and json.loads(saved.read_text()) != generator_fingerprint(want["aug"]):
            print(f"note: {run} was made with generator files that have changed since; not reused", file=sys.stderr)
            continue
        if int(rows[-1]["step"]) == int(want["train"]["steps"]):
            return run
    return None


def train_one(args: argparse.Namespace, row: Row, seed: int, logs: Path) -> tuple[Path, float]:
    """Run train.py for one (row, seed); returns its run folder and wall time. Raises with the log's tail."""
    runs = runs_dir(args)
    preset = row.preset
    name = f"{row.slug}-seed{seed}"
    overrides = run_overrides(args, row, seed)
    want = asdict(load_config(ROOT / "configs" / f"{preset}.yaml", overrides))
    if not args.fresh and (done := finished_run(runs, name, want)) is not None:
        wall = done / "compare_wall_s.txt"
        return done, float(wall.read_text()) if wall.is_file() else math.nan
    fingerprint = generator_fingerprint(want["aug"])  # taken before training: what this run is made with
    before = run_dirs(runs, name)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{preset}.yaml"),
           *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("HF_HUB_OFFLINE", "1")  # the comparison uses local models only; never wait on the network
    if args.jobs > 1:  # N trainings share the cores: one thread pool each, sized so they do not oversubscribe
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    log = logs / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout)
    wall = time.perf_counter() - t0
    new = sorted(run_dirs(runs, name) - before)
    if r.returncode != 0 or not new or not read_summary(new[-1]):
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {r.returncode}); log {log}:\n{tail}")
    (new[-1] / "compare_wall_s.txt").write_text(f"{wall:.1f}\n")  # so a resumed comparison still reports it
    (new[-1] / GENERATORS_FILE).write_text(json.dumps(fingerprint) + "\n")
    return new[-1], wall


def collect(run: Path) -> dict[str, float]:
    last = read_summary(run)[-1]
    return {m: 100 * float(last[f"eval_{m}"]) for m, _ in METRICS}


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def write_outputs(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    cols = ["preset", "seed", "split", "steps", *[m for m, _ in METRICS], "wall_s", "run_dir"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in cols})

    split = "validation" if args.val else "test"
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    stats = {p: {m: mean_std([r[m] for r in rows if r["preset"] == p]) for m, _ in METRICS} for p in presets}
    steps = sorted({r["steps"] for r in rows})
    total_wall = sum(r["wall_s"] for r in rows if not math.isnan(r["wall_s"]))
    lines = [f"{args.title}, {split} accuracy (%), mean ± std over seeds {' '.join(map(str, args.seeds))} "
             f"({len(rows)} runs, {', '.join(map(str, steps))} steps each; summed wall time of the runs "
             f"{total_wall / 60:.1f} min, {args.jobs} at a time on this machine).",
             "",
             "| preset | " + " | ".join(label for _, label in METRICS) + " | wall s/run |",
             "|---|" + "---:|" * (len(METRICS) + 1)]
    for p in presets:
        cells = [f"{stats[p][m][0]:.2f} ± {stats[p][m][1]:.2f}" for m, _ in METRICS]
        wall, _ = mean_std([r["wall_s"] for r in rows if r["preset"] == p])
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {wall:.0f} |")
    cmd = "python tools/compare.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python tools/compare.py"
    lines += ["", f"Command: `{cmd}`", ""]
    (out / "table.md").write_text("\n".join(lines))
    plot(out / "plot.png", presets, stats, split, args.title)


def plot(path: Path, presets: list[str], stats: dict, split: str, title: str = "digits long-tail") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(METRICS))
    width = 0.8 / max(1, len(presets))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(METRICS) + 0.4 * len(presets)), 4.6))
    for i, p in enumerate(presets):
        means = [stats[p][m][0] for m, _ in METRICS]
        stds = [stats[p][m][1] for m, _ in METRICS]
        ax.bar(x + (i - (len(presets) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=p)
    ax.set_xticks(x, [label for _, label in METRICS])
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{title}: mean ± std over seeds")
    ax.legend(fontsize=8, ncol=min(5, len(presets)), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs_dir(args).mkdir(parents=True, exist_ok=True)
    # runs/ (checkpoints, ~60 MB each) and logs/ are the raw material; only the three reports belong in git
    (out / ".gitignore").write_text("runs/\nlogs/\n")
    rows: list[dict] = []
    jobs = [(r, s) for r in args.rows for s in args.seeds]
    bar = tqdm(total=len(jobs), desc="compare", unit="run")
    t_start = time.perf_counter()
    # results are written in job order as they finish, so an interrupted suite keeps (and later reuses) its runs
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [(row, seed, pool.submit(train_one, args, row, seed, logs)) for row, seed in jobs]
        for row, seed, fut in futures:
            try:
                run, wall = fut.result()
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                for *_, f in futures:
                    f.cancel()
                bar.close()
                print(f"error: {e}", file=sys.stderr)
                return 1  # the reports of the runs that finished are already written
            bar.update(1)
            bar.set_postfix_str(f"{row.name} seed {seed}")
            steps = int(read_summary(run)[-1]["step"])
            rows.append({"preset": row.name, "seed": seed, "split": "val" if args.val else "test", "steps": steps,
                         **collect(run), "wall_s": wall, "run_dir": str(run)})
            write_outputs(out, rows, args)  # after every run: a long comparison shows (and keeps) partial results
    print(f"suite wall time {(time.perf_counter() - t_start) / 60:.1f} min")
    bar.close()
    print((out / "table.md").read_text())
    print(f"wrote {out / 'results.csv'}, {out / 'table.md'}, {out / 'plot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
