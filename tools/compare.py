"""Compare presets on the embedded digits long-tail task over several seeds: results.csv, table.md, plot.png.

Every (preset, seed) is its own ``python train.py`` subprocess; all runs share the step count, batch size and
classifier recipe, only ``run.seed`` varies, and ``data.split_seed`` stays fixed (online_aug/experiments/).

Never tune on the test split: ``--val`` evaluates on the presets' balanced validation split (``data.val_per_class``,
``train.eval_split=val``); use it for any choice (alpha, s, gamma, guidance, steps) and report test numbers only for
the final choice.

    python tools/compare.py --out reports/compare --seeds 0 1 2 --steps 300
    python tools/compare.py --out reports/tune --val --presets diff-mix-uniformize --set aug.gamma=0.1
    python tools/compare.py --out /tmp/q --quick --model /tmp/tiny-sd      # smoke test: 2 presets, 1 seed, 2 steps
    python tools/compare.py --suite longtail --jobs 2                       # the long-tail benchmark's main table

A suite (``configs/suites/<name>.yaml``, or a path to one) names its rows (a preset plus overrides each), seeds and
output folder; see ``configs/suites/longtail.yaml``. ``--jobs N`` runs N trainings at once, each with 1/N of the
cores' threads. Every row's config is checked before the first training starts; a row that fails during training is
listed under the table and the others go on (exit status 1).

Runs that already finished under ``<out>/runs`` with the same name and the same resolved config are reused (an
interrupted comparison continues where it stopped; a changed preset or override trains again); ``--fresh`` ignores
them.
"""

from __future__ import annotations

import argparse
import sys
import time

from online_aug.config import ConfigError
from online_aug.experiments import runner
from online_aug.experiments.suites import DEFAULT_PRESETS, DEFAULT_TITLE, Plan, Row, load_suite, preset_path


def parse_args(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (results.csv, table.md, plot.png, runs/, logs/); "
                                               "default: the suite's")
    p.add_argument("--suite", default=None, help="configs/suites/<name>.yaml (or a path to a suite file): rows, seeds "
                                                 "and output folder")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once (each gets cores/jobs threads)")
    p.add_argument("--title", default=DEFAULT_TITLE, help="first words of table.md")
    p.add_argument("--presets", nargs="+", default=None, help=f"configs/<name>.yaml (default: {DEFAULT_PRESETS})")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="run.seed values; the data split stays fixed (default: 0 1 2, or 0 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="train.steps for every run (default: the presets')")
    p.add_argument("--model", default=None, help="aug.model for every augmented run (default: the presets'); the "
                   "presets' learned tokens / LoRA are dropped (they belong to their own base model)")
    p.add_argument("--val", action="store_true",
                   help="evaluate on the validation split (for tuning), not on test")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 presets, seed 0, 2 steps, batch 8, 16 px (pair with --model <tiny SD>)")
    p.add_argument("--fresh", action="store_true", help="rerun even when a finished run is found under <out>/runs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    runs = None
    if args.suite:
        if args.presets:
            p.error("--suite and --presets are exclusive (a suite lists its rows)")
        try:
            suite = load_suite(args.suite)
        except ConfigError as e:
            p.error(str(e))
        rows = suite.rows[:2] if args.quick else suite.rows
        args.seeds = args.seeds or ([0] if args.quick else suite.seeds)
        args.out = args.out or suite.out
        args.title = suite.title or args.title
        runs = suite.runs
    else:
        rows = [Row(n, n) for n in (args.presets or (DEFAULT_PRESETS[:2] if args.quick else DEFAULT_PRESETS))]
    if not args.out:
        p.error("--out is required (or a --suite that names one)")
    if args.quick:
        args.steps = args.steps or 2
    for row in rows:
        if not preset_path(row.preset).is_file():
            p.error(f"--presets: configs/{row.preset}.yaml not found")
    argv = sys.argv[1:] if argv is None else argv
    return Plan(rows=rows, seeds=args.seeds or ([0] if args.quick else [0, 1, 2]), out=args.out, runs=runs,
                title=args.title, steps=args.steps, model=args.model, val=args.val, quick=args.quick,
                extra=list(args.set), jobs=args.jobs, fresh=args.fresh, timeout=args.timeout,
                command=" ".join(["python tools/compare.py", *argv]))


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    try:
        jobs = runner.resolve_jobs(plan)  # every row's config, before the first training starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    failures = runner.run(plan, jobs)
    print(f"suite wall time {(time.perf_counter() - t_start) / 60:.1f} min")
    print((plan.out / "table.md").read_text())
    print(f"wrote {plan.out / 'results.csv'}, {plan.out / 'table.md'}, {plan.out / 'plot.png'}")
    if failures:
        print(f"error: {len(failures)} run(s) failed: " + "; ".join(map(str, failures)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
