"""Run under the deepspeed launcher: build the project's Trainer for each ZeRO stage, train a few steps, and write
what this rank holds to ``<out>/rank<R>_stage<S>.json``. Used by tests/test_distributed.py.

    deepspeed --num_gpus 2 tests/dist_probe.py --out DIR --stages 3,2 section.key=value ...
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch.distributed as dist

from online_aug.config import load_config
from online_aug.trainer import Trainer


def _zero_numbers(engine, stage: int) -> dict[str, int]:
    params = list(engine.module.parameters())
    out = {"num_params": len(params)}
    if stage == 3:
        out["local_param_numel"] = sum(int(p.ds_tensor.numel()) for p in params)  # this rank's partition
        out["full_param_numel"] = sum(int(p.ds_numel) for p in params)
        out["materialised_param_numel"] = sum(int(p.data.numel()) for p in params)  # released outside a gather
        out["local_optim_numel"] = sum(int(t.numel()) for t in engine.optimizer.fp32_partitioned_groups_flat)
    else:
        out["full_param_numel"] = sum(int(p.numel()) for p in params)
        out["local_param_numel"] = out["full_param_numel"]  # ZeRO-1/2 replicate the parameters
        out["local_optim_numel"] = sum(int(t.numel()) for t in engine.optimizer.single_partition_of_fp32_groups)
        exp_avg = 0
        for t in engine.optimizer.single_partition_of_fp32_groups:
            state = engine.optimizer.optimizer.state.get(t, {})
            exp_avg += int(state["exp_avg"].numel()) if "exp_avg" in state else 0
        out["local_exp_avg_numel"] = exp_avg  # Adam moments live on the partition only
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="3,2")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = Path(args.out)
    for stage in [int(s) for s in args.stages.split(",")]:
        cfg = load_config(None, [*args.overrides, f"train.zero_stage={stage}", f"run.name=zero{stage}"])
        trainer = Trainer(cfg, show_progress=False)
        before = _zero_numbers(trainer.engine, stage)
        metrics = trainer.fit()
        after = _zero_numbers(trainer.engine, stage)
        record = {"rank": trainer.rank, "world": trainer.world, "env_rank": int(os.environ["RANK"]), "stage": stage,
                  "backend": dist.get_backend(), "run_dir": str(trainer.run_dir), "steps": cfg.train.steps,
                  "before": before, "after": after, "metrics": metrics,
                  "ds_stage": int(trainer.engine.zero_optimization_stage())}
        (out / f"rank{trainer.rank}_stage{stage}.json").write_text(json.dumps(record, indent=1))
        dist.barrier()
    dist.barrier()


if __name__ == "__main__":
    main()
