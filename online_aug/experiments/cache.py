"""Which finished run a comparison may reuse instead of training again.

A run folder ``<runs>/<date>-<time>-<row>-seed<N>`` is reused when it reached its final step with exactly the
config the comparison would run (the user's config: what the trainer derives and records beside it, such as the step
count ``train.epochs`` resolves to, does not count) and, when it was made with a generator, with the same generator
files (:func:`generator_fingerprint`). An interrupted comparison so continues where it stopped, while a changed preset,
override or generator folder trains again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, load_config, lora_entries, planned_steps
from ..faults import guard_interval
from ..monitor import read_summary
from .suites import ROOT

GENERATORS_FILE = "compare_generators.json"  # what the run's generator folders held (a resumed comparison checks it)
WALL_FILE = "compare_wall_s.txt"  # the run's wall time, so a resumed comparison still reports it


def generator_fingerprint(aug: dict[str, Any]) -> dict[str, str]:
    """Content fingerprints of the run's generator inputs (aug.model, textual_inversion, lora, label_rates): a folder
    rebuilt in place (same path, new weights) must not let a comparison reuse runs made with the old one. Each file
    counts by its path, size and the SHA-256 of its first and last MiB (cheap for a multi-GB SD); checkpoints/ is
    skipped; a hub id counts as itself. Empty at alpha 0 (no generator)."""
    if not aug.get("alpha"):
        return {}
    out = {key: _content_fingerprint(aug.get(key) or "") for key in ("model", "textual_inversion", "label_rates")}
    lora = aug.get("lora") or ""
    entries = lora_entries(lora, float(aug.get("lora_scale", 1.0)))
    # one LoRA: its folder's fingerprint, as before stacks existed; a stack: each one's (the weights are config)
    out["lora"] = (_content_fingerprint(entries[0].path) if isinstance(lora, str) and entries else
                   "+".join(_content_fingerprint(e.path) for e in entries))
    return {key: out[key] for key in ("model", "textual_inversion", "lora", "label_rates")}


def _content_fingerprint(ref: str) -> str:
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = ROOT / path
    if not ref or not path.exists():
        return ref
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
    return h.hexdigest()[:16]


def run_dirs(runs: Path, name: str) -> set[Path]:
    """The run folders of ``name``: exactly ``<date>-<time>-<name>`` (a bare ``*-{name}`` would also match another
    row's ``...-intra-...-cb-resampling-seed0`` when looking for ``cb-resampling-seed0``)."""
    pattern = re.compile(rf"\d{{8}}-\d{{6}}-{re.escape(name)}")
    return {p for p in Path(runs).glob(f"*-{name}") if pattern.fullmatch(p.name)}


def user_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (as a dict) that decides a run: with ``train.epochs > 0`` the trainer derives
    the step count from the training split and ``train.steps`` plays no part (a run written before config.yaml's
    ``resolved:`` record kept the derived count there); at ``aug.alpha = 0`` without ``ssl.source`` the ``aug``
    section plays none; without ``ssl.source`` the ``ssl`` section plays none; with ``aug.guard=off`` the guard's
    own keys play none."""
    cfg = copy.deepcopy(cfg)
    if cfg["train"].get("epochs", 0) > 0:
        cfg["train"]["steps"] = None
    if not cfg.get("aug", {}).get("alpha") and cfg.get("ssl", {}).get("source", "off") == "off":
        # no edit and no generated row: the aug section decides nothing (the generator is never built), so a CE run
        # stays reusable when an aug.* default changes
        cfg["aug"] = {}
    aug = cfg.get("aug", {})
    if aug.get("guard") == "off":
        # no guard: its thresholds only word the audit's verdicts (the audit leaves the run's random streams alone)
        # and its share and fallback are never read
        for k in [k for k in aug if k.startswith("guard_")]:
            del aug[k]
    if cfg.get("ssl", {}).get("source", "off") == "off":
        # no unlabelled row: no ssl.* key is read (no teacher, no pseudo-label), so a run written before the ssl
        # section existed is the same run
        cfg["ssl"] = {}
    t = cfg["train"]
    if t.get("guard_every") == 0:  # auto: as it resolves on this machine (a run from before the auto default kept 1)
        dev = str(cfg.get("run", {}).get("device", "auto"))
        cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
        t["guard_every"] = guard_interval(0, "cuda" if cuda else "cpu", int(t.get("log_every", 1)))
    return cfg


def saved_config(run: Path) -> tuple[dict[str, Any], int] | None:
    """A run folder's config (``config.yaml`` less its ``resolved:`` record) as a dict, and the optimizer steps the
    run was to train (the record's ``train_steps``; a run written before the record kept it in ``train.steps``);
    None when it cannot be read as this version's config."""
    path = run / "config.yaml"
    try:
        cfg = load_config(path)
    except (ConfigError, OSError, yaml.YAMLError):  # another version's keys, or unreadable: not reused
        return None
    return dataclasses.asdict(cfg), planned_steps(path, cfg)


def _keys_not_written(run: Path, want_user: dict[str, Any]) -> list[str]:
    """The ``section.key`` names of ``want_user`` that the run's config.yaml does not hold."""
    try:
        raw = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ["config.yaml"]
    return [f"{sec}.{k}" for sec, keys in want_user.items() if isinstance(keys, dict)
            for k in keys if k not in (raw.get(sec) or {})]


def finished_run(runs: Path, name: str, want: dict[str, Any]) -> Path | None:
    """The newest run folder of this name that reached its final step with exactly the config ``want`` (the
    resolved config this comparison would run, as a dict); None if there is none.

    Matching the whole resolved config, not just the name and step count, means a preset edited since (say, pointed
    at a fine-tuned generator) is rerun instead of silently reusing results of the old settings.
    """
    want_user = user_config(want)
    for run in sorted(run_dirs(runs, name), reverse=True):
        rows = read_summary(run)
        if not rows or (saved := saved_config(run)) is None:
            continue
        got, steps = user_config(saved[0]), saved[1]
        missing = _keys_not_written(run, want_user)
        if missing:
            # written before these keys existed: loading filled them with today's defaults, which need not be what
            # that run did (a guard rule that has changed since, say), so it is not taken for this config
            print(f"note: {run} was written before {', '.join(missing[:4])} existed; not reused", file=sys.stderr)
            continue
        if got != want_user:
            diff = [f"{sec}.{k}" for sec in want_user for k in want_user[sec]
                    if got.get(sec, {}).get(k) != want_user[sec][k]]
            print(f"note: {run} finished with other settings ({', '.join(diff[:4])}); not reused", file=sys.stderr)
            continue
        made_with = run / GENERATORS_FILE  # runs from before it was written: reused on their config alone
        if made_with.is_file() and json.loads(made_with.read_text()) != generator_fingerprint(want["aug"]):
            print(f"note: {run} was made with generator files that have changed since; not reused", file=sys.stderr)
            continue
        if int(rows[-1]["step"]) == steps:
            return run
    return None


def read_wall(run: Path) -> float:
    path = run / WALL_FILE
    return float(path.read_text()) if path.is_file() else float("nan")


def record_run(run: Path, wall_s: float, fingerprint: dict[str, str]) -> None:
    """What a resumed comparison reads back: the run's wall time and the generator files it was made with."""
    (run / WALL_FILE).write_text(f"{wall_s:.1f}\n")
    (run / GENERATORS_FILE).write_text(json.dumps(fingerprint) + "\n")
