"""tools/compare.py --quick: two presets, one seed, two steps each; results.csv, table.md and a non-empty plot.png."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from tiny_sd import save_tiny_sd

from online_aug.config import load_config

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
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_suite_rows_resolve_to_configs_and_distinct_run_names() -> None:
    """Every row of the long-tail suite loads (preset + its overrides) and gets its own run name."""
    compare = _compare_module()
    args = compare.parse_args(["--suite", "longtail"])
    assert args.out == "reports/longtail" and len(args.seeds) >= 5
    names = set()
    for row in args.rows:
        ov = compare.run_overrides(args, row, 0)
        cfg = load_config(ROOT / "configs" / f"{row.preset}.yaml", ov)
        assert cfg.data.imbalance_ratio == 100 and cfg.data.val_per_class == 10 and cfg.data.pool_fraction == 0.5
        names.add(cfg.run.name)
    assert len(names) == len(args.rows)
    models = {load_config(ROOT / "configs" / f"{r.preset}.yaml", compare.run_overrides(args, r, 0)).aug.model
              for r in args.rows if r.preset == "diff-mix"}
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

    args = compare.parse_args(["--out", "/tmp/x", "--model", "/tmp/sd", "--presets", "da-fusion-leakage-free"])
    ov = compare.run_overrides(args, "da-fusion-leakage-free", 0)
    assert {"aug.model=/tmp/sd", "aug.textual_inversion=", "aug.lora=", "aug.prompt=a photo of a {name}"} <= set(ov)
    cfg = load_config(ROOT / "configs" / "da-fusion-leakage-free.yaml", ov)
    assert (cfg.aug.textual_inversion, cfg.aug.lora, cfg.aug.prompt) == ("", "", "a photo of a {name}")
    plain = compare.run_overrides(compare.parse_args(["--out", "/tmp/x", "--presets", "diff-mix"]), "diff-mix", 0)
    assert load_config(ROOT / "configs" / "diff-mix.yaml", plain).aug.lora == "models/ft-digits-pool-agnostic"


def test_run_dirs_match_the_whole_row_name(tmp_path) -> None:
    """A row whose name ends with another row's ('... + CB resampling' vs 'CB resampling') keeps its runs apart:
    neither the reuse check nor the new-run detection of two parallel trainings confuses them."""
    compare = _compare_module()
    for d in ("20261125-173943-cb-resampling-seed0", "20261125-184023-intra-s-0-5-cb-resampling-seed0",
              "notes-cb-resampling-seed0"):
        (tmp_path / d).mkdir()
    assert {p.name for p in compare.run_dirs(tmp_path, "cb-resampling-seed0")} == {
        "20261125-173943-cb-resampling-seed0"}
    assert {p.name for p in compare.run_dirs(tmp_path, "intra-s-0-5-cb-resampling-seed0")} == {
        "20261125-184023-intra-s-0-5-cb-resampling-seed0"}


def test_generator_fingerprint_follows_the_files_not_the_path(tmp_path) -> None:
    """A generator folder rebuilt in place changes the fingerprint a finished run was made with (so a resumed
    comparison trains again); checkpoints/ and an alpha-0 run do not count; a hub id counts as itself."""
    compare = _compare_module()
    folder = tmp_path / "ft"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(b"a" * 100)
    aug = {"alpha": 0.5, "model": "org/some-sd", "textual_inversion": str(folder), "lora": str(folder),
           "label_rates": ""}
    fp = compare.generator_fingerprint(aug)
    assert fp["model"] == "org/some-sd" and fp["label_rates"] == "" and fp["lora"] == fp["textual_inversion"]
    (folder / "checkpoints" / "step-1.pt").write_bytes(b"x")
    assert compare.generator_fingerprint(aug) == fp
    (folder / "weights.safetensors").write_bytes(b"b" * 100)  # same path, same size, new weights
    assert compare.generator_fingerprint(aug)["lora"] != fp["lora"]
    assert compare.generator_fingerprint({**aug, "alpha": 0.0}) == {}
