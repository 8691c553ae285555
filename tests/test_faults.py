"""Faults a long run survives (docs/faults.md), shown with real processes where it matters.

In-process: bad config keys; the producer's timeout and death (CUDA out of memory) at the Prefetcher level with fake
generators; the checkpoint protocol (marker, 'latest', pruning, a full disk) with a fake engine; signal handling;
the divergence guard's BatchNorm restore.

Subprocesses of train.py (``ONLINE_AUG_INJECT_FAULT`` picks the failure point; see online_aug/testing/faults.py):
- one chain against an uninterrupted reference run: SIGKILL between the files of a checkpoint → ``--resume latest``
  picks the previous complete one → SIGTERM from outside at a random moment → exit 75 within seconds with a complete
  checkpoint → resume and finish: summary.csv equals the reference bit for bit;
- a producer that hangs (aug.on_fault=stop): stopped within aug.timeout_s, checkpoint, exit 3, no hung process;
- NaN batches: skipped and counted, N in a row stop the run with finite weights;
- two ranks under the deepspeed launcher, SIGTERM to its process group: both ranks stop cleanly (slow).
"""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, VENV_BIN, free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_prefetch import FakeGenerator, _augmenter, _loader

from online_aug import checkpoint
from online_aug.config import ConfigError, load_config
from online_aug.faults import EXIT_FAULT, EXIT_STOPPED, DivergenceGuard, RunStopped, StopSignals
from online_aug.prefetch import Prefetcher, ProducerError, ProducerTimeout

CPU = torch.device("cpu")
TIMEOUT = 600
TINY = ["train.batch_size=32", "data.image_size=16", "model.name=test_resnet", "train.zero_stage=1",
        "train.log_every=1", "train.eval_every=8", "train.ckpt_every=4"]
CHAIN_STEPS = 24
TIMING = ("train/images_per_s",)  # wall-clock columns: never equal between two runs


@pytest.fixture(scope="module")
def env(clean_env: dict[str, str]) -> dict[str, str]:
    """One intra-op thread: the runs compare bit for bit among themselves, and a busy 2-core machine is not
    oversubscribed by spinning OpenMP threads."""
    return dict(clean_env, OMP_NUM_THREADS="1")


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("override, key", [
    ("aug.timeout_s=0", "aug.timeout_s"), ("aug.timeout_s=-5", "aug.timeout_s"),
    ("run.stop_signals=[SIGTERM,SIGFOO]", "run.stop_signals"), ("run.stop_signals=[SIGKILL]", "run.stop_signals"),
    ("aug.on_fault=retry", "aug.on_fault"), ("train.max_bad_steps=-1", "train.max_bad_steps"),
    ("train.max_loss=-1", "train.max_loss"),
])
def test_bad_fault_keys_are_one_line_errors_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- the producer (fake generators)


class HangingGenerator(FakeGenerator):
    """Never returns from its ``hang_at``-th call until ``release`` is set (a hung kernel, then a late wake-up)."""

    def __init__(self, hang_at: int):
        super().__init__()
        self.hang_at, self.release = hang_at, threading.Event()

    def edit(self, images, strengths, targets, generator=None):
        if self.calls + 1 == self.hang_at:
            self.release.wait()
        return super().edit(images, strengths, targets, generator)


class OOMGenerator(FakeGenerator):
    def edit(self, images, strengths, targets, generator=None):
        if self.calls >= 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().edit(images, strengths, targets, generator)


def _producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "online-aug-producer" and t.is_alive()]


def test_a_hung_producer_is_a_fault_within_the_timeout_and_leaves_no_thread() -> None:
    gen = HangingGenerator(hang_at=3)
    pre = Prefetcher(_loader(), _augmenter(gen), CPU, depth=1, timeout_s=0.5)
    try:
        t0 = time.perf_counter()
        with pytest.raises(ProducerTimeout, match="aug.timeout_s=0.5"):
            for _ in range(10):
                next(pre)
        assert 0.5 <= time.perf_counter() - t0 < 3
        t0 = time.perf_counter()
        pre.close()  # does not wait the 60 s a healthy producer gets
        assert time.perf_counter() - t0 < 2
    finally:
        gen.release.set()  # the generator comes back late: the producer must queue nothing and end
    deadline = time.time() + 5
    while _producers() and time.time() < deadline:
        time.sleep(0.05)
    assert not _producers()
    assert pre._queue.empty()


def test_on_fault_real_goes_on_with_real_batches_after_a_hang() -> None:
    gen = HangingGenerator(hang_at=3)
    pre = Prefetcher(_loader(), _augmenter(gen), CPU, depth=1, timeout_s=0.3, on_fault="real")
    try:
        batches = [next(pre) for _ in range(6)]
    finally:
        pre.close()
        gen.release.set()
    assert isinstance(pre.fault, ProducerTimeout)
    assert [b.stats.get("aug/producer_fault", 0.0) for b in batches[:2]] == [0.0, 0.0]  # edits made before it
    assert all(b.stats["aug/producer_fault"] == 1.0 and b.stats["aug/effective_alpha"] == 0.0 for b in batches[3:])
    steps = [b.micro_step for b in batches]
    assert len(set(steps)) == len(steps) and 2 not in steps  # step 2 went to the hung producer


@pytest.mark.parametrize("on_fault", ["stop", "real"])
def test_cuda_out_of_memory_in_the_producer(on_fault: str) -> None:
    pre = Prefetcher(_loader(), _augmenter(OOMGenerator()), CPU, depth=1, timeout_s=5, on_fault=on_fault)
    try:
        t0 = time.perf_counter()
        if on_fault == "stop":
            with pytest.raises(ProducerError, match="out of GPU memory") as info:
                for _ in range(5):
                    next(pre)
            assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
        else:
            batches = [next(pre) for _ in range(5)]
            assert batches[0].stats["aug/effective_alpha"] == 0.5 and batches[-1].stats["aug/producer_fault"] == 1
            assert "out of GPU memory" in str(pre.fault)
        assert time.perf_counter() - t0 < 3
    finally:
        pre.close()
    assert not pre._thread.is_alive()


# ---------------------------------------------------------------- the checkpoint protocol (fake engine)


class FakeEngine:
    """Writes DeepSpeed's two files per tag; ``fail_at`` (step) raises a full disk between them."""

    FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    def __init__(self, fail_at: int = -1):
        self.fail_at = fail_at
        self.checkpoint_engine = self

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        assert not save_latest  # 'latest' is ours to move
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(self.FILES):
            if i == 1 and client_state["step"] == self.fail_at:
                raise OSError(28, "No space left on device")
            torch.save({"step": client_state["step"]}, d / name)


def test_checkpoint_protocol_full_disk_kill_and_pruning(tmp_path: Path) -> None:
    run = tmp_path / "20250101-000000-exp"
    ckpt = run / "checkpoints"
    for step in (2, 4):
        checkpoint.save(FakeEngine(), run, step, {}, keep_last=2, rank=0)
    assert (ckpt / "latest").read_text() == "step00000004"
    assert checkpoint.complete_tags(ckpt) == ["step00000002", "step00000004"]

    with pytest.raises(RunStopped) as info:  # a full disk between the two files of step 6
        checkpoint.save(FakeEngine(fail_at=6), run, 6, {}, keep_last=2, rank=0)
    assert info.value.status == EXIT_FAULT and "step00000004" in str(info.value)
    assert not (ckpt / "step00000006").exists()  # the partial one is removed (its space freed)
    assert (ckpt / "latest").read_text() == "step00000004"

    # a process killed between the files of step 6: the folder stays, without the marker
    (ckpt / "step00000006").mkdir()
    torch.save({}, ckpt / "step00000006" / FakeEngine.FILES[0])
    for resume in ("latest", str(run), str(ckpt)):
        assert checkpoint.find_resume(resume, str(tmp_path), "exp") == (run, ckpt, "step00000004")
    note = checkpoint.resume_note(ckpt, "step00000004")
    assert "step00000004 (complete)" in note and "passing over step00000006: incomplete" in note
    with pytest.raises(ConfigError, match="incomplete"):
        checkpoint.find_resume(str(ckpt / "step00000006"), str(tmp_path), "exp")
    (ckpt / "latest").write_text("step00000006")  # even a 'latest' naming it (written by hand) is passed over
    assert checkpoint.pick_tag(ckpt) == "step00000004"

    # resumed from step 4, the next save rewrites step 6; keep_last=1 keeps only it
    checkpoint.save(FakeEngine(), run, 6, {}, keep_last=1, rank=0)
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000006"]
    assert checkpoint.pick_tag(ckpt) == "step00000006"


def test_a_run_whose_only_checkpoint_is_incomplete_is_not_resumable(tmp_path: Path) -> None:
    run = tmp_path / "20250101-000000-exp"
    (run / "checkpoints" / "step00000002").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoint.find_resume(str(run), str(tmp_path), "exp")
    with pytest.raises(ConfigError, match="complete checkpoint"):
        checkpoint.find_resume("latest", str(tmp_path), "exp")


# ---------------------------------------------------------------- signals, divergence guard (in process)


def test_a_stop_signal_is_recorded_and_a_quick_repeat_is_the_same_request() -> None:
    # whatever handler was there before (an in-process run that stopped keeps its own until the process exits)
    before = signal.getsignal(signal.SIGUSR1)
    sig = StopSignals(["SIGUSR1"])
    sig.install()
    try:
        assert signal.getsignal(signal.SIGUSR1) != before
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a launcher forwarding the same signal: no exit
        time.sleep(0.05)
        assert sig.received == "SIGUSR1"
    finally:
        sig.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_second_signal_exits_at_once() -> None:
    code = ("import os, signal, time; from online_aug.faults import StopSignals; s = StopSignals(['SIGTERM']); "
            "s.install(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(2.5); os.kill(os.getpid(), signal.SIGTERM);"
            " time.sleep(30)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "received SIGTERM again: exiting now" in proc.stderr


def test_divergence_guard_skips_and_restores_batchnorm() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2))
    net(torch.rand(2, 3, 8, 8))
    guard = DivergenceGuard(net, max_bad=2, max_loss=50.0, group=None)
    before = [b.clone() for b in net.buffers()]
    for n, (x, extra) in enumerate([(torch.full((2, 3, 8, 8), float("nan")), 0.0), (torch.rand(2, 3, 8, 8), 1e3)]):
        guard.before_forward()
        loss = net(x).pow(2).mean() + extra  # NaN, then finite but far above max_loss
        assert guard.check(loss)
        assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))  # BatchNorm statistics restored
        assert guard.in_a_row == n + 1
    assert guard.tripped and guard.skipped == 2
    guard.before_forward()
    assert not guard.check(net(torch.rand(2, 3, 8, 8)).pow(2).mean())
    assert guard.in_a_row == 0 and guard.skipped == 2 and not guard.tripped


# ---------------------------------------------------------------- train.py processes


def _cmd(*args: str) -> list[str]:
    # the random tiny SD draws no class: with the guard on, the audit would (rightly) turn every edit off, and the
    # producer faults under test would never happen
    return [sys.executable, str(REPO / "train.py"), "--config", "configs/baseline.yaml", "aug.guard=off",
            "aug.audit=false", *args]


def _run(cmd: list[str], env: dict[str, str], status: int = 0, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert proc.returncode == status, f"exit {proc.returncode} != {status}:\n{proc.stdout[-3000:]}\n" \
                                      f"{proc.stderr[-5000:]}"
    return proc


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "summary.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    out = tmp_path_factory.mktemp("reference")
    _run(_cmd(f"train.steps={CHAIN_STEPS}", *TINY, f"run.out_dir={out}"), env)
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> dict:
    """SIGKILL in the middle of checkpoint 8 → resume latest, SIGTERM at a random moment → resume and finish."""
    out = tmp_path_factory.mktemp("chain")
    args = [f"train.steps={CHAIN_STEPS}", *TINY, f"run.out_dir={out}"]
    killed = _run(_cmd(*args), dict(env, ONLINE_AUG_INJECT_FAULT="kill_in_save@8"), status=-signal.SIGKILL)
    (run_dir,) = out.iterdir()
    ckpt = run_dir / "checkpoints"
    after_kill = {"latest": (ckpt / "latest").read_text(), "dirs": sorted(p.name for p in ckpt.glob("step*")),
                  "complete": checkpoint.complete_tags(ckpt), "step8": sorted(p.name for p in (ckpt / "step00000008")
                                                                                  .iterdir())}

    proc = subprocess.Popen(_cmd("--resume", "latest", *args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ckpt / "step00000008" / checkpoint.MARKER, proc)  # this run is past its first checkpoint
        time.sleep(random.Random().uniform(0, 0.3))  # a random moment: whichever step is in flight
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        exit_s = time.perf_counter() - t0
    finally:
        proc.kill()
    stopped = {"status": proc.returncode, "stdout": stdout, "stderr": stderr, "exit_s": exit_s,
               "latest": (ckpt / "latest").read_text(), "complete": checkpoint.complete_tags(ckpt)}
    finished = _run([sys.executable, str(REPO / "train.py"), "--resume", str(run_dir)], env)
    return {"run_dir": run_dir, "killed": killed, "after_kill": after_kill, "stopped": stopped, "finished": finished}


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(chain: dict) -> None:
    k = chain["after_kill"]
    assert k["latest"] == "step00000004" and k["complete"] == ["step00000004"]
    assert "step00000008" in k["dirs"] and k["step8"] == ["mp_rank_00_model_states.pt"]  # killed between files


def test_resume_latest_picks_the_newest_complete_checkpoint_and_says_so(chain: dict) -> None:
    out = chain["stopped"]["stdout"]
    assert "resuming from" in out and "step00000004 (complete)" in out
    assert "passing over step00000008: incomplete" in out


def test_sigterm_exits_within_seconds_with_a_complete_checkpoint(chain: dict) -> None:
    s = chain["stopped"]
    assert s["status"] == EXIT_STOPPED, s["stderr"][-3000:]
    assert s["exit_s"] < 20, s["exit_s"]
    assert "received SIGTERM" in s["stderr"] and "stopped by SIGTERM" in s["stderr"]
    stop_step = int(s["latest"].removeprefix("step"))
    assert 8 <= stop_step < CHAIN_STEPS, "the signal did not land mid-run"
    assert s["complete"][-1] == s["latest"]
    assert f"stopped after step {stop_step} of {CHAIN_STEPS}" in s["stderr"] and "--resume" in s["stderr"]


def test_killed_and_stopped_then_resumed_equals_an_uninterrupted_run(chain: dict, reference: Path) -> None:
    got, want = _rows(chain["run_dir"]), _rows(reference)
    assert [r["step"] for r in want] == [str(s) for s in range(8, CHAIN_STEPS + 1, 8)]
    assert got == want  # train/loss, lr and every eval metric, bit for bit (6 significant digits in the CSV)
    acc = EventAccumulator(str(chain["run_dir"] / "tb"), size_guidance={"scalars": 0}).Reload()
    ref = EventAccumulator(str(reference / "tb"), size_guidance={"scalars": 0}).Reload()
    # every step's loss once (TensorBoard hides what the killed run logged after its last checkpoint)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(e.step, e.value) for e in
                                                                       ref.Scalars("train/loss")]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_sd import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


def test_a_hung_producer_stops_the_run_within_the_timeout_with_a_checkpoint(
        tmp_path: Path, tiny_sd: Path, env: dict[str, str]) -> None:
    out = tmp_path / "runs"
    env = dict(env, ONLINE_AUG_INJECT_FAULT="producer_hang@3")
    proc = _run(_cmd("run.name=hang", "train.steps=50", "train.batch_size=16", "data.image_size=16",
                     "model.name=test_resnet", "aug.alpha=0.5", f"aug.model={tiny_sd}", "aug.steps=2",
                     "aug.timeout_s=3", f"run.out_dir={out}"), env, status=EXIT_FAULT)
    ended = time.time()
    assert "producer hung" in proc.stderr and "aug.timeout_s=3" in proc.stderr and "aug.on_fault" in proc.stderr
    (run_dir,) = out.iterdir()
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text()
    assert checkpoint.complete_tags(ckpt) == [tag] and int(tag.removeprefix("step")) >= 3
    assert f"stopped after step {int(tag.removeprefix('step'))} of 50" in proc.stderr
    hung_at = float(re.search(r"hangs at micro-step 3 \(unix time ([\d.]+)\)", proc.stderr).group(1))
    assert ended - hung_at < 3 + 30  # timeout, the step in flight, the checkpoint, exit: the hung thread kept nothing


def test_nan_batches_are_skipped_counted_and_stop_the_run(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "runs"
    env = dict(env, ONLINE_AUG_INJECT_FAULT="nan_images@3,7,8,9")
    proc = _run(_cmd("run.name=nan", "train.steps=30", "train.max_bad_steps=3", *TINY, f"run.out_dir={out}"), env,
                status=EXIT_FAULT)
    assert "divergence guard: 3 micro-batches in a row" in proc.stderr
    assert "step 4: loss nan is not finite" in proc.stdout  # micro-step 3 is step 4, skipped, then training went on
    (run_dir,) = out.iterdir()
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000010"  # stopped after the third bad step in a row
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/skipped_steps")] == [(4, 1), (8, 2), (9, 3), (10, 4)]
    assert all(e.step not in (4, 8, 9, 10) for e in acc.Scalars("train/loss"))  # no loss logged for a skipped step
    state = torch.load(ckpt / "step00000010" / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point())


@pytest.mark.slow
def test_two_ranks_stop_cleanly_on_sigterm_to_the_launcher(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "runs"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "train.py",
           "--config", "configs/baseline.yaml", "train.steps=100000", "train.batch_size=16", "data.image_size=16",
           "model.name=test_resnet", "train.zero_stage=1", "train.log_every=1", "train.eval_every=100000",
           "train.ckpt_every=5", f"run.out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a scheduler's job step
    try:
        deadline = time.time() + TIMEOUT
        while not list(out.glob("*/checkpoints/step*/" + checkpoint.MARKER)):  # training, past a checkpoint
            assert proc.poll() is None and time.time() < deadline, "no first checkpoint"
            time.sleep(0.1)
        t0 = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher, its per-node launcher and both ranks
        log, _ = proc.communicate(timeout=120)  # every process holding the pipe has exited
        exit_s = time.perf_counter() - t0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert exit_s < 30, exit_s  # DeepSpeed's launcher SIGKILLs ranks 30 s after forwarding a signal
    assert log.count("stopped after step") == 2 and log.count("received SIGTERM: finishing") == 2, log[-4000:]
    assert "Traceback" not in log, log[-6000:]
    (run_dir,) = out.iterdir()
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text()
    assert checkpoint.complete_tags(ckpt)[-1] == tag
    shards = sorted(p.name for p in (ckpt / tag).glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]  # both ranks wrote
    stop_step = int(tag.removeprefix("step"))
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    assert max(e.step for e in acc.Scalars("train/loss")) == stop_step  # TensorBoard flushed up to the stop
