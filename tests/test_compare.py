"""tools/compare.py and the harness behind it (online_aug/experiments/): --quick comparisons end to end, suites, the
run cache (what a resumed comparison reuses), a bad row found before any training, and the committed tables."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import yaml
from tiny_sd import save_tiny_sd

from online_aug.config import load_config, save_config
from online_aug.experiments import reports
from online_aug.experiments.cache import finished_run, generator_fingerprint, run_dirs
from online_aug.experiments.suites import Row

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "tools/compare.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_quick_comparison_writes_csv_table_and_plot(tmp_path):
    sd = save_tiny_sd(tmp_path / "sd")
    out = tmp_path / "cmp"
    r = _run(["--out", str(out), "--quick", "--model", str(sd)])
    assert r.returncode == 0, r.stderr[-3000:]

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(x["preset"], x["seed"], x["split"], x["steps"]) for x in rows] == [
        ("baseline", "0", "test", "2"), ("real-guidance", "0", "test", "2")]
    for x in rows:
        assert 0 <= float(x["top1"]) <= 100 and float(x["wall_s"]) > 0
        assert Path(x["run_dir"], "summary.csv").is_file()

    table = (out / "table.md").read_text()
    assert "| preset | top-1 | balanced | many | medium | few |" in table
    assert "| baseline |" in table and "| real-guidance |" in table and "±" in table
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # a second call reuses the finished runs instead of training again
    r2 = _run(["--out", str(out), "--quick", "--model", str(sd), "--presets", "baseline"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert len(list((out / "runs").glob("*-baseline-seed0"))) == 1
    # ... but not when the settings changed since (an edited preset, another override): that run trains again
    r3 = _run(["--out", str(out), "--quick", "--model", str(sd), "--presets", "baseline", "--set", "train.lr=0.001"])
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "finished with other settings (train.lr)" in r3.stderr
    assert len(list((out / "runs").glob("*-baseline-seed0"))) == 2


def test_validation_mode_reports_the_validation_split(tmp_path):
    out = tmp_path / "val"
    r = _run(["--out", str(out), "--quick", "--presets", "baseline", "--val"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["split"] == "val"
    assert "validation accuracy" in (out / "table.md").read_text()


def _compare_module():
    """tools/compare.py as a module (tools are scripts, not a package: load it by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_tool", ROOT / "tools" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_suite_rows_resolve_to_configs_and_distinct_run_names() -> None:
    """Every row of the long-tail suite loads (preset + its overrides) and gets its own run name."""
    compare = _compare_module()
    plan = compare.parse_args(["--suite", "longtail"])
    assert plan.out == Path("reports/longtail") and len(plan.seeds) >= 5
    names = set()
    for row in plan.rows:
        cfg = load_config(ROOT / "configs" / f"{row.preset}.yaml", plan.overrides(row, 0))
        assert cfg.data.imbalance_ratio == 100 and cfg.data.val_per_class == 10 and cfg.data.pool_fraction == 0.5
        names.add(cfg.run.name)
    assert len(names) == len(plan.rows)
    models = {plan.resolved_config(r, 0)["aug"]["model"] for r in plan.rows if r.preset == "diff-mix"}
    assert models == {"models/tiny-sd-digits-pool-agnostic", "models/tiny-sd-digits-pool",
                      "models/tiny-sd-digits-lt100"}
    quick = compare.parse_args(["--suite", "longtail", "--quick", "--out", "/tmp/x"])
    assert len(quick.rows) == 2 and quick.seeds == [0] and quick.steps == 2


def test_unknown_suite_is_refused(tmp_path):
    r = _run(["--suite", "no-such-suite"])
    assert r.returncode == 2 and "configs/suites/no-such-suite.yaml not found" in r.stderr


def test_unknown_preset_is_refused_before_any_run(tmp_path):
    r = _run(["--out", str(tmp_path / "x"), "--presets", "no-such-preset"])
    assert r.returncode == 2 and "configs/no-such-preset.yaml not found" in r.stderr


def test_model_override_drops_the_presets_learned_tokens() -> None:
    """--model swaps the base SD: the presets' tokens / LoRA (learned on their own base) would be a load error, so
    they are dropped and a {token} prompt falls back to the class name; without --model they stay."""
    compare = _compare_module()

    plan = compare.parse_args(["--out", "/tmp/x", "--model", "/tmp/sd", "--presets", "da-fusion-leakage-free"])
    ov = plan.overrides(Row("da-fusion-leakage-free", "da-fusion-leakage-free"), 0)
    assert {"aug.model=/tmp/sd", "aug.textual_inversion=", "aug.lora=", "aug.prompt=a photo of a {name}"} <= set(ov)
    cfg = load_config(ROOT / "configs" / "da-fusion-leakage-free.yaml", ov)
    assert (cfg.aug.textual_inversion, cfg.aug.lora, cfg.aug.prompt) == ("", "", "a photo of a {name}")
    plain = compare.parse_args(["--out", "/tmp/x", "--presets", "diff-mix"]).overrides(Row("diff-mix", "diff-mix"), 0)
    assert load_config(ROOT / "configs" / "diff-mix.yaml", plain).aug.lora == "models/ft-digits-pool-agnostic"


def test_run_dirs_match_the_whole_row_name(tmp_path) -> None:
    """A row whose name ends with another row's ('... + CB resampling' vs 'CB resampling') keeps its runs apart:
    neither the reuse check nor the new-run detection of two parallel trainings confuses them."""
    for d in ("20261125-173943-cb-resampling-seed0", "20261125-184023-intra-s-0-5-cb-resampling-seed0",
              "notes-cb-resampling-seed0"):
        (tmp_path / d).mkdir()
    assert {p.name for p in run_dirs(tmp_path, "cb-resampling-seed0")} == {
        "20261125-173943-cb-resampling-seed0"}
    assert {p.name for p in run_dirs(tmp_path, "intra-s-0-5-cb-resampling-seed0")} == {
        "20261125-184023-intra-s-0-5-cb-resampling-seed0"}


def test_generator_fingerprint_follows_the_files_not_the_path(tmp_path) -> None:
    """A generator folder rebuilt in place changes the fingerprint a finished run was made with (so a resumed
    comparison trains again); checkpoints/ and an alpha-0 run do not count; a hub id counts as itself."""
    folder = tmp_path / "ft"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(b"a" * 100)
    aug = {"alpha": 0.5, "model": "org/some-sd", "textual_inversion": str(folder), "lora": str(folder),
           "label_rates": ""}
    fp = generator_fingerprint(aug)
    assert fp["model"] == "org/some-sd" and fp["label_rates"] == "" and fp["lora"] == fp["textual_inversion"]
    (folder / "checkpoints" / "step-1.pt").write_bytes(b"x")
    assert generator_fingerprint(aug) == fp
    (folder / "weights.safetensors").write_bytes(b"b" * 100)  # same path, same size, new weights
    assert generator_fingerprint(aug)["lora"] != fp["lora"]
    assert generator_fingerprint({**aug, "alpha": 0.0}) == {}


def _suite(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"title": "test suite", "seeds": [0], "rows": rows}))
    return path


def test_a_config_error_in_one_row_stops_the_comparison_before_any_training(tmp_path) -> None:
    """A typo in one row's ``set:`` is found while every row's config is resolved, before the first training: one
    message naming the row and the key, no run started, no traceback."""
    suite = _suite(tmp_path, [{"name": "CE", "preset": "baseline"},
                              {"name": "CE typo", "preset": "baseline", "set": ["train.lrr=0.1"]}])
    out = tmp_path / "cmp"
    r = _run(["--suite", str(suite), "--out", str(out), "--seeds", "0", "1", "--steps", "2"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "row 'CE typo' (preset baseline, every seed): unknown config key 'train.lrr'" in r.stderr
    assert "'CE' " not in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("unknown config key") == 1  # one line for the row, not one per seed
    assert not out.exists()  # nothing trained, nothing written


def test_a_failed_row_is_listed_and_the_others_go_on_and_an_epochs_run_is_reused(tmp_path) -> None:
    """A row that fails during training (a generator folder that does not exist) is printed and listed under the
    table while the next row trains; a second call reuses the finished run, which sized its training in epochs."""
    suite = _suite(tmp_path, [
        {"name": "broken", "preset": "real-guidance", "set": [f"aug.model={tmp_path / 'no-such-sd'}"]},
        {"name": "CE", "preset": "baseline", "set": ["train.epochs=1"]}])
    out = tmp_path / "cmp"
    args = ["--suite", str(suite), "--out", str(out), "--quick"]
    r = _run(args)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: broken seed 0:" in r.stderr and "1 run(s) failed" in r.stderr
    with open(out / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["preset"] == "CE" and int(row["steps"]) >= 1
    table = (out / "table.md").read_text()
    assert "| CE |" in table and "Failed runs (not in the table): broken seed 0 (broken-seed0 failed" in table

    r2 = _run(args)
    assert r2.returncode == 1, r2.stderr[-3000:]
    assert len(run_dirs(out / "runs", "ce-seed0")) == 1, r2.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        assert [x["run_dir"] for x in csv.DictReader(f)] == [row["run_dir"]]


def _fake_run(runs: Path, name: str, config: dict, last_step: int) -> Path:
    run = runs / f"20260101-000000-{name}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "summary.csv").write_text(f"step,eval_top1\n{last_step},0.5\n")
    return run


def test_a_finished_run_that_used_train_epochs_is_reused(tmp_path) -> None:
    """With train.epochs the trainer derives the step count from the split and records it in config.yaml's
    resolved: section (runs written before that section kept it in train.steps): either way the run folder holds the
    asked config, and it is finished when it reached the recorded count."""
    import math

    from online_aug.data import build_splits

    asked = ["train.epochs=1", "train.batch_size=8", "run.name=ce-seed0"]
    cfg = load_config(ROOT / "configs" / "baseline.yaml", asked)
    steps = math.ceil(len(build_splits(cfg.data).train) / 8)
    assert steps != cfg.train.steps
    save_config(cfg, tmp_path / "recorded.yaml", resolved={"train_steps": steps})
    save_config(load_config(ROOT / "configs" / "baseline.yaml", [*asked, f"train.steps={steps}"]),
                tmp_path / "written-back.yaml")
    want = asdict(cfg)
    for form in ("recorded", "written-back"):
        config = yaml.safe_load((tmp_path / f"{form}.yaml").read_text())
        runs = tmp_path / form
        _fake_run(runs, "ce-seed0", config, steps - 1)  # stopped one step short: not finished
        assert finished_run(runs, "ce-seed0", want) is None, form
        done = _fake_run(runs, "ce-seed1", config, steps)
        assert finished_run(runs, "ce-seed1", want) == done, form
    # another number of epochs is another config
    other = asdict(load_config(ROOT / "configs" / "baseline.yaml", ["train.epochs=2", *asked[1:]]))
    assert finished_run(tmp_path / "recorded", "ce-seed1", other) is None


def test_committed_suite_tables_render_from_their_results() -> None:
    """Each committed suite's table.md is what the report code writes from its results.csv and its command line:
    the harness renders committed tables bit for bit."""
    compare = _compare_module()
    tables = [t for t in sorted((ROOT / "reports").glob("*/table.md")) if "--suite" in t.read_text()]
    assert len(tables) >= 3
    for path in tables:
        text = path.read_text()
        (cmd,) = [line[len("Command: `"):-1] for line in text.splitlines() if line.startswith("Command: `")]
        plan = compare.parse_args(shlex.split(cmd)[2:])
        assert reports.table(reports.read_results(path.parent / "results.csv"), plan) == text, path


def test_a_run_written_before_a_key_existed_is_not_taken_for_todays_default(tmp_path) -> None:
    """A run folder whose config.yaml lacks a key loads with today's default for it, which need not be what the run
    did (the guard's rule changed under the same key names): it is not reused. At aug.alpha=0 the aug keys do not
    count (no generator), so a CE run stays reusable; without ssl.source the ssl keys do not."""
    diff_mix = ["aug.model=models/tiny-sd-digits-pool", "aug.textual_inversion=", "aug.lora=",
                "aug.prompt=a photo of the digit {name}"]
    for preset, over, reused in [("diff-mix", diff_mix, False), ("baseline", [], True)]:
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml", over)
        config = asdict(cfg)
        full = _fake_run(tmp_path / preset / "full", "r-seed0", config, cfg.train.steps)
        assert finished_run(tmp_path / preset / "full", "r-seed0", config) == full
        del config["aug"]["guard_fallback"]  # as a run written before the key existed
        old = _fake_run(tmp_path / preset / "old", "r-seed0", config, cfg.train.steps)
        assert (finished_run(tmp_path / preset / "old", "r-seed0", asdict(cfg)) == old) == reused, preset
    # without ssl.source no ssl.* key is read: a run written before the ssl section existed is the same run; with
    # ssl.source on it is not
    # with aug.guard=off the guard's keys are never read either: its share and fallback do not count
    cfg = load_config(ROOT / "configs" / "diff-mix.yaml", [*diff_mix, "aug.guard=off"])
    config = asdict(cfg)
    config["aug"]["guard_fallback"] = "source" if cfg.aug.guard_fallback == "target" else "target"
    del config["aug"]["guard_min_share"]
    other = _fake_run(tmp_path / "unguarded", "r-seed0", config, cfg.train.steps)
    assert finished_run(tmp_path / "unguarded", "r-seed0", asdict(cfg)) == other
    for preset, reused in [("diff-mix", True), ("ssl-real-pool", False)]:
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml", diff_mix if preset == "diff-mix" else [])
        config = asdict(cfg)
        del config["ssl"]["start"]
        old = _fake_run(tmp_path / preset / "no-ssl", "r-seed0", config, cfg.train.steps)
        assert (finished_run(tmp_path / preset / "no-ssl", "r-seed0", asdict(cfg)) == old) == reused, preset


def test_a_row_missing_a_seed_says_which_seeds_it_averages() -> None:
    """The title names the plan's seeds; a row whose run failed (or is still training under another compare) is
    averaged over fewer, and says so in its name instead of passing for all of them."""
    compare = _compare_module()
    plan = compare.parse_args(["--suite", "easy-regime"])
    rows = [r for r in reports.read_results(ROOT / "reports" / "easy-regime" / "results.csv")
            if not (r["preset"] == "CE" and r["seed"] == 4)]
    text = reports.table(rows, plan)
    assert "| CE (seeds 0 1 2 3 only) |" in text
    assert "| Real-Gen, pool class-named SD |" in text  # complete rows keep their name
