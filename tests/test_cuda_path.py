"""The CUDA path's known failure modes, checked on CPU: DeepSpeed settings that would synchronise the device,
host-device syncs on the trainer's hot path (the sync lint), the fp16 VAE, SDXL-class UNets, non-finite edits, and
the producer thread's device."""

import json
import threading
import warnings

import pytest
import torch
from test_prefetch import FakeGenerator, _augmenter, _loader
from tiny_sd import save_tiny_sd

from online_aug import streams
from online_aug.batches import real_batch
from online_aug.config import AugConfig, ConfigError, load_config
from online_aug.distributed import deepspeed_config
from online_aug.faults import DivergenceGuard
from online_aug.losses import SoftTargetMixup
from online_aug.prefetch import Prefetcher
from online_aug.testing.sync import SyncLint

META = torch.device("meta")  # a non-CPU device on a CPU machine: every host-to-device copy is visible to the lint


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_has_nothing_that_synchronises_the_device(stage):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = deepspeed_config(load_config(None, [f"train.zero_stage={stage}"]), 1, "fp32")
    assert ds["timers"]["throughput"]["enabled"] is False and ds["wall_clock_breakdown"] is False
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed's own parser: a misspelt key is refused
    if stage in (1, 2):  # else a device-wide synchronize in every backward epilogue; explicit, whatever the default
        assert ds["zero_optimization"]["overlap_comm"] is False and zero.overlap_comm is False
    if stage == 3:
        assert zero.memory_efficient_linear is False  # else F.linear is replaced process-wide, the SD's too


def test_real_targets_and_mixup_lambda_are_made_on_the_device_without_a_sync():
    lint = SyncLint()
    with lint:
        b = real_batch(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), 0, 4, META)
        mix = SoftTargetMixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=4)
        for _ in range(4):  # mixup and cutmix both drawn
            mix(torch.rand(4, 3, 8, 8, device=META), torch.rand(4, 4, device=META))
    assert b.targets.device == META and b.targets.shape == (4, 4)
    assert lint.found == []
    before = SyncLint()
    with before:  # what the code did before (here from a test file, so filed under external)
        torch.nn.functional.one_hot(torch.tensor([0, 1]), 4).float().to(META)
        torch.as_tensor(0.3, device=META)
    assert [w for w, _ in before.external] == ["blocking host-to-device copy", "torch.as_tensor(..., device=)"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from online_aug.trainer import Trainer

    cfg = load_config(None, ["train.steps=3", "train.batch_size=16", "train.guard_every=5", "run.device=cpu",
                             f"run.out_dir={tmp_path_factory.mktemp('runs')}", "train.eval_every=1000",
                             "aug.alpha=0", "train.mixup_alpha=0.2", "data.image_size=16", "model.name=test_resnet"])
    tr = Trainer(cfg, show_progress=False)
    yield tr
    tr.source.close()


def test_sync_lint_a_training_micro_step_makes_no_host_sync(trainer):
    """Forward, soft-target CE, Mixup, backward and optimizer step: no sync from this package's code. (DeepSpeed's
    own .item() calls, here torch's CPU step counters, are kept apart in lint.external.)"""
    for _ in range(2):
        lint = SyncLint()
        with lint:
            assert trainer.train_step(next(trainer.source)) is not None
        assert lint.found == []
    trainer.guard.every = 1  # the exact guard reads every micro-batch's loss on the host: the lint sees it
    try:
        lint = SyncLint()
        with lint:
            trainer.train_step(next(trainer.source))
        assert [w for w, where in lint.found] == ["float()"] and lint.found[0][1].startswith("faults.py")
    finally:
        trainer.guard.every = 5


class _SyncingSource:
    """A batch source whose ``fault`` attribute makes a sync the way a library call does (a CUDA sync-debug warning
    raised below this package's frame)."""

    @property
    def fault(self):
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
        return None


def test_sync_lint_from_cuda_warnings_files_a_library_sync_under_our_calling_line(monkeypatch):
    """gpu-check's mode: torch's sync-debug warnings (faked here: no CUDA) are counted by thread and by the innermost
    frame of this package (faults.source_fault), while ``external`` names the library frame that made the sync."""
    from online_aug import faults

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    passed = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: passed.append(str(message)))
    with SyncLint(cuda=True) as lint:
        assert faults.source_fault(_SyncingSource()) is None
        t = threading.Thread(target=faults.source_fault, args=(_SyncingSource(),), name="producer")
        t.start()
        t.join()
    assert modes == ["warn", "default"] and set(passed) == {"an unrelated warning"}  # other warnings pass through
    assert lint.found == [] and [where.split(":")[0] for _, where in lint.external] == ["test_cuda_path.py"] * 2
    (site,) = lint.by_site
    assert site.startswith("faults.py:") and site.endswith(" source_fault") and lint.by_site[site] == 2
    assert dict(lint.by_thread) == {"MainThread": 1, "producer": 1} and lint.ours_in_main == 1


def test_interval_guard_counts_on_the_device_and_reads_once_per_poll():
    net = torch.nn.Linear(2, 1)
    guard = DivergenceGuard(net, max_bad=3, max_loss=10.0, group=None, every=4)
    lint = SyncLint()
    with lint:
        for v in (1.0, float("nan"), 50.0, 2.0):
            guard.observe(torch.tensor(v))
    assert lint.found == []
    assert guard.poll() and guard.skipped == 2 and guard.last_bad == 50.0
    guard.observe(torch.tensor(1.0))
    assert not guard.poll()


def test_train_guard_every_is_validated():
    with pytest.raises(ConfigError, match="train.guard_every"):
        load_config(None, ["train.guard_every=-1"])


def test_fp16_vae_with_force_upcast_is_loaded_in_a_wider_dtype(tmp_path):
    from online_aug.generator import load_sd

    folder = save_tiny_sd(tmp_path / "sd")
    comps = load_sd(str(folder), torch.device("cpu"), torch.float16)
    assert comps.vae.config.force_upcast and comps.vae.dtype == torch.float32  # bf16 where CUDA has it
    assert comps.unet.dtype == torch.float16
    cfg = folder / "vae" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "force_upcast": False}))
    assert load_sd(str(folder), torch.device("cpu"), torch.float16).vae.dtype == torch.float16


def test_sdxl_class_unet_is_refused_at_config_time_and_at_load(tmp_path):
    from online_aug.generator import load_sd
    from online_aug.generator.preflight import check_generator_inputs

    folder = save_tiny_sd(tmp_path / "sd")
    cfg = folder / "unet" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "addition_embed_type": "text_time"}))
    aug = AugConfig(alpha=0.5, model=str(folder))
    with pytest.raises(ConfigError, match=r"SDXL-class UNet \(addition_embed_type='text_time'\).*1.x/2.x") as info:
        check_generator_inputs(aug, 10)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="added_cond_kwargs"):
        load_sd(str(folder), torch.device("cpu"), torch.float32)


def test_a_high_share_of_nonfinite_edits_is_said_once_on_stderr(capsys):
    aug = _augmenter(FakeGenerator(nonfinite_first=True), alpha=1.0)  # 1 of 8 edits non-finite: 12.5 %
    x, y = next(iter(_loader()))
    for step in range(16):
        aug(x, y, step)
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "8 of the last 64 edits (12%) were not finite" in err
    assert "aug.dtype=bf16" in err
    quiet = _augmenter(FakeGenerator(), alpha=1.0)
    for step in range(16):
        quiet(x, y, step)
    assert "WARNING" not in capsys.readouterr().err


def test_the_producer_thread_selects_the_device_first(monkeypatch):
    calls = []
    monkeypatch.setattr(streams, "set_device", lambda d: calls.append((threading.current_thread().name, d)))
    pre = Prefetcher(_loader(), _augmenter(FakeGenerator()), torch.device("cpu"), depth=1)
    try:
        next(pre)
    finally:
        pre.close()
    assert calls == [("online-aug-producer", torch.device("cpu"))]


def test_speed_keys_validate_and_fall_back_to_eager_on_cpu(tmp_path, capsys):
    from online_aug.generator import SDEditGenerator, load_sd
    from online_aug.generator.graphs import apply_speed_options

    with pytest.raises(ConfigError, match="aug.cuda_graph"):
        load_config(None, ["aug.cuda_graph=maybe"])
    cfg = load_config(None, ["aug.cuda_graph=always", "aug.compile=true", "aug.channels_last=true"]).aug
    comps = load_sd(str(save_tiny_sd(tmp_path / "sd")), torch.device("cpu"), torch.float32)
    gen = SDEditGenerator(comps, [f"digit {i}" for i in range(10)])
    before = gen.edit(torch.rand(2, 3, 32, 32), torch.tensor([0.5, 0.9]), torch.tensor([1, 2]),
                      torch.Generator().manual_seed(0))[0]
    notes = apply_speed_options(gen, cfg)
    err = capsys.readouterr().err
    assert "aug.compile: eager UNet (no CUDA device" in err
    assert gen.graph_loop is None and not isinstance(gen.unet, torch._dynamo.eval_frame.OptimizedModule)
    cfg.compile = False
    notes = apply_speed_options(gen, cfg)
    assert "aug.cuda_graph=always: eager denoising loop (no CUDA device" in capsys.readouterr().err
    assert any("eager" in n for n in notes)
    after = gen.edit(torch.rand(2, 3, 32, 32), torch.tensor([0.5, 0.9]), torch.tensor([1, 2]),
                     torch.Generator().manual_seed(0))[0]
    assert before.shape == after.shape
    cfg.cuda_graph = "auto"  # the default says nothing where it cannot apply
    apply_speed_options(gen, cfg)
    assert capsys.readouterr().err == ""


def test_interval_guard_stops_without_saving_weights_a_bad_loss_reached(tmp_path):
    from online_aug import faults
    from online_aug.testing.faults import NanSource
    from online_aug.trainer import Trainer

    cfg = load_config(None, ["train.steps=4", "train.batch_size=16", "train.guard_every=2", "run.device=cpu",
                             f"run.out_dir={tmp_path}", "train.eval_every=1000", "train.ckpt_every=2",
                             "aug.alpha=0", "data.image_size=16", "model.name=test_resnet"])
    tr = Trainer(cfg, show_progress=False)
    tr.source = NanSource(tr.source, {2})  # micro-step 2 is step 3: after the step-2 checkpoint
    with pytest.raises(faults.RunStopped) as info:
        tr.fit()
    assert info.value.status == faults.EXIT_FAULT
    assert "without a checkpoint" in str(info.value) and "train.guard_every=2" in tr.control.reason
    saved = sorted(p.name for p in (tr.run_dir / "checkpoints").iterdir() if p.name.startswith("step"))
    assert saved == ["step00000002"]  # the good one; step 4's weights had trained on the NaN batch


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: 'capture' records the call on the static buffers, replay re-runs it
    into the captured output, as a real graph replays its kernels on the same addresses."""

    capturing = None

    def __init__(self):
        self.call = None

    def replay(self):
        fn, args, out = self.call
        out.copy_(fn(*args))


def _fake_cuda(monkeypatch, fail=False):
    import contextlib

    class Stream:
        def __init__(self, *a, **k): ...

        def wait_stream(self, other): ...

    @contextlib.contextmanager
    def graph(g, pool=None, capture_error_mode=None):
        assert capture_error_mode == "thread_local"
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        _FakeGraph.capturing = g
        yield
        _FakeGraph.capturing = None

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())


def _graphed(gen):
    from online_aug.generator.graphs import GraphedLoop

    eager = gen._denoise

    def recording(*args):
        out = eager(*args)
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.call = (eager, args, out)
        return out

    gen._denoise = recording
    gen.graph_loop = GraphedLoop(gen)
    return gen


def _tiny_cpu_gen(tmp_path):
    from online_aug.generator import SDEditGenerator, load_sd

    comps = load_sd(str(save_tiny_sd(tmp_path / "sd")), torch.device("cpu"), torch.float32)
    return SDEditGenerator(comps, [f"digit {i}" for i in range(10)])


def _cpu_edit(gen, seed, m=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(m, 3, 32, 32, generator=g)
    s = torch.rand(m, generator=g) * 0.8 + 0.1  # new strengths each call: the timestep tables change
    return gen.edit(x, s, torch.randint(10, (m,), generator=g), torch.Generator().manual_seed(seed))[0]


def test_graph_replay_copies_every_input_into_the_static_buffers(tmp_path, monkeypatch):
    """The capture/replay plumbing of aug.cuda_graph on CPU: replays with new images, strengths and targets equal the
    eager loop, one graph per shape."""
    _fake_cuda(monkeypatch)
    gen = _tiny_cpu_gen(tmp_path)
    want = [_cpu_edit(gen, seed) for seed in range(3)] + [_cpu_edit(gen, 9, m=2)]
    _graphed(gen)
    got = [_cpu_edit(gen, seed) for seed in range(3)] + [_cpu_edit(gen, 9, m=2)]
    for a, b in zip(want, got, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert len(gen.graph_loop.graphs) == 2 and gen.graph_loop.replays == 4


def test_a_failed_capture_falls_back_to_the_eager_loop_and_says_so(tmp_path, monkeypatch, capsys):
    _fake_cuda(monkeypatch, fail=True)
    gen = _tiny_cpu_gen(tmp_path)
    want = _cpu_edit(gen, 0)
    _graphed(gen)
    assert torch.allclose(_cpu_edit(gen, 0), want, atol=1e-6) and torch.allclose(_cpu_edit(gen, 0), want, atol=1e-6)
    err = capsys.readouterr().err
    assert err.count("aug.cuda_graph: capture failed") == 1 and "eager loop instead" in err
    assert gen.graph_loop.replays == 0 and len(gen.graph_loop.failed) == 1
