"""tools/bench.py end to end at a tiny budget: it runs, and what it counts is right (timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_counts_unet_evaluations_and_times_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "tools/bench.py", "--batch", "4", "--repeats", "1", "--steps", "1", "--rounds", "1",
           "--reuse", "3", "--out", str(out), "train.batch_size=8", "aug.queue_depth=1",
           f"run.out_dir={tmp_path / 'runs'}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    gen = res["generation"]
    # few-step: K UNet evaluations per edit, doubled by classifier-free guidance (demo: K = 4, CFG on)
    assert gen["ours_fewstep_K4"]["unet_evals_per_image"] == 8.0
    # diffusers at N = 25 runs int(25 s) steps per strength group, CFG doubling them: between 2*12 and 2*22
    assert 24.0 <= gen["diffusers_img2img_25"]["unet_evals_per_image"] <= 44.0
    assert gen["ratio_fewstep_vs_diffusers"]["unet_evals"] > 2.5
    tr = res["training"]
    for k in ("plain", "online_prefetch", "online_sync"):
        assert tr[k]["images_per_s"] > 0 and len(tr[k]["rounds_images_per_s"]) == 1
        assert 0.0 <= tr[k]["stall_fraction"]
    assert tr["plain"]["stall_fraction"] == 0.0  # nothing to wait for without augmentation
    # generator demand: none without augmentation; aug.reuse=3 generates about a third of the edits
    assert tr["plain"]["generated_per_step"] == 0.0 and tr["online_prefetch"]["generated_per_step"] > 0
    assert tr["online_prefetch_reuse3"]["generated_per_step"] < tr["online_prefetch"]["generated_per_step"]
    assert tr["ratio_reuse_generated"] < 1 and "aug.reuse=3" in r.stdout
    # the distilled rows (K = 1, 2 LCM steps, no CFG): one pair of lines per generator setting
    for k in (1, 2):
        assert gen[f"ours_lcm_K{k}"]["unet_evals_per_image"] == float(k)  # no unconditional pass
        assert gen[f"ratio_lcm_K{k}_vs_diffusers"]["unet_evals"] >= 24.0 / k  # diffusers: >= 24 evals per edit
        assert tr[f"online_prefetch_lcm_K{k}"]["generated_per_step"] > 0
        assert tr[f"ratio_prefetch_lcm_K{k}_vs_plain"] > 0
        assert f"few-step vs diffusers, distilled K={k} LCM no CFG" in r.stdout
        assert f"prefetch vs plain, distilled K={k} LCM no CFG" in r.stdout
    assert "(b) training throughput" in r.stdout and "prefetch vs sync" in r.stdout
