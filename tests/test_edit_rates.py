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


def test_class_diversity_tells_a_copy_from_a_variation() -> None:
    """With the committed pool SD (a trained VAE: its round trip keeps a digit), an edit at a strength near 0 is its
    source: a 1-image class has spread ~0 and sits on its training image; at strength 1 the samples spread out."""
    import numpy as np
    import torch

    from online_aug.data import build_splits
    from online_aug.generator import load_sd
    from online_aug.sdtrain.edit_quality import class_diversity

    cfg = load_config(ROOT / "configs" / "diff-mix.yaml")
    x, y = build_splits(cfg.data).train.tensors()
    keep = np.isin(y, [0, 4])  # zero: 1 training image; four: 56
    comps = load_sd(str(ROOT / "models" / "tiny-sd-digits-pool-agnostic"), "cpu", torch.float32)
    prompts = ["a photo"] * 10
    kw = dict(per_class=6, guidance_scale=1.0, steps=2)
    near = class_diversity(comps, prompts, x[keep], y[keep], strength=0.02, **kw)["classes"]
    far = class_diversity(comps, prompts, x[keep], y[keep], strength=1.0, **kw)["classes"]
    assert set(near) == {"0", "4"} and near["0"]["n_train"] == 1 and near["0"]["real_spread"] is None
    assert near["0"]["spread"] < 0.03 and near["0"]["copy_dist"] < 0.03  # six copies of the one zero
    assert far["0"]["spread"] > 0.1 and far["0"]["copy_dist"] > 0.1  # samples from noise: anything but that zero
    assert near["4"]["real_spread"] > 0.1 and near["4"]["spread"] > 0.1  # six different fours, kept


def test_generator_report_cli(model: Path, tmp_path: Path) -> None:
    from tools import generator_report

    out = tmp_path / "report.json"
    over = [f"aug.model={model}", "aug.textual_inversion=", "aug.lora=", "aug.prompt=a photo of the digit {name}"]
    cfg = str(ROOT / "configs" / "diff-mix.yaml")
    assert generator_report.main(["--config", cfg, "--out", str(out), "--per-class", "2", "--device", "cpu",
                                  *over]) == 0
    data = json.loads(out.read_text())
    assert data["judge"] == "pool" and len(data["classes"]) == 10  # the config has a generator pool
    assert {"target_rate", "spread", "copy_dist", "real_spread", "n_train"} <= set(data["classes"][0])
    assert generator_report.main(["--config", cfg, "--judge", "pool", "data.pool_fraction=0", *over]) == 2
    assert generator_report.main(["--config", cfg, "--per-class", "1", *over]) == 2
