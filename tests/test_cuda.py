"""The CUDA path: generator in fp16 on a side stream, event hand-off through the ring buffers. Skipped on CPU."""

import pytest
import torch

# pytest -m gpu (make gpu-check) selects these
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_prefetcher_on_side_stream_matches_synchronous_path():
    from test_prefetch import FakeGenerator, _augmenter, _loader

    from online_aug.prefetch import Prefetcher
    from online_aug.sources import SyncAugmentedSource

    dev = torch.device("cuda")

    class CudaFake(FakeGenerator):
        def edit(self, images, strengths, targets, generator=None):
            out, finite = super().edit(images.cpu(), strengths, targets, torch.Generator().manual_seed(0))
            return out.to(images.device), finite.to(images.device)

    def aug():
        a = _augmenter(CudaFake())
        a.device = dev
        return a

    sync = SyncAugmentedSource(_loader(), aug(), dev, start=0)
    pre = Prefetcher(_loader(), aug(), dev, depth=2, starvation="wait")
    try:
        for _ in range(8):
            a, b = next(sync), next(pre)
            assert b.ready is not None and b.images.device.type == "cuda"
            torch.cuda.current_stream().wait_event(b.ready)
            assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
            pre.release(b)
    finally:
        pre.close()


def test_generator_fp16_edit_on_cuda(tmp_path):
    from tiny_sd import save_tiny_sd

    from online_aug.generator import SDEditGenerator, load_sd

    dev = torch.device("cuda")
    comps = load_sd(str(save_tiny_sd(tmp_path / "sd")), dev, torch.float16)
    gen = SDEditGenerator(comps, [f"a photo of the digit {i}" for i in range(10)], device=dev, dtype=torch.float16)
    x = torch.rand(8, 3, 32, 32, device=dev)
    out, finite = gen.edit(x, torch.full((8,), 0.7), torch.arange(8, device=dev) % 10,
                           torch.Generator(dev).manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and finite.all()


# ---------------------------------------------------------------- the CUDA path under load (make gpu-check)

SLEEP = 2_000_000  # GPU cycles (~1 ms): kernels long enough that a missing wait would read unfinished data


def _ring_augment(dev, num_classes=4):
    from online_aug.batches import Batch

    def augment(images, labels, step):
        torch.cuda._sleep(SLEEP)  # the write lands late on the producer's stream
        x = torch.full((len(labels), 3, 64, 64), float(step), device=dev)
        y = torch.full((len(labels), num_classes), float(step), device=dev)
        return Batch(images=x, targets=y, labels=labels, micro_step=step, stats={})

    return augment


@pytest.mark.parametrize("depth", [1, 2])
def test_ring_stress_every_element_is_the_step_it_claims(depth):
    """A fake producer writes the step number after a GPU sleep; the consumer, slower or faster in turn, checks every
    element on its own stream. A missing wait_event (ready or released) shows as a wrong element."""
    from test_prefetch import _loader

    from online_aug.prefetch import Prefetcher

    dev = torch.device("cuda")
    pre = Prefetcher(_loader(), _ring_augment(dev), dev, depth=depth, num_classes=4)
    wrong = torch.zeros((), dtype=torch.long, device=dev)
    try:
        for i in range(60):
            b = next(pre)
            torch.cuda._sleep(SLEEP * (3 if i % 3 == 0 else 0) + 1000)  # the trainer's work before reading
            wrong += (b.images != b.micro_step).sum() + (b.targets != b.micro_step).sum()
            pre.release(b)
        held = next(pre)
        with pytest.raises(RuntimeError, match="not released"):
            next(pre)
        pre.release(held)
    finally:
        pre.close()
    assert int(wrong) == 0


def test_gen_ms_does_not_count_the_wait_for_a_slot():
    from test_prefetch import _loader

    from online_aug.prefetch import Prefetcher

    dev = torch.device("cuda")
    pre = Prefetcher(_loader(), _ring_augment(dev), dev, depth=1, num_classes=4)
    gen, step_ms = [], []
    try:
        for _ in range(12):
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            b = next(pre)
            t0.record()
            torch.cuda._sleep(SLEEP * 8)  # a trainer 8x slower than the producer holds every slot long
            t1.record()
            pre.release(b)
            t1.synchronize()
            gen.append(b.stats["aug/gen_ms"])
            step_ms.append(t0.elapsed_time(t1))
    finally:
        pre.close()
    assert sorted(gen)[len(gen) // 2] < 0.5 * sorted(step_ms)[len(step_ms) // 2], (gen, step_ms)


def _tiny_gen(tmp_path, dtype, **kw):
    from tiny_sd import save_tiny_sd

    from online_aug.generator import SDEditGenerator, load_sd

    dev = torch.device("cuda")
    folder = tmp_path / "sd"
    if not folder.exists():
        save_tiny_sd(folder)
    comps = load_sd(str(folder), dev, dtype)
    return SDEditGenerator(comps, [f"a photo of the digit {i}" for i in range(10)], device=dev, dtype=dtype, **kw)


def _edit(gen, seed=0, m=8):
    dev = gen.device
    g = torch.Generator(dev).manual_seed(seed)
    x = torch.rand(m, 3, 32, 32, device=dev, generator=g)
    s = torch.tensor([0.5, 0.7, 0.9, 0.6] * (m // 4))
    return gen.edit(x, s, torch.arange(m, device=dev) % 10, torch.Generator(dev).manual_seed(seed + 1))


def test_fp16_edits_match_fp32_within_tolerance(tmp_path):
    out16, fin16 = _edit(_tiny_gen(tmp_path, torch.float16))
    out32, fin32 = _edit(_tiny_gen(tmp_path, torch.float32))
    assert fin16.all() and fin32.all()
    err = (out16 - out32).abs()
    assert err.mean() < 0.02 and err.max() < 0.25, (float(err.mean()), float(err.max()))


def test_cuda_graph_replay_equals_the_eager_loop(tmp_path):
    from online_aug.config import AugConfig
    from online_aug.generator.graphs import apply_speed_options

    eager = _tiny_gen(tmp_path, torch.float16)
    graphed = _tiny_gen(tmp_path, torch.float16)
    notes = apply_speed_options(graphed, AugConfig(cuda_graph="always"))
    assert graphed.graph_loop is not None, notes
    for seed in (0, 1, 2):  # the first call captures, the next ones replay with new inputs
        a, _ = _edit(eager, seed)
        b, _ = _edit(graphed, seed)
        assert (a - b).abs().max() < 1e-2
    assert len(graphed.graph_loop.graphs) == 1 and graphed.graph_loop.replays == 3 and not graphed.graph_loop.failed


def test_prefetch_on_fp16_generator_equals_synchronous_path(tmp_path):
    from test_prefetch import _loader

    from online_aug.augment import Augmenter
    from online_aug.config import AugConfig
    from online_aug.policy import AugPolicy
    from online_aug.prefetch import Prefetcher
    from online_aug.sources import SyncAugmentedSource

    dev = torch.device("cuda")

    def aug():  # a generator each: the two paths run at the same time in two threads
        cfg = AugConfig(alpha=0.5, strengths=[0.5, 0.9], target_mode="inter")
        gen = _tiny_gen(tmp_path, torch.float16)
        return Augmenter(AugPolicy(cfg, 4, [16] * 4), gen, dev, seed=7, rank=0, class_names=list("abcd"))

    sync = SyncAugmentedSource(_loader(), aug(), dev, start=0)
    pre = Prefetcher(_loader(), aug(), dev, depth=2)
    try:
        for _ in range(6):
            a, b = next(sync), next(pre)
            assert (a.images - b.images).abs().max() < 1e-3 and torch.equal(a.targets, b.targets)
            pre.release(b)
    finally:
        pre.close()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_twenty_steps_with_zero3_and_online_augmentation(precision, tmp_path, clean_env):
    import subprocess
    import sys
    from pathlib import Path

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "train.py"), "--config", "configs/demo.yaml", "run.device=cuda",
           "train.zero_stage=3", f"train.precision={precision}", "train.steps=20", "train.eval_every=20",
           "train.log_every=5", "aug.alpha=0.25", f"run.out_dir={tmp_path}", "run.name=gpu"]
    proc = subprocess.run(cmd, cwd=repo, env=clean_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final evaluation" in proc.stdout
