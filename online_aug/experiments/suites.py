"""What a comparison runs: rows (a preset plus overrides each), seeds, and the overrides of every training.

A suite (``configs/suites/<name>.yaml``) names its rows, seeds and output folder; see ``configs/suites/longtail.yaml``.
Every (row, seed) trains with the same step count, batch size and classifier recipe (the presets keep them equal and
the plan's overrides apply to every run alike); only ``run.seed`` varies, while ``data.split_seed`` stays fixed, so
every run sees the same training split and none of them has seen a test image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, load_config, load_yaml

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/, train.py, models/
CONFIGS = ROOT / "configs"
SUITES = CONFIGS / "suites"

DEFAULT_PRESETS = ["baseline", "real-guidance", "real-gen", "diff-mix", "diff-mix-uniformize"]
DEFAULT_TITLE = "Digits long-tail"
QUICK_OVERRIDES = ["train.batch_size=8", "data.image_size=16", "aug.steps=1", "aug.image_every=0", "aug.audit_edits=2",
                   "aug.queue_depth=1", "train.log_every=1"]


def preset_path(preset: str) -> Path:
    return CONFIGS / f"{preset}.yaml"


@dataclass
class Row:
    """One line of the table: a preset plus overrides, run once per seed."""

    name: str
    preset: str
    overrides: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    def run_name(self, seed: int) -> str:
        return f"{self.slug}-seed{seed}"


@dataclass
class Suite:
    """A suite file: ``{title, out, seeds, runs, rows: [{name, preset, set: [key=value, ...]}]}``."""

    rows: list[Row]
    title: str | None = None
    out: str | None = None
    seeds: list[int] | None = None
    runs: str | None = None  # a runs folder shared with another suite


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def suite_path(name: str) -> Path:
    """``configs/suites/<name>.yaml``, or ``name`` itself when it is a path to a suite file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return Path(name)
    return SUITES / f"{name}.yaml"


def load_suite(name: str) -> Suite:
    path = suite_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in SUITES.glob("*.yaml"))
        raise ConfigError(f"--suite {name}: {_rel(path)} not found (suites: {', '.join(known)})")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{_rel(path)} cannot be read as YAML: {' '.join(str(e).split())}") from e
    rows = []
    for i, r in enumerate(data.get("rows", [])):
        if not isinstance(r, dict) or "name" not in r or "preset" not in r:
            raise ConfigError(f"{_rel(path)}: rows[{i}] needs a name and a preset")
        flat: list[str] = []
        for x in r.get("set", []):  # a YAML alias (&common / *common) nests a shared list: flatten it
            flat += [str(y) for y in x] if isinstance(x, list) else [str(x)]
        rows.append(Row(str(r["name"]), str(r["preset"]), flat))
    return Suite(rows=rows, title=data.get("title"), out=data.get("out"), seeds=data.get("seeds"),
                 runs=data.get("runs"))


@dataclass
class Plan:
    """One comparison: its rows and seeds, the overrides that apply to every run, and where it writes."""

    rows: list[Row]
    seeds: list[int]
    out: Path
    runs: Path | None = None  # default <out>/runs
    title: str = DEFAULT_TITLE
    steps: int | None = None  # train.steps of every run (default: the presets')
    model: str | None = None  # aug.model of every augmented run (default: the presets')
    val: bool = False  # evaluate on the validation split (tuning) instead of test
    quick: bool = False  # smoke-test sizes
    extra: list[str] = field(default_factory=list)  # overrides after the rows' own
    jobs: int = 1  # trainings at once
    fresh: bool = False  # never reuse a finished run
    timeout: float = 3600  # seconds per run
    command: str = "python tools/compare.py"  # the command line table.md cites

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.runs = Path(self.runs) if self.runs else None

    @property
    def runs_dir(self) -> Path:
        """Where the runs live: ``<out>/runs``, or a suite's ``runs:`` folder shared with another suite (a row with
        the same name and resolved config is then trained once and reported in both tables)."""
        return self.runs if self.runs is not None else self.out / "runs"

    @property
    def split(self) -> str:
        return "val" if self.val else "test"

    def overrides(self, row: Row, seed: int) -> list[str]:
        """The ``train.py`` overrides of one (row, seed), after the preset's own file."""
        out = [f"run.name={row.run_name(seed)}", f"run.seed={seed}", f"run.out_dir={self.runs_dir}"]
        if self.steps:
            # one evaluation at the end: intermediate test numbers invite picking the best step, which is tuning on
            # test
            out += [f"train.steps={self.steps}", f"train.eval_every={self.steps}"]
        if self.quick:
            out += QUICK_OVERRIDES + ["train.warmup_steps=1"]
        if self.model:
            out.append(f"aug.model={self.model}")
            # A preset's learned tokens / LoRA belong to its own base model (loading them onto another is an
            # error): drop them, and let a {token} prompt fall back to the class name (a prompt the tokens completed,
            # "a photo", gets the name appended: one prompt for every class is refused). Extra overrides can add ones
            # learned on the model.
            out += ["aug.textual_inversion=", "aug.lora="]
            prompt = load_config(preset_path(row.preset)).aug.prompt
            if "{token}" in prompt:
                out.append(f"aug.prompt={prompt.replace('{token}', '{name}')}")
            elif "{name}" not in prompt:
                out.append(f"aug.prompt={prompt} {{name}}")
        if self.val:
            out.append("train.eval_split=val")  # the presets' protocol split holds a balanced validation split
        return out + row.overrides + list(self.extra)

    def resolved_config(self, row: Row, seed: int) -> dict[str, Any]:
        """The config this (row, seed) trains with, as a dict; raises ConfigError (a typo in an override, say)."""
        from dataclasses import asdict

        return asdict(load_config(preset_path(row.preset), self.overrides(row, seed)))
