"""``make gpu-check``: everything about the CUDA path that a CPU cannot check, in one run of under 10 minutes on one
H100; JSON and a markdown table under ``reports/gpu/``. Without CUDA it says so and exits 0.

1. ``pytest -m gpu``: ring stress, gen_ms, fp16 vs fp32, CUDA graph vs eager, prefetch == sync in fp16, 20 steps
   of ZeRO-3 training in fp16 and bf16 (tests/test_cuda.py).
2. A sync audit: 20 training steps with online augmentation under ``torch.cuda.set_sync_debug_mode("warn")``, every
   synchronising call counted by thread and by the call site in this package.
3. A profiler trace of 8 of those steps: no ``cudaDeviceSynchronize``, and the kernels of the producer's and the
   trainer's streams interleave (time they overlap, stream switches).
4. Benchmarks side by side: the few-step generator on SD 1.5's architecture (random weights, built in code:
   online_aug/sdtrain/sd15.py) at 512 and 256 px, K = 1, 2, 4, batch 32, eager vs CUDA graph; diffusers'
   StableDiffusionImg2ImgPipeline at the papers' 25 steps on the same model; training images/s of ResNet-50 at
   224 px plain vs online (prefetch, sync) at alpha 0.1 and 0.25 with the 256 px K = 2 generator (bench_training
   of online_aug/experiments/timing.py, as tools/bench.py); overlap efficiency step_time / max(T_train, T_gen) and
   the stall fraction.
5. The distilled rows: the SD-1.5-architecture folder at 512 and 256 px distilled for 2 steps into an LCM-LoRA
   (online_aug/sdtrain/lcm_distill.py, mixed precision; only to exercise the path: the weights stay random), loaded
   through aug.lora and timed at K = 1, 2 LCM steps without CFG, eager vs CUDA graph (UNet evaluations per image
   counted).

    python tools/gpu_check.py [--out reports/gpu] [--budget-s 540] [--skip-tests] [--skip-bench]

Each section checks the time left first and is recorded as skipped when it would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE, DTYPE = torch.device("cuda"), torch.float16  # module constants so that a CPU smoke run can swap them
WORK = Path(tempfile.gettempdir()) / "online_aug_gpu_check"  # run folders and the 2 GB SD 1.5 folder: not reports/
SKIP_MESSAGE = ("gpu-check: no CUDA device is visible (torch {torch}, CUDA build {cuda}); skipped, nothing measured. "
                "Run `make gpu-check` on a machine with a GPU.")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, need_s: float, name: str, results: dict) -> bool:
        if self.left() >= need_s:
            return True
        results.setdefault("skipped", []).append(f"{name}: needs ~{need_s:.0f} s, {self.left():.0f} s left")
        print(f"gpu-check: skipping {name} (budget)", flush=True)
        return False


def _sync() -> None:
    torch.cuda.synchronize()  # benchmark boundary only


# ---------------------------------------------------------------- 1. pytest -m gpu


def run_gpu_tests(out: Path, timeout_s: float) -> dict:
    import xml.etree.ElementTree as ET

    xml = out / "pytest-gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/", f"--junitxml={xml}", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        tail = (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout_s:.0f} s", "tail": str(e.stdout)[-4000:]}
    res: dict[str, Any] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        res.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        res["failed"] = [c.get("name") for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    res["tail"] = tail if proc.returncode else tail[-600:]
    return res


# ---------------------------------------------------------------- 2./3. sync audit and profiler trace


def _demo_trainer(steps: int, extra: list[str]):
    from online_aug.config import load_config
    from online_aug.trainer import Trainer

    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"run.device={DEVICE.type}", f"run.out_dir={WORK / 'runs'}", "run.name=gpu-check", f"train.steps={steps}",
        "aug.alpha=0.25", "aug.image_every=0", "train.log_every=10", "train.guard_every=10",
        "aug.guard=off", "aug.audit=false",  # the hot path is under audit here, not the generator's verdict
        *extra])
    return Trainer(cfg, show_progress=False)


def sync_audit_and_trace(steps: int = 20, traced: int = 8) -> dict:
    """The sync audit over ``steps`` training steps with the prefetch queue, then a profiler trace of ``traced``."""
    from torch.profiler import ProfilerActivity, profile

    from online_aug.testing.sync import SyncLint

    tr = _demo_trainer(steps + traced + 5, [])
    res: dict[str, Any] = {}
    try:
        for _ in range(5):  # warm-up: the queue fills, kernels are selected (outside the audit)
            tr.train_step(next(tr.source))
        _sync()
        with SyncLint(cuda=True) as rec:  # every sync the CUDA runtime makes, by thread and call site
            for _ in range(steps * tr.accum):
                tr.train_step(next(tr.source))
        _sync()  # outside the audit and the trace: this one is ours
        res["sync_audit"] = {"steps": steps, "by_thread": dict(rec.by_thread),
                             "by_site": dict(rec.by_site.most_common(20)),
                             "trainer_thread_per_step": rec.by_thread.get("MainThread", 0) / steps,
                             "ours_in_trainer_per_step": rec.ours_in_main / steps}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(traced * tr.accum):
                tr.train_step(next(tr.source))
        _sync()
        with tempfile.TemporaryDirectory() as tmp:  # tens of MB: analysed here, not kept in reports/
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            res["trace"] = analyse_trace(json.loads(trace.read_text()))
    finally:
        tr.source.close()
        tr.monitor.close()
    return res


def analyse_trace(trace: dict) -> dict:
    """Device synchronizes in the CUDA runtime calls; per-stream kernel time, the time kernels of two streams run at
    once, and how often consecutive kernels (by start) switch stream."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    device_syncs = sum(1 for e in events if e.get("name") == "cudaDeviceSynchronize")
    kernels = sorted(((e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("stream"))
                      for e in events if e.get("cat") == "kernel"), key=lambda k: k[0])
    per_stream: Counter = Counter()
    for s, e, st in kernels:
        per_stream[str(st)] += e - s
    switches = sum(1 for a, b in zip(kernels, kernels[1:], strict=False) if a[2] != b[2])
    # time with kernels of >= 2 streams running (sweep over start/end points)
    points = sorted([(s, 1, st) for s, _, st in kernels] + [(e, -1, st) for _, e, st in kernels],
                    key=lambda p: (p[0], p[1]))
    running: Counter = Counter()
    overlap, last = 0.0, None
    for t, d, st in points:
        if last is not None and sum(1 for v in running.values() if v > 0) >= 2:
            overlap += t - last
        running[st] += d
        last = t
    return {"cudaDeviceSynchronize": device_syncs, "kernels": len(kernels), "streams": len(per_stream),
            "kernel_ms_by_stream": {k: round(v / 1000, 3) for k, v in per_stream.items()},
            "overlap_ms": round(overlap / 1000, 3), "stream_switches": switches,
            "interleaved": len(per_stream) >= 2 and switches >= 10}


# ---------------------------------------------------------------- 4. benchmarks


def bench_generator(sizes=(512, 256), ks=(1, 2, 4), batch: int = 32, repeats: int = 2, budget: Budget | None = None,
                    results: dict | None = None) -> dict:
    """images/s of the few-step loop on SD 1.5's architecture, eager vs CUDA graph, and diffusers' 25-step img2img."""
    out: dict[str, Any] = {}
    for px in sizes:
        out.update(_bench_size(px, ks, batch, repeats, budget, results if results is not None else {}))
        torch.cuda.empty_cache()
    return out


def _bench_size(px: int, ks, batch: int, repeats: int, budget: Budget | None, results: dict) -> dict:
    from online_aug.config import AugConfig
    from online_aug.experiments.timing import img2img_baseline, strength_batch, time_calls
    from online_aug.generator import SDEditGenerator
    from online_aug.generator.graphs import apply_speed_options
    from online_aug.generator.loading import SDComponents
    from online_aug.sdtrain.sd15 import sd15_components

    dev, dt = DEVICE, DTYPE
    out: dict[str, Any] = {}
    c = sd15_components(px)
    for k in ("unet", "vae", "text_encoder"):
        c[k] = c[k].to(dev, dt).requires_grad_(False)
    comps = SDComponents(vae=c["vae"], unet=c["unet"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                         scheduler=c["scheduler"])
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, px, px, generator=g).to(dev)
    strengths, targets = strength_batch(batch, 10)
    prompts = [f"a photo of a class {i}" for i in range(10)]
    for K in ks:
        for mode in ("eager", "graph"):
            if budget is not None and not budget.fits(30 if px >= 512 else 10, f"generator {px}px K={K} {mode}",
                                                      results):
                continue
            gen = SDEditGenerator(comps, prompts, steps=K, device=dev, dtype=dt)
            if mode == "graph":
                apply_speed_options(gen, AugConfig(cuda_graph="always", channels_last=False))
            out[f"{px}px_K{K}_{mode}"] = round(time_calls(
                lambda seed, gen=gen: gen.edit(images, strengths, targets, torch.Generator(dev).manual_seed(seed)),
                batch, repeats, dev)[0], 2)
    if budget is not None and not budget.fits(60 if px >= 512 else 20, f"diffusers img2img {px}px", results):
        return out
    ref = SDEditGenerator(comps, prompts, device=dev, dtype=dt)
    img2img = img2img_baseline(comps, ref, images, strengths, targets, guidance_scale=3.0)
    out[f"{px}px_diffusers_img2img_25"] = round(time_calls(img2img, batch, 1, dev)[0], 2)
    return out


def bench_lcm(models: dict[int, Path] | None = None, ks=(1, 2), batch: int = 32, repeats: int = 2,
              distill_steps: int = 2, budget: Budget | None = None, results: dict | None = None) -> dict:
    """Distil each ``px -> SD folder`` of ``models`` (default: SD 1.5's architecture at 512 and 256 px) for
    ``distill_steps`` steps, load the LCM-LoRA through ``aug.lora`` and time K = ``ks`` LCM steps without CFG."""
    from online_aug.config import AugConfig, load_config
    from online_aug.data import build_splits
    from online_aug.experiments.timing import strength_batch, time_calls
    from online_aug.generator import SDEditGenerator
    from online_aug.generator.graphs import apply_speed_options
    from online_aug.sdtrain.lcm_distill import DistillOptions, distill, student_aug
    from online_aug.sdtrain.sd15 import save_sd15

    if models is None:
        models = {px: WORK / f"sd15-{px}" for px in (512, 256)}
    results = results if results is not None else {}
    out: dict[str, Any] = {}
    dtype = "fp16" if DTYPE == torch.float16 else "fp32"
    for px, folder in models.items():
        if budget is not None and not budget.fits(90 if px >= 512 else 45, f"LCM {px}px", results):
            continue
        if not (Path(folder) / "unet").is_dir():
            save_sd15(folder, sample_size=px)
        cfg = load_config(ROOT / "configs/demo.yaml", [
            f"run.device={DEVICE.type}", f"aug.model={folder}", "aug.textual_inversion=", "aug.lora=",
            f"aug.dtype={dtype}", "aug.prompt=a photo of a class {name}"])
        splits = build_splits(cfg.data)
        lcm = WORK / f"lcm-{Path(folder).name}"
        t0 = time.perf_counter()
        m = distill(cfg, splits, lcm, DistillOptions(steps=distill_steps, batch_size=2, lora_rank=4,
                                                     mixed_precision="auto", show_progress=False), device=DEVICE)
        out[f"{px}px_distill_s_per_step"] = round((time.perf_counter() - t0) / distill_steps, 2)
        out[f"{px}px_distill_loss"] = m["final_loss_ema"]
        g = torch.Generator().manual_seed(0)
        images = torch.rand(batch, 3, px, px, generator=g).to(DEVICE)
        strengths, targets = strength_batch(batch, splits.num_classes)
        for K in ks:
            aug = student_aug(cfg.aug, lcm, K)
            gen = SDEditGenerator.from_config(aug, splits.class_names, DEVICE)
            for mode in ("eager", "graph") if DEVICE.type == "cuda" else ("eager",):
                if mode == "graph":
                    apply_speed_options(gen, AugConfig(cuda_graph="always", channels_last=False))
                ips, evals = time_calls(
                    lambda seed, gen=gen, x=images, s=strengths, y=targets: gen.edit(
                        x, s, y, torch.Generator(DEVICE).manual_seed(seed)),
                    batch, repeats, DEVICE, gen.unet if mode == "eager" else None)
                out[f"{px}px_lcm_K{K}_{mode}"] = round(ips, 2)
                if evals is not None:
                    out[f"{px}px_lcm_K{K}_unet_evals_per_image"] = evals
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return out


def bench_train(alphas=(0.1, 0.25), steps: int = 20, budget: Budget | None = None,
                results: dict | None = None, sample_size: int = 256, extra: tuple[str, ...] = ()) -> dict:
    """ResNet-50 at 224 px: plain vs online (prefetch, sync) with the 256 px K = 2 SD-1.5-architecture generator."""
    from online_aug.experiments.timing import bench_training
    from online_aug.sdtrain.sd15 import save_sd15

    folder = WORK / f"sd15-{sample_size}"
    if not (folder / "unet").is_dir():
        save_sd15(folder, sample_size=sample_size)
    res: dict[str, Any] = {}
    results = results if results is not None else {}
    for a in alphas:
        if budget is not None and not budget.fits(120, f"training alpha={a}", results):
            continue
        overrides = [f"run.device={DEVICE.type}", "model.name=resnet50", "data.image_size=224", "train.batch_size=64",
                     "train.precision=bf16", "train.guard_every=10", "train.log_every=10", f"aug.alpha={a}",
                     f"aug.model={folder}", f"aug.resolution={sample_size}", "aug.steps=2",
                     f"aug.dtype={'fp16' if DTYPE == torch.float16 else 'fp32'}",
                     "aug.textual_inversion=", "aug.lora=", "aug.filter_fraction=0", "aug.queue_depth=2",
                     f"run.out_dir={WORK / 'runs'}"]
        res[f"alpha_{a}"] = bench_training(str(ROOT / "configs/demo.yaml"), [*overrides, *extra], steps, DEVICE,
                                           rounds=1)
    return res


def overlap(train: dict, gen: dict, batch: int = 64) -> dict:
    """step_time(online, prefetch) / max(T_train, T_gen): 1 is perfect hiding; T_gen from the 256 px K=2 bench."""
    out = {}
    for key, r in train.items():
        a = float(key.split("_")[1])
        t_train = batch / r["plain"]["images_per_s"]
        t_step = batch / r["online_prefetch"]["images_per_s"]
        gen_ips = gen.get("256px_K2_graph") or gen.get("256px_K2_eager")
        t_gen = round(a * batch) / gen_ips if gen_ips else float("nan")
        out[key] = {"step_s": round(t_step, 4), "T_train_s": round(t_train, 4), "T_gen_s": round(t_gen, 4),
                    "efficiency": round(t_step / max(t_train, t_gen), 3),
                    "stall_fraction": round(r["online_prefetch"]["stall_fraction"], 3),
                    "online_vs_plain": round(r["ratio_prefetch_vs_plain"], 3)}
    return out


def failed_checks(results: dict) -> list[str]:
    """What the run asserts (the benchmark targets are reported, never asserted)."""
    out = []
    tr = (results.get("audit") or {}).get("trace")
    if tr is not None:
        if tr["cudaDeviceSynchronize"]:
            out.append(f"{tr['cudaDeviceSynchronize']} cudaDeviceSynchronize call(s) during training steps")
        if not tr["interleaved"]:
            out.append("the producer's and the trainer's kernels did not interleave")
    audit = (results.get("audit") or {}).get("sync_audit")
    if audit is not None and audit["ours_in_trainer_per_step"] > 0.5:  # the log interval's read is 1 per 10 steps
        out.append(f"{audit['ours_in_trainer_per_step']:.1f} syncs per step from online_aug in the trainer's thread "
                   f"(see by_site)")
    return out


# ---------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = [f"# GPU check — {results.get('device', '?')}", "",
             f"torch {results.get('torch')}, CUDA {results.get('cuda')}, {results.get('seconds', '?')} s", ""]
    t = results.get("tests")
    if t:
        lines += ["## pytest -m gpu", "", f"{t.get('tests', '?')} tests, {t.get('failures', '?')} failures, "
                  f"{t.get('errors', '?')} errors, {t.get('skipped', '?')} skipped"
                  + (f"; failed: {', '.join(t['failed'])}" if t.get("failed") else ""), ""]
    a = results.get("audit", {})
    if "sync_audit" in a:
        s = a["sync_audit"]
        lines += ["## Sync audit (20 steps) and trace", "", "| thread | syncs |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in s["by_thread"].items()] or ["| (none) | 0 |"]
        lines += ["", "| call site | syncs |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in s["by_site"].items()]
    if "trace" in a:
        tr = a["trace"]
        lines += ["", f"cudaDeviceSynchronize: {tr['cudaDeviceSynchronize']}; streams: {tr['streams']}; kernels "
                  f"overlapping on two streams for {tr['overlap_ms']} ms; stream switches: {tr['stream_switches']}; "
                  f"interleaved: {tr['interleaved']}", ""]
    sections = [("generator", "Generator, SD 1.5 architecture (random weights), batch 32, fp16", "images/s"),
                ("lcm", "Distilled LCM rows, SD 1.5 architecture (random weights, distilled 2 steps), no CFG", "value")]
    for key, title, unit in sections:
        rows = results.get(key)
        if rows:  # keys are "<px>px_<variant>"
            lines += [f"## {title}", "", f"| px | variant | {unit} |", "|---:|---|---:|"]
            for k, v in rows.items():
                px, _, rest = k.partition("_")
                lines.append(f"| {px.removesuffix('px')} | {rest} | {v} |")
            lines.append("")
    tr = results.get("training")
    if tr:
        lines += ["## Training, ResNet-50 224 px, batch 64, bf16", "",
                  "| alpha | variant | images/s | stall |", "|---:|---|---:|---:|"]
        for key, r in tr.items():
            for v in ("plain", "online_prefetch", "online_sync"):
                if v in r:
                    lines.append(f"| {key.split('_')[1]} | {v} | {r[v]['images_per_s']:.1f} | "
                                 f"{100 * r[v]['stall_fraction']:.1f} % |")
        lines.append("")
    ov = results.get("overlap")
    if ov:
        lines += ["| alpha | step s | T_train s | T_gen s | efficiency (target <= 1.1) | stall (<= 5 %) | online / "
                  "plain (>= 0.9 at 0.1) |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in ov.items():
            lines.append(f"| {key.split('_')[1]} | {r['step_s']} | {r['T_train_s']} | {r['T_gen_s']} | "
                         f"{r['efficiency']} | {100 * r['stall_fraction']:.1f} % | {r['online_vs_plain']} |")
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    if results.get("checks_failed"):
        lines += ["", "Checks failed: " + "; ".join(results["checks_failed"])]
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in results["errors"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "reports/gpu"))
    p.add_argument("--budget-s", type=float, default=540, help="stop starting sections after this many seconds")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIP_MESSAGE.format(torch=torch.__version__, cuda=torch.version.cuda))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(a.budget_s)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "errors": {}}

    def section(name: str, need_s: float, fn) -> None:
        if not budget.fits(need_s, name, results):
            return
        print(f"gpu-check: {name} ...", flush=True)
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' numbers
            results["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))

    if not a.skip_tests:
        section("tests", 200, lambda: run_gpu_tests(out, min(240, budget.left() - 200)))
    section("audit", 60, sync_audit_and_trace)
    if not a.skip_bench:
        section("generator", 90, lambda: bench_generator(budget=budget, results=results))
        section("training", 120, lambda: bench_train(budget=budget, results=results))
        section("lcm", 60, lambda: bench_lcm(budget=budget, results=results))
        if results.get("training") and results.get("generator"):
            results["overlap"] = overlap(results["training"], results["generator"])
    results["checks_failed"] = failed_checks(results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    failed = bool(results["errors"]) or bool((results.get("tests") or {}).get("returncode"))
    return 1 if failed or results["checks_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
