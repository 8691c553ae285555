"""Run directories and DeepSpeed checkpoints.

Layout: ``<out_dir>/<YYYYmmdd-HHMMSS>-<name>/`` with ``config.yaml``, ``tb/``, ``checkpoints/`` and ``summary.csv``.
Checkpoints are DeepSpeed's own (``engine.save_checkpoint``, called on every rank), so DeepSpeed's tools work on
them, e.g. the ``zero_to_fp32.py`` DeepSpeed writes next to them (ZeRO stages 1-3; stage 0 saves the whole model
in ``mp_rank_00_model_states.pt``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError

CKPT = "checkpoints"
BEST = "best"  # train.select=val: the tag holding the best-on-val weights (never 'latest', never pruned)


def new_run_dir(out_dir: str, name: str, rank: int) -> Path:
    """Rank 0 picks ``<date-time>-<name>`` and every rank learns it."""
    path = [None]
    if rank == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = Path(out_dir) / f"{stamp}-{name}"
        i = 1
        while run.exists():  # two runs started in the same second
            run = Path(out_dir) / f"{stamp}-{name}-{i}"
            i += 1
        run.mkdir(parents=True)
        path = [str(run)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def find_resume(resume: str, out_dir: str, name: str) -> tuple[Path, Path, str | None]:
    """Resolve ``--resume latest|PATH`` to (run_dir, checkpoint_dir, tag or None for DeepSpeed's 'latest').

    ``latest`` is the newest run directory named ``*-<name>`` under ``out_dir`` that holds a checkpoint. PATH may be
    a run directory, its ``checkpoints/`` folder, or one checkpoint tag folder inside it.
    """
    if resume == "latest":
        runs = sorted(p for p in Path(out_dir).glob(f"*-{name}") if (p / CKPT / "latest").is_file())
        if not runs:
            raise ConfigError(f"--resume latest: no run named '*-{name}' with a checkpoint under {out_dir!r}")
        return runs[-1], runs[-1] / CKPT, None
    p = Path(resume)
    if (p / CKPT / "latest").is_file():
        return p, p / CKPT, None
    if (p / "latest").is_file():
        return p.parent, p, None
    if p.is_dir() and (p.parent / "latest").is_file():
        return p.parent.parent, p.parent, p.name
    raise ConfigError(f"--resume {resume!r}: not a run directory, checkpoints folder or checkpoint tag "
                      f"(no 'latest' file found)")


def save(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], keep_last: int, rank: int) -> None:
    """Every rank writes its shard; rank 0 then prunes all but the last ``keep_last`` tags."""
    ckpt = run_dir / CKPT
    client_state = dict(client_state, step=step, torch_rng=torch.get_rng_state())
    engine.save_checkpoint(str(ckpt), tag=f"step{step:08d}", client_state=client_state)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and keep_last > 0:
        tags = sorted(p for p in ckpt.glob("step*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def save_best(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], rank: int) -> None:
    """Every rank writes the ``best`` tag (``train.select=val``); 'latest' keeps pointing at the newest step."""
    ckpt = run_dir / CKPT
    engine.save_checkpoint(str(ckpt), tag=BEST, client_state=dict(client_state, step=step), save_latest=False)
    if dist.is_initialized():
        dist.barrier()


def load(engine: Any, ckpt_dir: Path, tag: str | None) -> dict[str, Any]:
    """Restore model, optimizer, LR schedule and our client state; returns the client state."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ConfigError(f"no checkpoint could be loaded from {ckpt_dir} (tag {tag or 'latest'})")
    if "torch_rng" in client:
        torch.set_rng_state(client["torch_rng"])
    return client
