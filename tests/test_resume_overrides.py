"""``--resume RUN key=value``: an override the checkpoint cannot follow, or a step count the run is already past, is a
one-line config error (exit 2) that leaves every file of the run as it was; extending a run says that its learning-rate
schedule is re-planned; a run sized by ``train.epochs`` keeps ``train.steps`` as asked and records the derived count.

Training runs are ``train.py`` subprocesses with timm's tiny ``test_resnet`` at 16 px on the embedded digits (seconds
each); refusals and resumes of a finished run call ``train.main`` in this process (nothing is trained).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from online_aug.config import load_config
from online_aug.monitor import read_summary

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600
STEPS = 4
TINY = ["--config", "configs/baseline.yaml", "train.batch_size=32", "data.image_size=16", "model.name=test_resnet",
        "train.zero_stage=1", "train.log_every=2", "train.eval_every=4", "train.ckpt_every=2"]


def _train(args: list[str], env: dict[str, str], status: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == status, (f"train.py exited {proc.returncode}, expected {status}:\n{proc.stdout[-3000:]}\n"
                                       f"{proc.stderr[-5000:]}")
    return proc


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``train.main(args)`` in this process: (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    status = mod.main(args)
    out = capsys.readouterr()
    return status, out.out, out.err


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``config error:`` line of a refused ``train.main(args)`` (exit status 2, no traceback)."""
    status, out, err = _main(args, capsys)
    assert status == 2, f"exit {status}:\n{out[-3000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-5000:]
    lines = [ln for ln in err.splitlines() if "config error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("config error: "), err[-5000:]
    return lines[0]


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, clean_env: dict[str, str]) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("runs")
    _train([*TINY, f"train.steps={STEPS}", f"run.out_dir={out}"], clean_env)
    (run_dir,) = out.iterdir()
    assert _latest(run_dir) == "step00000004" and (run_dir / "checkpoints" / "step00000002").is_dir()
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run_dir.name
    shutil.copytree(run_dir, dst)
    return dst


# ---------------------------------------------------------------- overrides the checkpoint cannot follow


def test_another_architecture_is_refused_and_the_run_stays_resumable(finished: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(finished, tmp_path)
    before = _files(run)
    line = _refused(["--resume", str(run), "model.name=resnet18"], capsys)
    assert "model.name" in line and "resnet18" in line and "test_resnet" in line, line
    assert _files(run) == before  # config.yaml byte for byte, and nothing else written either
    # the run was not damaged: a plain resume still loads it (finished: it says so and exits 0)
    status, out, err = _main(["--resume", str(run)], capsys)
    assert status == 0 and f"the run is already complete at step {STEPS}" in out + err, out + err
    assert (run / "config.yaml").read_bytes() == before["config.yaml"]
    assert _latest(run) == "step00000004"


def test_another_data_split_is_refused(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(finished, tmp_path)
    before = _files(run)
    line = _refused(["--resume", str(run), "data.imbalance_ratio=10"], capsys)
    assert "data.imbalance_ratio" in line, line
    assert _files(run) == before


# ---------------------------------------------------------------- step counts


def test_fewer_steps_than_the_checkpoint_is_refused(finished: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(finished, tmp_path)
    before = _files(run)
    line = _refused(["--resume", str(run), "train.steps=2"], capsys)
    assert "train.steps=2" in line and f"already at step {STEPS}" in line, line
    assert _files(run) == before


def test_shortening_to_the_checkpoint_step_is_refused(finished: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Resuming the step-2 checkpoint of the 4-step run with train.steps=2 has nothing to train either: refused, and
    config.yaml keeps the 4 steps that the run's learning-rate schedule was planned for."""
    run = _copy(finished, tmp_path)
    before = _files(run)
    line = _refused(["--resume", str(run / "checkpoints" / "step00000002"), "train.steps=2"], capsys)
    assert "already at step 2" in line, line
    assert _files(run) == before


def test_extending_a_finished_run_says_the_schedule_is_replanned(finished: Path, tmp_path: Path,
                                                                 clean_env: dict[str, str]) -> None:
    run = _copy(finished, tmp_path)
    proc = _train(["--resume", str(run), "train.steps=6"], clean_env)
    out = proc.stdout + proc.stderr
    assert "train.steps 4 -> 6" in out and "re-planned" in out and "from the start" in out, out[-3000:]
    assert _latest(run) == "step00000006"
    assert int(read_summary(run)[-1]["step"]) == 6
    assert load_config(run / "config.yaml").train.steps == 6
    assert yaml.safe_load((run / "config.yaml").read_text())["resolved"]["train_steps"] == 6


# ---------------------------------------------------------------- train.epochs


def test_epochs_keep_the_asked_steps_and_record_the_derived_count(tmp_path: Path, clean_env: dict[str, str],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """train.epochs decides the length; config.yaml keeps train.steps as asked (here 300, baseline.yaml's) and
    records the derived count under resolved:, and a resume reads it from there (the run is complete)."""
    _train([*TINY, "train.epochs=1", f"run.out_dir={tmp_path}"], clean_env)
    (run,) = tmp_path.iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 300 and saved["train"]["epochs"] == 1
    n = saved["resolved"]["train_steps"]
    assert 1 < n < 300 and _latest(run) == f"step{n:08d}"
    before = _files(run)["config.yaml"]
    status, out, err = _main(["--resume", str(run)], capsys)
    assert status == 0 and f"the run is already complete at step {n}" in out + err, out + err
    assert (run / "config.yaml").read_bytes() == before
