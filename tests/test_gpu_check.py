"""tools/gpu_check.py (make gpu-check) on a CPU: a clear skip with status 0; its trace analysis and report on
synthetic input (the GPU numbers themselves come from a GPU run)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_check_tool", ROOT / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path / "gpu")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "",
                                                                            "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device is visible" in proc.stdout and "skipped, nothing measured" in proc.stdout
    assert not (tmp_path / "gpu").exists()
    make = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "tools/gpu_check.py" in make.stdout


def test_trace_analysis_finds_device_syncs_and_stream_interleaving():
    tool = _tool()
    k = [{"cat": "kernel", "name": "k", "ts": ts, "dur": 10, "args": {"stream": st}}
         for i in range(12) for ts, st in ((i * 20, 7), (i * 20 + 5, 13))]
    res = tool.analyse_trace({"traceEvents": [*k, {"name": "cudaDeviceSynchronize", "ph": "X"}]})
    assert res["cudaDeviceSynchronize"] == 1 and res["streams"] == 2 and res["kernels"] == 24
    assert res["interleaved"] and res["stream_switches"] == 23
    assert abs(res["overlap_ms"] - 12 * 5 / 1000) < 1e-9  # each pair overlaps 5 us
    serial = tool.analyse_trace({"traceEvents": [e for e in k if e["args"]["stream"] == 7]})
    assert not serial["interleaved"] and serial["overlap_ms"] == 0


def test_report_table_from_results():
    tool = _tool()
    gen = {"256px_K2_eager": 100.0, "256px_K2_graph": 160.0, "256px_diffusers_img2img_25": 9.0}
    train = {"alpha_0.1": {"plain": {"images_per_s": 2000.0, "stall_fraction": 0.0},
                           "online_prefetch": {"images_per_s": 1900.0, "stall_fraction": 0.02},
                           "online_sync": {"images_per_s": 1200.0, "stall_fraction": 0.4},
                           "ratio_prefetch_vs_plain": 0.95}}
    ov = tool.overlap(train, gen)["alpha_0.1"]
    assert ov["T_gen_s"] == round(6 / 160, 4)  # round(0.1 * 64) edits at the graphed 256 px K=2 rate
    assert ov["efficiency"] == round((64 / 1900) / max(64 / 2000, 6 / 160), 3)
    md = tool.markdown({"device": "X", "generator": gen, "training": train, "overlap": {"alpha_0.1": ov},
                        "skipped": ["training alpha=0.25: needs ~120 s, 10 s left"]})
    assert "| 256 | K2_graph | 160.0 |" in md and "| 0.1 | online_prefetch | 1900.0 | 2.0 % |" in md
    assert "Skipped: training alpha=0.25" in md


def test_failed_checks_are_the_trace_and_audit_rules():
    tool = _tool()
    ok = {"audit": {"trace": {"cudaDeviceSynchronize": 0, "interleaved": True},
                    "sync_audit": {"ours_in_trainer_per_step": 0.1}}}
    assert tool.failed_checks(ok) == []
    bad = {"audit": {"trace": {"cudaDeviceSynchronize": 2, "interleaved": False},
                     "sync_audit": {"ours_in_trainer_per_step": 3.0}}}
    assert len(tool.failed_checks(bad)) == 3


@pytest.mark.usefixtures("one_thread")  # conftest.py
def test_the_distilled_lcm_rows_run_at_reduced_size_on_cpu(tmp_path, monkeypatch):
    """bench_lcm's path (distil, load through aug.lora, time K = 1, 2 LCM steps without CFG) on the tiny SD in fp32:
    what make gpu-check runs on SD 1.5's architecture at 512 / 256 px."""
    import torch
    from tiny_sd import save_tiny_sd

    tool = _tool()
    monkeypatch.setattr(tool, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(tool, "DTYPE", torch.float32)
    monkeypatch.setattr(tool, "WORK", tmp_path)
    res = tool.bench_lcm(models={16: save_tiny_sd(tmp_path / "sd")}, batch=2, repeats=1, distill_steps=1)
    assert res["16px_lcm_K1_eager"] > 0 and res["16px_lcm_K2_eager"] > 0
    assert res["16px_lcm_K1_unet_evals_per_image"] == 1.0 and res["16px_lcm_K2_unet_evals_per_image"] == 2.0
    assert (tmp_path / "lcm-sd" / "pytorch_lora_weights.safetensors").is_file()
    assert "| 16 | lcm_K1_eager |" in tool.markdown({"lcm": res})
