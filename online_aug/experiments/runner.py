"""Run a comparison: every (row, seed) is its own ``python train.py`` subprocess, so DeepSpeed and the process group
start clean and a crash in one run cannot leak state into the next.

Every row's config is resolved and checked before the first training starts (a typo in one row's overrides is
reported with the row's name, and nothing trains); a row that fails during training anyway is recorded under the
table while the others go on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import ConfigError
from ..monitor import read_summary
from .cache import finished_run, generator_fingerprint, read_wall, record_run, run_dirs
from .reports import Failure, collect, write_outputs
from .suites import ROOT, Plan, Row, preset_path


@dataclass
class Job:
    """One training of the comparison: a row at a seed, with its overrides and the config they resolve to."""

    row: Row
    seed: int
    overrides: list[str]
    want: dict[str, Any]

    @property
    def name(self) -> str:
        return self.row.run_name(self.seed)


def resolve_jobs(plan: Plan) -> list[Job]:
    """Every (row, seed) with its resolved config, in table order; raises one ConfigError naming every row whose
    config does not load (and why), so that no training starts on a comparison that cannot finish."""
    jobs, bad = [], {}
    for row in plan.rows:
        for seed in plan.seeds:
            try:
                jobs.append(Job(row, seed, plan.overrides(row, seed), plan.resolved_config(row, seed)))
            except ConfigError as e:
                bad.setdefault(row.name, {}).setdefault(str(e), []).append(seed)
    if bad:
        lines = [f"{len(bad)} row(s) of the comparison have a config error; nothing was trained:"]
        for name, errors in bad.items():
            preset = next(r.preset for r in plan.rows if r.name == name)
            for message, seeds in errors.items():
                which = "every seed" if len(seeds) == len(plan.seeds) else "seed " + " ".join(map(str, seeds))
                lines.append(f"  row '{name}' (preset {preset}, {which}): {message}")
        raise ConfigError("\n".join(lines))
    return jobs


def train_job(plan: Plan, job: Job, logs: Path) -> tuple[Path, float]:
    """A finished run of ``job``: reused when one matches (see cache.py), else trained now. Returns the run folder
    and its wall time; raises RuntimeError with the log's tail when the training fails."""
    runs = plan.runs_dir
    if not plan.fresh and (done := finished_run(runs, job.name, job.want)) is not None:
        return done, read_wall(done)
    fingerprint = generator_fingerprint(job.want["aug"])  # taken before training: what this run is made with
    before = run_dirs(runs, job.name)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(preset_path(job.row.preset)), *job.overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("HF_HUB_OFFLINE", "1")  # the comparison uses local models only; never wait on the network
    if plan.jobs > 1:  # N trainings share the cores: one thread pool each, sized so they do not oversubscribe
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.jobs))
    log = logs / f"{job.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=plan.timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{job.name} timed out after {plan.timeout:.0f} s; log {log}") from e
    wall = time.perf_counter() - t0
    new = sorted(run_dirs(runs, job.name) - before)
    if r.returncode != 0 or not new or not read_summary(new[-1]):
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{job.name} failed (exit {r.returncode}); log {log}:\n{tail}")
    record_run(new[-1], wall, fingerprint)
    return new[-1], wall


def run(plan: Plan, jobs: list[Job]) -> list[Failure]:
    """Train (or reuse) every job, ``plan.jobs`` at a time, rewriting the reports after each; returns the jobs that
    failed (each printed when it fails, and listed under the table)."""
    out = plan.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    # runs/ (checkpoints, ~60 MB each) and logs/ are the raw material; only the three reports belong in git
    (out / ".gitignore").write_text("runs/\nlogs/\n")
    rows: list[dict] = []
    failures: list[Failure] = []
    bar = tqdm(total=len(jobs), desc="compare", unit="run")
    # results are written in job order as they finish, so an interrupted suite keeps (and later reuses) its runs
    with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
        futures = [(job, pool.submit(train_job, plan, job, logs)) for job in jobs]
        for job, fut in futures:
            try:
                run_dir, wall = fut.result()
            except Exception as e:  # one failed training must not lose the others: record it and go on
                failures.append(Failure(job.row.name, job.seed, str(e)))
                tqdm.write(f"error: {job.row.name} seed {job.seed}: {e}", file=sys.stderr)
            else:
                rows.append({"preset": job.row.name, "seed": job.seed, "split": plan.split, **collect(run_dir),
                             "wall_s": wall, "run_dir": str(run_dir)})
            bar.update(1)
            bar.set_postfix_str(f"{job.row.name} seed {job.seed}")
            write_outputs(out, rows, plan, failures)  # after every run: a long comparison shows partial results
    bar.close()
    return failures
