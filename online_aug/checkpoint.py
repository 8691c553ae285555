"""Run directories and DeepSpeed checkpoints.

Layout: ``<out_dir>/<YYYYmmdd-HHMMSS>-<name>/`` with ``config.yaml``, ``tb/``, ``checkpoints/`` and ``summary.csv``.
Checkpoints are DeepSpeed's own (``engine.save_checkpoint``, called on every rank), so DeepSpeed's tools work on
them, e.g. the ``zero_to_fp32.py`` DeepSpeed writes next to them (ZeRO stages 1-3; stage 0 saves the whole model
in ``mp_rank_00_model_states.pt``).

Saves are atomic across ranks: every rank writes its files (DeepSpeed, told not to write its own ``latest``); after
a barrier, rank 0 writes the tag's ``complete.json`` marker, then moves ``latest`` to it (each an atomic rename).
A save interrupted anywhere (a killed process, a full disk) leaves a tag without a marker, and ``latest`` on the
previous complete one; resuming picks a complete tag and says which; pruning never deletes the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError
from .faults import EXIT_FAULT, RunStopped, inject_into_checkpoint

CKPT = "checkpoints"
MARKER = "complete.json"  # in a tag folder: every rank finished writing it
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

    ``latest`` is the newest run directory named ``*-<name>`` under ``out_dir`` that holds a complete checkpoint.
    PATH may be a run directory, its ``checkpoints/`` folder, or one checkpoint tag folder inside it. The tag is the
    one ``latest`` names when that is complete, else the newest complete one (:func:`pick_tag`).
    """
    if resume == "latest":
        runs = sorted(p for p in Path(out_dir).glob(f"*-{name}") if _resumable(p / CKPT))
        if not runs:
            raise ConfigError(f"--resume latest: no run named '*-{name}' with a complete checkpoint under {out_dir!r}")
        return runs[-1], runs[-1] / CKPT, pick_tag(runs[-1] / CKPT)
    p = Path(resume)
    if _is_ckpt_dir(p / CKPT):
        return p, p / CKPT, pick_tag(p / CKPT)
    if _is_ckpt_dir(p):
        return p.parent, p, pick_tag(p)
    if p.is_dir() and _is_ckpt_dir(p.parent):
        complete = complete_tags(p.parent)
        if p.name.startswith("step") and complete and p.name not in complete:
            raise ConfigError(f"--resume {resume!r}: that checkpoint is incomplete (interrupted while writing); the "
                              f"newest complete one is {p.parent / complete[-1]}")
        return p.parent.parent, p.parent, p.name
    raise ConfigError(f"--resume {resume!r}: not a run directory, checkpoints folder or checkpoint tag "
                      f"(no 'latest' file found)")


def _is_ckpt_dir(d: Path) -> bool:
    return d.is_dir() and ((d / "latest").is_file() or any(p.is_dir() for p in d.glob("step*")))


def _resumable(d: Path) -> bool:
    """Holds a complete checkpoint (or a 'latest' file: a folder written before completeness markers)."""
    return d.is_dir() and (bool(complete_tags(d)) or (d / "latest").is_file())


def _marker(tag_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _latest(ckpt: Path) -> str | None:
    try:
        return (ckpt / "latest").read_text().strip() or None
    except OSError:
        return None


def complete_tags(ckpt: Path) -> list[str]:
    """The complete ``step*`` tags of a checkpoints folder, in the order they were completed."""
    found = [(int(m.get("seq", 0)), p.name) for p in ckpt.glob("step*") if p.is_dir() and (m := _marker(p))]
    return [tag for _, tag in sorted(found)]


def pick_tag(ckpt: Path) -> str | None:
    """The tag to resume from: the one ``latest`` names if complete, else the newest complete one. None for a folder
    written before completeness markers existed (DeepSpeed then reads ``latest``)."""
    complete, latest = complete_tags(ckpt), _latest(ckpt)
    if complete:
        return latest if latest in complete else complete[-1]
    if latest is not None:
        return None
    partial = sorted(p.name for p in ckpt.glob("step*") if p.is_dir())
    raise ConfigError(f"{ckpt} holds no complete checkpoint ({', '.join(partial)}: interrupted while writing); "
                      f"start the run anew")


def final_tag(ckpt: Path, select: str = "last") -> str | None:
    """The tag holding the weights a run's final metrics describe: ``best`` for ``train.select=val`` (once saved),
    else the one a resume picks (:func:`pick_tag`; for a folder written before completeness markers, the tag
    ``latest`` names). None when the folder holds no checkpoint at all."""
    if select == "val" and (ckpt / BEST).is_dir():
        return BEST
    if not _is_ckpt_dir(ckpt):
        return None
    return pick_tag(ckpt) or _latest(ckpt)


def resume_note(ckpt: Path, tag: str | None) -> str:
    """What ``--resume`` picked, and which newer tags it passed over as incomplete."""
    name = tag or _latest(ckpt) or "latest"
    complete = complete_tags(ckpt)
    skipped = sorted(p.name for p in ckpt.glob("step*") if p.is_dir() and p.name > name and p.name not in complete)
    text = f"resuming from {ckpt / name}" + (" (complete)" if name in complete else "")
    if skipped:
        text += f"; passing over {', '.join(skipped)}: incomplete (interrupted while writing)"
    return text


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], keep_last: int, rank: int) -> None:
    """Every rank writes its files; after a barrier rank 0 marks the tag complete, moves ``latest`` and keeps the
    newest ``keep_last`` complete tags (deleting incomplete ones); a last barrier holds every rank until then.

    A full disk (OSError) stops the run (:class:`~online_aug.faults.RunStopped`, the partial tag removed); the
    previous complete checkpoint stays ``latest``."""
    ckpt = run_dir / CKPT
    tag = f"step{step:08d}"
    client_state = dict(client_state, step=step, torch_rng=torch.get_rng_state())
    if rank == 0:
        (ckpt / tag / MARKER).unlink(missing_ok=True)  # rewriting a tag (resumed from an older one): not complete
    inject_into_checkpoint(engine, step)  # test hook (ONLINE_AUG_INJECT_FAULT=kill_in_save@STEP)
    try:
        engine.save_checkpoint(str(ckpt), tag=tag, client_state=client_state, save_latest=False)
        if dist.is_initialized():
            dist.barrier()  # every rank has written its files
        if rank == 0:
            complete = complete_tags(ckpt)
            legacy = _latest(ckpt)
            if not complete and legacy and legacy != tag and (ckpt / legacy).is_dir():
                _write_atomic(ckpt / legacy / MARKER, json.dumps({"seq": 0, "adopted": True}))  # pre-marker run
            seq = 1 + max((int(m.get("seq", 0)) for p in ckpt.glob("step*") if (m := _marker(p))), default=0)
            world = dist.get_world_size() if dist.is_initialized() else 1
            _write_atomic(ckpt / tag / MARKER, json.dumps({"step": step, "seq": seq, "world_size": world,
                                                            "time": time.strftime("%Y-%m-%d %H:%M:%S")}))
            _write_atomic(ckpt / "latest", tag)
            keep = set(complete_tags(ckpt)[-max(1, keep_last):])
            for old in ckpt.glob("step*"):
                if old.is_dir() and old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(ckpt / tag, ignore_errors=True)  # the space a partial checkpoint took
        prev = pick_tag(ckpt) if complete_tags(ckpt) else None
        raise RunStopped(EXIT_FAULT, f"checkpoint {tag} could not be written ({e}); the newest complete checkpoint "
                                     f"is {prev or 'none'}: free space, then resume with --resume {run_dir}") from e
    if dist.is_initialized():
        dist.barrier()  # no rank goes on, or exits, before 'latest' moved


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


# ---------------------------------------------------------------- resuming with overrides

# Keys whose change on --resume the checkpoint cannot follow: the weights' shapes and the optimizer state's layout
# (model.*, train.optimizer, train.precision, train.zero_stage: DeepSpeed loads a ZeRO checkpoint only into the
# stage that wrote it), or the data the run trains and is judged on (the split protocol, hence the class count).
# Everything else (lr, steps, aug.*, logging, data.num_workers, a moved data.root) may change.
FIXED_ON_RESUME = ("model.", "train.optimizer", "train.precision", "train.zero_stage", "data.dataset",
                   "data.image_size", "data.split_seed", "data.test_fraction", "data.val_per_class",
                   "data.pool_fraction", "data.train_with_pool", "data.val_fraction", "data.imbalance_ratio",
                   "data.longtail_profile", "data.class_order_seed", "data.shots")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def tag_step(ckpt: Path, tag: str | None) -> int | None:
    """The optimizer step a checkpoint tag holds (``step00000020`` → 20), from its name; None if it has none."""
    name = tag or _latest(ckpt) or ""
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def check_resume(saved: dict[str, Any], cfg_dict: dict[str, Any], saved_steps: int, steps: int,
                 ckpt_step: int | None) -> str | None:
    """Validate a resumed run's config against the run it continues, before anything in the run is written.

    ``saved``: the run's config.yaml as a config dict; ``saved_steps``/``steps``: the optimizer steps it planned and
    the ones now asked; ``ckpt_step``: the checkpoint's step. Raises ConfigError naming the key for an override the
    checkpoint cannot follow, or for a step count the run is already past; returns a note to print when the run is
    extended (its learning-rate schedule is re-planned), else None."""
    old, new = _flat(saved), _flat(cfg_dict)
    changed = [k for k in new if k.startswith(FIXED_ON_RESUME) and k in old and old[k] != new[k]]
    if changed:
        k = changed[0]
        raise ConfigError(f"--resume with {k}={new[k]!r}: the checkpoint was trained with {k}={old[k]!r} and cannot "
                          f"be continued with another (weights, optimizer state or data split would not match); "
                          f"drop the override, or start a new run with --config")
    # steps == ckpt_step trains nothing either; unless it is the step count the run planned (a finished run resumed
    # as it is), accepting it would only rewrite config.yaml with a length its learning-rate schedule never had
    if ckpt_step is not None and (steps < ckpt_step or steps == ckpt_step != saved_steps):
        raise ConfigError(f"--resume with train.steps={steps}: the checkpoint is already at step {ckpt_step}; nothing "
                          f"to train (the run's config.yaml is left as it was). Give train.steps > {ckpt_step} to "
                          f"extend the run")
    if steps != saved_steps and ckpt_step is not None and steps > ckpt_step:
        return (f"train.steps {saved_steps} -> {steps}: the warm-up/cosine learning-rate schedule is re-planned for "
                f"{steps} steps from step {ckpt_step} on (the steps before followed the {saved_steps}-step plan), so "
                f"this run is not the one a {steps}-step run from the start would be; plan the long run from the "
                f"start (train.steps={steps} in a new run) to get one schedule")
    return None
