"""Two CPU ranks under the real ``deepspeed`` launcher (gloo): ZeRO-3 shards parameters, ZeRO-2 shards optimizer
state, both ranks finish with the same evaluation, and ``deepspeed train.py`` works end to end."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, free_port

pytestmark = pytest.mark.slow

TIMEOUT = 600  # the first DeepSpeed process on a fresh machine compiles a small op (~1 min)
WORLD = 2
TINY = ["data.image_size=16", "model.name=test_resnet", "train.batch_size=16", "train.steps=3", "train.eval_every=3",
        "train.log_every=1", "data.imbalance_ratio=10", "train.eval_batch_size=64"]


def _launch(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(WORLD), "--master_port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory, clean_env: dict[str, str]) -> dict[int, dict[int, dict]]:
    out = tmp_path_factory.mktemp("probe")
    _launch("tests/dist_probe.py", ["--out", str(out), "--stages", "3,2", *TINY, f"run.out_dir={out / 'runs'}"],
            clean_env)
    records: dict[int, dict[int, dict]] = {}
    for stage in (3, 2):
        records[stage] = {}
        for rank in range(WORLD):
            path = out / f"rank{rank}_stage{stage}.json"
            assert path.is_file(), f"rank {rank} did not finish ZeRO-{stage}"
            records[stage][rank] = json.loads(path.read_text())
    return records


@pytest.mark.parametrize("stage", [3, 2])
def test_both_ranks_finish_with_the_same_evaluation(probe, stage: int) -> None:
    r0, r1 = probe[stage][0], probe[stage][1]
    for rank, r in ((0, r0), (1, r1)):
        assert r["rank"] == rank and r["env_rank"] == rank and r["world"] == WORLD
        assert r["backend"] == "gloo" and r["ds_stage"] == stage
    assert r0["run_dir"] == r1["run_dir"]  # rank 0 picked it, rank 1 learned it
    assert _same(r0["metrics"], r1["metrics"])
    assert 0.0 <= r0["metrics"]["top1"] <= 1.0 and "acc_few" in r0["metrics"]
    run_dir = Path(r0["run_dir"])
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000003"
    shards = sorted(p.name for p in (ckpt / "step00000003").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)]  # every rank saved
    rows = (run_dir / "summary.csv").read_text().splitlines()
    assert len(rows) == 2  # header + one evaluation, written by rank 0 only
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1


def test_zero3_partitions_parameters(probe) -> None:
    for when in ("before", "after"):
        local = [probe[3][r][when]["local_param_numel"] for r in range(WORLD)]
        full = probe[3][0][when]["full_param_numel"]
        assert full == probe[3][1][when]["full_param_numel"] > 100_000
        assert sum(local) >= full  # the partitions cover every parameter (the last may be padded)
        for n in local:
            assert abs(n - full / WORLD) <= 0.01 * full, (local, full)  # each rank holds about half
        for r in range(WORLD):
            assert probe[3][r][when]["materialised_param_numel"] == 0  # nothing gathered outside forward/backward
            assert abs(probe[3][r][when]["local_optim_numel"] - full / WORLD) <= 0.01 * full


def test_zero2_partitions_optimizer_state(probe) -> None:
    total = probe[2][0]["after"]["full_param_numel"]
    for r in range(WORLD):
        rec = probe[2][r]["after"]
        assert rec["local_param_numel"] == total  # parameters stay replicated under ZeRO-2
        assert abs(rec["local_optim_numel"] - total / WORLD) <= 0.01 * total
        assert rec["local_exp_avg_numel"] == rec["local_optim_numel"]  # Adam moments only for the partition
    assert sum(probe[2][r]["after"]["local_optim_numel"] for r in range(WORLD)) >= total


def test_zero3_checkpoint_consolidates(probe) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(probe[3][0]["run_dir"]) / "checkpoints"
    assert (ckpt / "zero_to_fp32.py").is_file()
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    # buffers are not parameters: BatchNorm statistics, and the classifier's persistent mean/std (its preprocessing)
    buffers = ("running_", "num_batches")
    params = sum(v.numel() for k, v in sd.items()
                 if not any(b in k for b in buffers) and k.rsplit(".", 1)[-1] not in ("mean", "std"))
    assert params == probe[3][0]["after"]["full_param_numel"]


def test_deepspeed_launcher_runs_train_py(tmp_path: Path, clean_env: dict[str, str]) -> None:
    out = tmp_path / "runs"
    proc = _launch("train.py", ["--config", "configs/baseline.yaml", *TINY, f"run.out_dir={out}"], clean_env)
    (run_dir,) = out.iterdir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert "final evaluation" in proc.stdout
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1  # only rank 0 writes TensorBoard
