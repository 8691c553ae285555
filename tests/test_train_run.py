"""End-to-end: ``python train.py`` writes a complete run directory, and ``--resume`` continues it.

Each run is a subprocess with the venv's python and no RANK/WORLD_SIZE/... variables, so DeepSpeed's process
group starts clean. The classifier is timm's tiny ``test_resnet`` at 16 px, so a run takes seconds on a CPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from online_aug.checkpoint import find_resume
from online_aug.config import ConfigError, load_config
from online_aug.monitor import read_summary

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # the first DeepSpeed process on a fresh machine compiles a small op (~1 min)
LR = 2e-3  # train.lr default
WARMUP = 20  # train.warmup_steps default: every step here is in the linear warm-up, lr = LR * (step + 1) / 20
# ZeRO-1 so the checkpoint is a ZeRO checkpoint (DeepSpeed writes zero_to_fp32.py only for stages >= 1)
OVERRIDES = ["train.eval_every=3", "train.log_every=2", "train.batch_size=32", "data.image_size=16",
             "model.name=test_resnet", "train.zero_stage=1"]


def _train(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in an events file or folder, read with tensorboard's own reader."""
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, clean_env: dict[str, str]) -> Path:
    out = tmp_path_factory.mktemp("runs")
    _train(["--config", "configs/baseline.yaml", "train.steps=6", *OVERRIDES, f"run.out_dir={out}"], clean_env)
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def resumed_run(first_run: Path, tmp_path_factory: pytest.TempPathFactory, clean_env: dict[str, str]) -> Path:
    """A copy of the first run (so the first run stays as it was), resumed by path to 9 steps."""
    run_dir = tmp_path_factory.mktemp("resume") / first_run.name
    shutil.copytree(first_run, run_dir)
    _train(["--resume", str(run_dir), "train.steps=9"], clean_env)
    return run_dir


# ---------------------------------------------------------------- the first run


def test_run_dir_layout(first_run: Path) -> None:
    assert first_run.name.endswith("-baseline")
    for name in ("config.yaml", "summary.csv", "tb", "checkpoints"):
        assert (first_run / name).exists(), name
    cfg = load_config(first_run / "config.yaml")  # the resolved config, loadable as it is
    assert cfg.train.steps == 6 and cfg.data.image_size == 16 and cfg.data.imbalance_ratio == 100
    assert cfg.run.name == "baseline" and cfg.model.name == "test_resnet"


def test_checkpoint_is_deepspeeds(first_run: Path) -> None:
    ckpt = first_run / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert tag == "step00000006"
    assert (ckpt / tag / "mp_rank_00_model_states.pt").is_file()
    assert list((ckpt / tag).glob("*optim_states.pt"))
    assert (ckpt / "zero_to_fp32.py").is_file()
    # DeepSpeed's own consolidation gives back the whole classifier
    import timm
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    ref = timm.create_model("test_resnet", num_classes=10).state_dict()
    params = {k.removeprefix("net."): v for k, v in sd.items()}
    assert {k for k in ref if "running" not in k and "num_batches" not in k} <= set(params)
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_summary_csv(first_run: Path) -> None:
    rows = read_summary(first_run)
    assert [int(r["step"]) for r in rows] == [3, 6]
    for r in rows:
        for k in ("eval_top1", "eval_balanced_acc", "eval_acc_many", "eval_acc_few"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r[k])
    assert float(rows[-1]["train/loss"]) > 0


def test_tensorboard_scalars(first_run: Path) -> None:
    s = _scalars(first_run / "tb")
    for tag in ("train/loss", "train/lr", "train/images_per_s", "eval/top1", "eval/balanced_acc", "eval/acc_few",
                "eval/acc_many", "eval/acc_medium", "eval/class_acc/zero", "eval/class_acc/nine"):
        assert tag in s, f"{tag} missing; have {sorted(s)}"
    assert [step for step, _ in s["train/loss"]] == [2, 4, 6]
    assert [step for step, _ in s["eval/top1"]] == [3, 6]
    assert all(v > 0 for _, v in s["train/loss"])
    assert dict(s["train/lr"])[2] == pytest.approx(LR * 3 / WARMUP)
    # TensorBoard and summary.csv report the same evaluation
    assert dict(s["eval/top1"])[6] == pytest.approx(float(read_summary(first_run)[-1]["eval_top1"]), abs=1e-5)
    top1 = dict(s["eval/top1"])[6]
    assert 0.0 <= top1 <= 1.0


# ---------------------------------------------------------------- resume


def test_resume_by_path_continues_from_the_checkpoint(first_run: Path, resumed_run: Path) -> None:
    before = {p.name for p in (first_run / "tb").iterdir()}
    new_events = [p for p in (resumed_run / "tb").iterdir() if p.name not in before]
    assert len(new_events) == 1
    s = _scalars(new_events[0])
    loss_steps = [step for step, _ in s["train/loss"]]
    assert loss_steps == [8, 9]  # continued from step 6, not from 0
    # the LR schedule was restored too: step 8 is warm-up step 9 of 20
    assert dict(s["train/lr"])[8] == pytest.approx(LR * 9 / WARMUP)
    assert [step for step, _ in s["eval/top1"]] == [9]
    rows = read_summary(resumed_run)
    assert [int(r["step"]) for r in rows] == [3, 6, 9]  # appended to the run's summary
    ckpt = resumed_run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000009"
    assert (ckpt / "step00000009").is_dir() and (ckpt / "step00000006").is_dir()  # keep_last=2
    assert load_config(resumed_run / "config.yaml").train.steps == 9


def test_resume_latest_picks_the_newest_run_with_that_name(resumed_run: Path, clean_env: dict[str, str]) -> None:
    out = resumed_run.parent
    # decoys: an older run with the same name, and a newer run with another name (neither loads)
    for decoy in ("20000101-000000-baseline", "29991231-235959-other"):
        (out / decoy / "checkpoints").mkdir(parents=True)
        (out / decoy / "checkpoints" / "latest").write_text("step00000001")
    (out / "29991231-235959-nockpt-baseline").mkdir()  # newer, same name, but no checkpoint
    _train(["--config", "configs/baseline.yaml", "--resume", "latest", "train.steps=10", *OVERRIDES,
            "train.log_every=1", f"run.out_dir={out}"], clean_env)
    assert (resumed_run / "checkpoints" / "latest").read_text().strip() == "step00000010"
    s = _scalars(resumed_run / "tb")
    assert max(step for step, _ in s["train/loss"]) == 10
    assert dict(s["train/loss"]).keys() >= {2, 4, 6, 8, 9, 10}
    assert not (out / "20000101-000000-baseline" / "summary.csv").exists()


def test_find_resume_forms(tmp_path: Path) -> None:
    run = tmp_path / "20250101-000000-exp"
    (run / "checkpoints" / "step00000004").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000004")
    assert find_resume(str(run), str(tmp_path), "exp") == (run, run / "checkpoints", None)
    assert find_resume(str(run / "checkpoints"), str(tmp_path), "exp") == (run, run / "checkpoints", None)
    tag = run / "checkpoints" / "step00000004"
    assert find_resume(str(tag), str(tmp_path), "exp") == (run, run / "checkpoints", "step00000004")
    assert find_resume("latest", str(tmp_path), "exp")[0] == run
    with pytest.raises(ConfigError, match="other"):
        find_resume("latest", str(tmp_path), "other")
    with pytest.raises(ConfigError, match="nowhere"):
        find_resume(str(tmp_path / "nowhere"), str(tmp_path), "exp")
