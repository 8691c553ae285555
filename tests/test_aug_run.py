"""A short online-augmented training run writes the aug/* scalars and the source|edited image grid."""

import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_sd import save_tiny_sd

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_augmented_run_writes_aug_tags_and_grid(tmp_path):
    sd = save_tiny_sd(tmp_path / "sd")
    out = tmp_path / "runs"
    cmd = [sys.executable, "train.py", "--config", "configs/baseline.yaml", "run.name=aug", f"run.out_dir={out}",
           "train.steps=4", "train.eval_every=4", "train.log_every=2", "train.batch_size=16", "data.image_size=16",
           "aug.alpha=0.5", f"aug.model={sd}", "aug.image_every=2", "aug.steps=2", "aug.queue_depth=2",
           "aug.guard=off", "aug.audit=false"]  # a random tiny SD: the guard would turn every edit off
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = out.glob("*-aug")
    ea = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("aug/effective_alpha", "aug/queue_depth", "aug/gen_ms", "aug/stall_ms", "aug/nonfinite_dropped",
                "train/loss", "eval/top1"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    alphas = [e.value for e in ea.Scalars("aug/effective_alpha")]
    assert all(abs(a - 0.5) < 1e-6 for a in alphas)  # wait starvation and no NaNs: α exact
    assert "aug/examples" in ea.Tags()["images"]
    img = ea.Images("aug/examples")[0]
    assert img.width > 16 and img.height >= 16
    captions = ea.Tags()["tensors"]
    assert any(t.startswith("aug/examples/caption") for t in captions)
    text = ea.Tensors([t for t in captions if t.startswith("aug/examples/caption")][0])[0]
    assert "→" in text.tensor_proto.string_val[0].decode() and "s=" in text.tensor_proto.string_val[0].decode()
