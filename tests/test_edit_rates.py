"""tools/edit_rates.py writes the per-class target rates that aug.label_rates reads (calibrated soft labels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_sd import save_tiny_sd

from online_aug.config import load_config
from online_aug.policy import read_label_rates
from tools import edit_rates

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_edit_rates_file_round_trips_into_the_policy(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "rates.json"
    over = [f"aug.model={model}", "aug.textual_inversion=", "aug.lora=", "aug.prompt=a photo of the digit {name}"]
    rc = edit_rates.main(["--config", str(ROOT / "configs" / "diff-mix.yaml"), "--out", str(out),
                          "--per-class", "3", "--device", "cpu", *over])
    assert rc == 0
    data = json.loads(out.read_text())
    assert sorted(data["target_rate"], key=int) == [str(c) for c in range(10)]
    assert data["per_class"] == 3 and data["strength"] == 0.9 and data["model"] == str(model)
    # every rate is a share of 3 judged edits
    assert all(round(3 * v) == pytest.approx(3 * v) for v in data["target_rate"].values())
    rates = read_label_rates(str(out), 10)
    assert rates.shape == (10,) and float(rates.min()) >= 0 and float(rates.max()) <= 1
    # a run config naming the file loads; a missing file is an error naming the key, before any model loads
    cfg = load_config(ROOT / "configs" / "diff-mix.yaml", [f"aug.label_rates={out}"])
    assert cfg.aug.label_rates == str(out)


def test_edit_rates_bad_arguments(tmp_path: Path) -> None:
    cfg = str(ROOT / "configs" / "diff-mix.yaml")
    assert edit_rates.main(["--config", cfg, "--out", str(tmp_path / "r.json"), "--per-class", "0"]) == 2
    assert edit_rates.main(["--config", cfg, "--out", str(tmp_path / "r.json"), "aug.model=/nonexistent/sd"]) == 2
    assert not (tmp_path / "r.json").exists()
