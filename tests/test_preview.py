"""tools/preview.py: the PNG grid (and its TensorBoard copy) from a config, on the random tiny SD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import save_tiny_sd

from online_aug.config import AugConfig
from online_aug.policy import AugPolicy
from online_aug.rng import step_rng
from tools import preview

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_preview_png_and_tensorboard(model: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "p.png", tmp_path / "tb"
    # The demo's TI/LoRA belong to its own base model: the random tiny SD runs without them.
    rc = preview.main(["--config", str(ROOT / "configs" / "demo.yaml"), f"aug.model={model}", "aug.textual_inversion=",
                       "aug.lora=", "--rows", "3",
                       "--strengths", "0.25,0.9", "--cell", "48", "--out", str(out), "--tb", str(tb), "--no-progress"])
    assert rc == 0
    img = Image.open(out)
    assert img.mode == "RGB"
    w, h = img.size
    assert w > 3 * 48 and h > 3 * 48  # a label column, the real column and two strengths; three rows
    arr = np.asarray(img).astype(float)
    assert arr.std() > 20  # not a constant image
    # The image cells are not blank: the first real cell (top-left of the grid body) varies.
    gray = arr.mean(2)
    assert (gray < 128).mean() > 0.05  # dark digit backgrounds and text, not just white paper

    acc = EventAccumulator(str(tb), size_guidance={"images": 0})
    acc.Reload()
    assert "preview/grid" in acc.Tags()["images"]
    ev = acc.Images("preview/grid")[0]
    assert (ev.width, ev.height) == (w, h)


def test_target_flag_and_errors(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.png"
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), f"aug.model={model}",
            "aug.textual_inversion=", "aug.lora=", "--rows", "1", "--strengths", "1.0", "--out", str(out),
            "--no-progress"]
    assert preview.main(args + ["--target", "eight"]) == 0 and out.is_file()
    assert preview.main(args + ["--target", "eleven"]) == 2
    assert preview.main(args + ["--strengths", "0,1.5"]) == 2


def test_grid_captions_are_the_soft_labels() -> None:
    assert preview.soft_label(1, 7, 0.25, 0.5) == {1: 0.5, 7: 0.5}  # s^gamma = 0.5
    assert preview.soft_label(3, 3, 0.9, 0.5) == {3: 1.0}  # intra edits keep a hard label
    real = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    img = preview.render_grid(real, real[:, None].repeat(1, 3, 1, 1, 1), [0.1, 0.5, 1.0], [0, 1], [1, 0],
                              ["zero", "one"], 0.5, cell=40, title="t")
    assert img.width > 4 * 40 and img.height > 2 * 40


@pytest.mark.parametrize("target_mode", ["inter", "intra"])
def test_soft_label_captions_agree_with_the_policy(target_mode: str) -> None:
    """preview.soft_label captions come from policy.mix_labels, the rule AugPolicy.plan writes into batches."""
    cfg = AugConfig(alpha=1.0, strengths=[0.25, 0.7], gamma=0.5, target_mode=target_mode)
    labels = torch.arange(10).repeat(3)
    plan = AugPolicy(cfg, 10).plan(labels, step_rng(0, 0, 0))
    assert plan.num_edits == len(labels)
    for k in range(plan.num_edits):
        row = plan.soft_label[plan.index[k]]
        caption = preview.soft_label(int(plan.source[k]), int(plan.target[k]), float(plan.strength[k]), cfg.gamma)
        expected = {c: float(row[c]) for c in torch.nonzero(row).flatten().tolist()}
        assert caption.keys() == expected.keys()
        assert all(abs(caption[c] - expected[c]) < 1e-6 for c in caption)
