"""The training loop: a DeepSpeed engine around a timm classifier, fed by a batch source.

One readable path, in numbered stages as a diffusers pipeline's ``__call__``: build (1. devices and ranks, 2. data,
3. run directory, 4. engine, 5. fault handling, 6. restore, 7. batch source), then ``fit`` runs steps, evaluates, logs
and checkpoints. How batches are made (real, edited, prefetched) is the batch source's business
(:mod:`online_aug.sources`); the frozen diffusion model never enters DeepSpeed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, faults, streams
from .batches import Batch, reduce_stats
from .config import Config, ConfigError, load_config, planned_steps, save_config
from .data import Splits, build_splits
from .data.transforms import build_train_transform
from .devices import DTYPES
from .distributed import deepspeed_config, init_distributed, micro_batch, resolve_device, resolve_precision
from .losses import SoftTargetMixup, class_balanced_weights, correct_labels, smooth, soft_cross_entropy
from .metrics import classification_metrics, fmt
from .model import create_classifier
from .monitor import Monitor, NullMonitor, confusion_image, final_report
from .optim import build_optimizer, resolve_steps
from .schedules import warmup_cosine
from .sources import BatchSource, build_batch_source, prepare_batch_source


def lr_lambda(cfg: Config, steps: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over the run's ``steps`` optimizer steps."""
    t = cfg.train
    return lambda step: warmup_cosine(step, t.warmup_steps, steps, t.min_lr_ratio)


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, show_progress: bool = True):
        self.cfg = cfg  # read-only from here on: what the run derives is kept on the trainer (self.steps)
        self._setup_ranks()  # 1
        self._setup_data()  # 2: bad data or generator inputs fail before any model is built
        resume_from = self._setup_run_dir(resume)  # 3: nothing in a resumed run is written before it is validated
        self._setup_engine()  # 4
        self._setup_faults()  # 5
        self._restore(resume_from)  # 6
        if self.rank == 0:  # the config as asked, and what the run derived from it
            save_config(cfg, self.run_dir / "config.yaml", resolved={"train_steps": self.steps})
        self.monitor = (Monitor(self.run_dir, self.steps, self.start_step, show_progress) if self.rank == 0
                        else NullMonitor())
        self.monitor.start(cfg)  # the dashboards: custom-scalars layout, HParams session start
        if self.extend_note:
            self.monitor.print(self.extend_note)
        self.guard_note = ""  # the guard's decision, repeated under the final table
        self.source: BatchSource = self._batch_source()  # 7
        self._report_audit(getattr(self.source, "audit", None))

    # ------------------------------------------------------------------ building, stage by stage

    def _setup_ranks(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg)
        self.rank, self.local_rank, self.world = init_distributed(self.device)
        self.precision = resolve_precision(cfg, self.device)
        self.dtype = DTYPES[self.precision]
        cfg.train.check_world_size(self.world)  # load_config validated for one rank; the launch sets the real count
        self.micro_bs, self.accum = micro_batch(cfg, self.world)

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.splits: Splits = build_splits(cfg.data, build_train_transform(cfg))
        prepare_batch_source(cfg, self.splits)  # the generator's inputs checked, masks/geometry attached
        self.class_counts = self.splits.train.class_counts()
        self.num_classes = self.splits.num_classes
        self.steps = resolve_steps(cfg, len(self.splits.train))  # train.epochs > 0 decides the length (optim.py)

    def _setup_run_dir(self, resume: str | None) -> tuple[Path, str | None] | None:
        """A new run directory, or the run to resume after its config was checked against the new one (an override
        the checkpoint cannot follow is refused here, before anything in the run is rewritten)."""
        cfg = self.cfg
        self.extend_note: str | None = None
        if not resume:
            self.run_dir = checkpoint.new_run_dir(cfg.run.out_dir, cfg.run.name, self.rank)
            return None
        run_dir, ckpt_dir, tag = checkpoint.find_resume(resume, cfg.run.out_dir, cfg.run.name)
        saved_path = run_dir / "config.yaml"
        if saved_path.is_file():
            saved = load_config(saved_path)
            saved_steps = planned_steps(saved_path, saved)
            self.extend_note = checkpoint.check_resume(saved.to_dict(), cfg.to_dict(), saved_steps, self.steps,
                                                       checkpoint.tag_step(ckpt_dir, tag))
        self.run_dir = run_dir
        if self.rank == 0:
            print(checkpoint.resume_note(ckpt_dir, tag))  # which checkpoint, and any incomplete one passed over
        return ckpt_dir, tag

    def _setup_engine(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # identical classifier init on every rank (ZeRO partitions after init)
        model = create_classifier(cfg.model, self.num_classes)
        optimizer = build_optimizer(cfg, model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, self.steps))
        import deepspeed

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.world, self.precision))
        self.mixup = None
        if cfg.train.mixing:
            self.mixup = SoftTargetMixup(mixup_alpha=cfg.train.mixup_alpha, cutmix_alpha=cfg.train.cutmix_alpha,
                                         prob=cfg.train.mix_prob, num_classes=self.num_classes)
        self.drw_weights = class_balanced_weights(self.class_counts).to(self.device)

    def _setup_faults(self) -> None:
        """Stop signals, a stop agreed by every rank at each step boundary, the divergence guard (README "Faults")."""
        t = self.cfg.train
        group = faults.cpu_group(self.world)
        self.signals = faults.StopSignals(self.cfg.run.stop_signals)
        self.control = faults.StopControl(self.signals, group)
        every = faults.guard_interval(t.guard_every, self.device, t.log_every)  # 0: per device
        self.guard = (faults.DivergenceGuard(self.engine.module, t.max_bad_steps, t.max_loss, group, every)
                      if t.max_bad_steps > 0 else None)
        self.weights_suspect = False  # train.guard_every > 1 found a bad loss that already reached the weights
        self.producer_fault = False  # reported once

    def _restore(self, resume_from: tuple[Path, str | None] | None) -> None:
        """The closed loop (aug.adaptive: live class statistics steer the policy) and the SSL teacher (ssl.source),
        then the checkpoint's weights and the client state that :meth:`_client_state` saved."""
        cfg = self.cfg
        self.loop = None
        self.ssl = None
        if cfg.ssl.source != "off":
            from .pseudo_labels import PseudoLabeler

            self.ssl = PseudoLabeler(cfg.ssl, self.engine.module, self.class_counts, self.splits.class_names,
                                     self.device, self.world)
        if cfg.aug.adaptive:
            from .closed_loop import ClosedLoop

            self.loop = ClosedLoop(cfg, self.num_classes, self.class_counts, self.splits.class_names, self.accum,
                                   self.device)
        self.start_step = 0
        self.best: dict[str, float] = {}  # train.select=val: the best val score so far and its step
        self.resumed_log: dict[str, Any] = {}  # the log interval a checkpoint cut (continued bit for bit)
        self.last_train: dict[str, float] = {}
        if resume_from is None:
            return
        client = checkpoint.load(self.engine, *resume_from)
        self.start_step = int(client["step"])
        self.best = dict(client.get("select_best") or {})
        self.resumed_log = dict(client.get("log") or {})
        self.last_train = dict(client.get("last_train") or {})
        if self.guard is not None:
            self.guard.skipped = int(client.get("skipped_steps", 0))
        if self.loop is not None:
            if "adaptive" not in client:
                raise ConfigError("aug.adaptive=true but the checkpoint holds no closed-loop statistics (it was "
                                  "trained without aug.adaptive); resume with aug.adaptive=false or start anew")
            self.loop.load_state_dict(client["adaptive"])
        if self.ssl is not None:
            if "ssl" not in client:
                raise ConfigError(f"ssl.source={cfg.ssl.source} but the checkpoint holds no teacher (it was trained "
                                  f"without ssl.source); resume with ssl.source=off or start anew")
            self.ssl.load_state_dict(client["ssl"])

    def _client_state(self, done: int, log: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds beside DeepSpeed's own state; :meth:`_restore` reads it back."""
        client = {"micro_step": done * self.accum, "last_train": self.last_train, "log": log,
                  "skipped_steps": self.guard.skipped if self.guard is not None else 0}
        if self.best:
            client["select_best"] = self.best
        if self.loop is not None:
            client["adaptive"] = self.loop.state_dict()
        if self.ssl is not None:
            client["ssl"] = self.ssl.state_dict()
        return client

    def _batch_source(self) -> BatchSource:
        # on_fault=real: the step in flight goes on with real batches; aug.on_fault=stop is then honoured at the step
        # boundary, with a checkpoint (_check_producer)
        return build_batch_source(self.cfg, self.splits, self.device, self.rank, self.world, self.micro_bs,
                                  self.start_step * self.accum, self.accum,
                                  board=self.loop.board if self.loop is not None else None, on_fault="real")

    def _report_audit(self, audit: Any) -> None:
        """What the generator audit found and what the guard made of it: printed, in TensorBoard (aug/guard/*) and
        in ``<run>/audit.md`` (docs/guard.md)."""
        if audit is None:
            return
        self.monitor.audit(audit, self.start_step)
        n, on = len(audit.classes), int(audit.allowed.sum())
        where = self.run_dir / "audit.md"
        if self.cfg.aug.guard == "off":
            verdict = ("" if on == n else f"\nwarning: aug.guard=off: the audit says the generator cannot help "
                       f"{n - on} of {n} classes, and edits go toward them as configured (aug.guard=on would not); "
                       f"see {where}")
        elif on == 0:
            verdict = (f"\nguard: THE GENERATOR CANNOT HELP THIS DATA SET: training on real images only (the "
                       f"baseline's batches; the generator is not kept); see {where}")
        elif audit.baseline:
            verdict = (f"\nguard: THE GENERATOR CAN HELP ONLY {on} OF {n} CLASSES ({audit.partial_share:.0%} of the "
                       f"target distribution < aug.guard_min_share={self.cfg.aug.guard_min_share:g}): edits toward "
                       f"those alone would tilt the class prior away from the rest, so the run trains on real images "
                       f"only (the baseline's batches; the generator is not kept); see {where}")
        else:
            rest = ("" if on == n else "; the edits toward the others become real images of those classes "
                    "(aug.guard_fallback=target)" if self.cfg.aug.guard_fallback == "target" else
                    "; the edits toward the others stay their real source images")
            verdict = f"\nguard: {audit.summary()}{rest}; see {where}"
        self.monitor.print(f"generator audit ({audit.judge}; {audit.edits_per_class} edits per class at "
                           f"s={audit.strength:g}, {audit.seconds:.1f} s):\n{audit.table()}{verdict}")
        self.guard_note = ("" if self.cfg.aug.guard != "on" else
                           "guard: no edits (trained as the baseline)" if on == 0 or audit.baseline else
                           f"guard: {audit.summary()}")

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, float]:
        if self.start_step >= self.steps:  # a finished run resumed as it was: nothing to do, and nothing is lost
            self.monitor.print(f"the run is already complete at step {self.start_step} (train.steps={self.steps}); "
                               f"nothing to train. Extend it with train.steps=<more>")
            self.source.close()
            self.monitor.close()
            return {}
        self.engine.train()
        self.monitor.print(f"run directory: {self.run_dir}")
        stop, done, metrics = faults.NONE, self.start_step, {}
        self.signals.install()  # README "Faults": a stop signal ends the run after the step in flight
        try:
            stop, done, metrics = self._loop()
        finally:
            if not stop:
                self.signals.restore()  # when stopping, a repeated signal is still the same request until exit
            if self.loop is not None:
                self.loop.close()  # wakes a producer waiting for a snapshot, so close() can join it
            self.source.close()
        if stop:
            self._stopped(done, stop)
        if self.cfg.train.select == "val" and self.best:
            metrics = self._evaluate_selected()
        self.monitor.final(metrics)  # final/*: the HParams tab's metrics
        self.monitor.close()
        if self.rank == 0 and metrics:
            t = self.cfg.train
            print(final_report(metrics, self.splits.class_names, self.splits.shot_counts, t.eval_split, self.run_dir,
                               self.cfg.run.reference, int(self.best["step"]) if t.select == "val" else None))
            if self.guard_note:
                print(self.guard_note)
            if self.ssl is not None:
                print(self.ssl.report())
        return metrics

    def _loop(self) -> tuple[int, int, dict[str, float]]:
        """Steps from ``start_step`` to the end (or a stop): train, log, evaluate, checkpoint. Returns (stop code,
        last step done, last metrics)."""
        t = self.cfg.train
        log = self.resumed_log  # a resumed run continues the log interval its checkpoint cut
        loss_sum = torch.full((), float(log.get("loss_sum", 0.0)), device=self.device)  # on device: no sync per step
        loss_n, seen, t_last = int(log.get("loss_n", 0)), 0, time.perf_counter()
        aug_acc: dict[str, float] = dict(log.get("aug_acc") or {})
        metrics: dict[str, float] = {}
        stop, done = faults.NONE, self.start_step
        for step in range(self.start_step, self.steps):
            for _ in range(self.accum):
                batch = next(self.source)
                self._check_producer()
                loss = self.train_step(batch)
                if loss is None:  # skipped by the divergence guard
                    continue
                loss_sum += loss.detach()
                loss_n += 1
                seen += len(batch.labels) * self.world
                for k, v in batch.stats.items():
                    aug_acc[k] = aug_acc.get(k, 0.0) + v
                if batch.examples is not None:
                    self._log_examples(step, batch.examples)
            done = step + 1
            last = done == self.steps
            if done % t.log_every == 0 or last:
                # .item() is a device sync point: once per log interval, not per step
                elapsed = time.perf_counter() - t_last
                values = {"train/loss": (loss_sum / loss_n).item() if loss_n else math.nan,  # nan: all skipped
                          "train/lr": self.scheduler.get_last_lr()[0],
                          "train/images_per_s": seen / max(elapsed, 1e-9)}
                values.update(reduce_stats(aug_acc, loss_n))
                if self.ssl is not None:
                    values.update(self.ssl.scalars())
                self.monitor.scalars(done, values)
                self.last_train = values
                loss_sum.zero_()
                loss_n, seen, t_last, aug_acc = 0, 0, time.perf_counter(), {}
                self.monitor.progress(0, loss=f"{values['train/loss']:.3f}")
            if done % t.eval_every == 0 or last:
                if t.select == "val":
                    self._select(done)
                else:
                    metrics = self.evaluate(done, t.eval_split)
            if self.guard is not None and self.guard.every > 1 and (done % self.guard.every == 0 or last):
                self._poll_guard(done)
            # every rank agrees whether to stop here (a signal, a producer fault, divergence): then checkpoint
            stop = self.control.agree() if not last else faults.NONE
            if self.weights_suspect:
                stop = stop or faults.FAULT
            elif (t.ckpt_every and done % t.ckpt_every == 0) or last or stop:
                log = {"loss_sum": loss_sum.item(), "loss_n": loss_n, "aug_acc": aug_acc}
                checkpoint.save(self.engine, self.run_dir, done, self._client_state(done, log), t.keep_last,
                                self.rank)
            self.monitor.progress(1)
            if stop:
                break
        return stop, done, metrics

    def class_weight(self, step: int) -> torch.Tensor | None:
        """DRW: class-balanced loss weights from ``train.drw_start`` of the run on (Cao et al. 2019)."""
        t = self.cfg.train
        return self.drw_weights if t.drw_start > 0 and step >= int(t.drw_start * self.steps) else None

    def train_step(self, batch: Batch) -> torch.Tensor | None:
        """Forward, soft-target loss, backward and (at the accumulation boundary) DeepSpeed's optimizer step on one
        micro-batch; returns the loss on device (no sync without the divergence guard), or None when the guard
        skipped the micro-batch."""
        # wait for the producer's stream on this batch only, never on the whole device (the Prefetcher's next() did
        # already; a wrapping source may have handed the batch to another stream)
        streams.wait(self.device, batch.ready)
        x, y = batch.images, batch.targets
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        y = smooth(y, self.cfg.train.label_smoothing)
        if self.guard is not None:
            self.guard.before_forward()
        unlabelled = (self.ssl is not None and batch.u_strong is not None  # ssl.start: labelled rows alone before
                      and batch.micro_step // self.accum >= int(self.cfg.ssl.start * self.steps))
        if unlabelled:  # labelled and strong unlabelled rows in one forward (FixMatch: one BatchNorm batch)
            logits = self.engine(torch.cat([x, batch.u_strong]).to(self.dtype))
            logits, u_logits = logits[:len(x)], logits[len(x):]
        else:
            logits = self.engine(x.to(self.dtype))
        beta = self.cfg.aug.label_correction
        if beta > 0 and batch.edit_target is not None:  # the edits' labels, corrected by this same forward
            y = correct_labels(y, logits, batch.edit_target >= 0, beta)
        loss = soft_cross_entropy(logits, y, self.class_weight(batch.micro_step // self.accum))
        if unlabelled:  # the teacher's pseudo-labels on the weak views (docs/ssl.md)
            loss = loss + self.ssl.loss(u_logits, batch.u_weak)
        if self.guard is not None and self.guard.every > 1:
            self.guard.observe(loss)  # on the device; read every train.guard_every steps (_poll_guard)
        elif self.guard is not None and self.guard.check(loss):  # one host read of the loss; agreed by every rank
            self._skip(batch, x)
            return None
        if self.loop is not None and (values := self.loop.observe(logits, batch)):
            self.monitor.scalars(batch.micro_step // self.accum + 1, values)
        self.engine.backward(loss)
        self.engine.step()
        self._update_teacher(batch)
        self.source.release(batch)  # its buffers may be refilled once the work queued above is done
        return loss

    def _update_teacher(self, batch: Batch) -> None:
        """ssl.source: the teacher's EMA follows every optimizer step (the last micro-batch of each)."""
        if self.ssl is not None and (batch.micro_step + 1) % self.accum == 0:
            self.ssl.update_teacher(self.engine.module, batch.micro_step // self.accum + 1)

    # ------------------------------------------------------------------ faults (README "Faults")

    def _skip(self, batch: Batch, x: torch.Tensor) -> None:
        """Divergence guard: nothing of a bad micro-batch reaches the weights. Without accumulation the optimizer
        step is skipped whole (DeepSpeed's counters and the LR schedule stay); with accumulation a zero-gradient
        backward on a blank input keeps DeepSpeed's boundary, and the step uses the other micro-batches."""
        g = self.guard
        if self.accum > 1:
            logits = self.engine(torch.zeros_like(x, dtype=self.dtype))
            self.engine.backward(logits.sum() * 0.0)
            self.engine.step()
            g.restore()  # the blank forward moved BatchNorm statistics too
            self._update_teacher(batch)
        self.source.release(batch)
        step = batch.micro_step // self.accum + 1
        self.monitor.scalars(step, {"train/skipped_steps": float(g.skipped)})
        self.monitor.print(f"step {step}: loss {g.last_bad:.4g} is not finite or above train.max_loss: skipped "
                           f"({g.in_a_row} in a row, {g.skipped} in all)")
        if g.tripped:
            self.control.request(faults.FAULT, (
                f"divergence guard: {g.in_a_row} micro-batches in a row had a non-finite loss (or one above "
                f"train.max_loss); none of them changed the weights, so the checkpoint holds the last good step's. "
                f"Lower train.lr, raise train.grad_clip, or check the edits (aug/*) before resuming"))

    def _poll_guard(self, step: int) -> None:
        """``train.guard_every`` > 1: the interval's one read of the device-side guard. A bad loss there has already
        been trained on, so the run stops without checkpointing those weights (the last checkpoint is the good one)."""
        g = self.guard
        if not g.poll():
            g.in_a_row = 0
            return
        self.weights_suspect = True
        self.monitor.scalars(step, {"train/skipped_steps": float(g.skipped)})
        self.control.request(faults.FAULT, (
            f"divergence guard: {g.in_a_row} micro-batch(es) up to step {step} had a non-finite loss (or one above "
            f"train.max_loss; last {g.last_bad:.4g}); with train.guard_every={g.every} they reached the weights, so "
            f"they are not saved. Resume from the last checkpoint with train.guard_every=1 (exact skipping), a lower "
            f"train.lr or a higher train.grad_clip"))

    def _check_producer(self) -> None:
        """A producer fault (hung past aug.timeout_s, or dead) is reported once. The step in flight goes on with real
        batches; aug.on_fault=stop then stops the run after it, aug.on_fault=real keeps training on real batches."""
        if self.producer_fault or (fault := faults.source_fault(self.source)) is None:
            return
        self.producer_fault = True
        if self.cfg.aug.on_fault == "stop":
            self.control.request(faults.FAULT, f"rank {self.rank}: {fault}. The run stops after this step with a "
                                               f"checkpoint (aug.on_fault=stop; aug.on_fault=real would go on with "
                                               f"real batches)")
        else:
            print(f"rank {self.rank}: {fault}. Going on with real batches only (aug.on_fault=real; TensorBoard "
                  f"aug/producer_fault is the share of batches that fell back)", file=sys.stderr, flush=True)

    def _stopped(self, done: int, code: int) -> None:
        """After the stop checkpoint: flush TensorBoard, wait for every rank, and end with the documented status."""
        self.monitor.close()
        if dist.is_initialized():
            dist.barrier()  # no rank exits (which makes a launcher kill the others) before all have flushed
        tag = self.run_dir / checkpoint.CKPT / f"step{done:08d}"
        status = faults.EXIT_STOPPED if code == faults.SIGNAL else faults.EXIT_FAULT
        if self.weights_suspect:
            raise faults.RunStopped(status, f"{self.control.reason}\nstopped after step {done} of "
                                            f"{self.steps} without a checkpoint; resume from the last "
                                            f"one with\n  python train.py --resume {self.run_dir}")
        raise faults.RunStopped(status, f"{self.control.reason}\nstopped after step {done} of "
                                        f"{self.steps}: checkpoint {tag} is complete; resume with\n"
                                        f"  python train.py --resume {self.run_dir}")

    def _log_examples(self, step: int, ex: dict[str, Any]) -> None:
        import torchvision

        pairs = torch.stack([ex["source"], ex["edited"]], 1).flatten(0, 1)  # source | edited, side by side
        grid = torchvision.utils.make_grid(pairs.float().cpu(), nrow=2 * min(4, len(ex["source"])), padding=1)
        self.monitor.images("aug/examples", step, grid, "  \n".join(ex["captions"]))

    # ------------------------------------------------------------------ evaluation

    def _select(self, step: int) -> None:
        """``train.select=val``: evaluate on val; better balanced accuracy than any earlier evaluation → the weights
        are saved as checkpoint tag ``best`` (ties keep the earlier step)."""
        m = self.evaluate(step, "val", extra={"split": "val"})
        score = float(m["balanced_acc"])
        if not self.best or score > self.best["score"]:
            self.best = {"score": score, "step": step}
            checkpoint.save_best(self.engine, self.run_dir, step, {"select_best": self.best}, self.rank)

    def _evaluate_selected(self) -> dict[str, float]:
        """Load the ``best`` weights and evaluate them on ``train.eval_split``: the run's final metrics, logged under
        ``selected/*`` and as the last summary.csv row (step = the last step, ``selected_step`` = the best step)."""
        checkpoint.load(self.engine, self.run_dir / checkpoint.CKPT, checkpoint.BEST)
        split = self.cfg.train.eval_split
        return self.evaluate(self.steps, split, prefix="selected",
                             extra={"split": split, "selected_step": int(self.best["step"])})

    @torch.no_grad()
    def evaluate(self, step: int, split: str = "test", prefix: str = "eval",
                 extra: dict[str, Any] | None = None) -> dict[str, float]:
        """Sharded evaluation; every rank runs the same number of forwards (ZeRO-3 gathers collectively).

        ``prefix`` names the TensorBoard tags (``eval/top1``, ...); ``extra`` adds columns to the summary.csv row."""
        ds = self.splits.test if split == "test" else self.splits.val
        n = len(ds)
        per_rank = math.ceil(n / self.world)
        idx = (np.arange(per_rank * self.world) % n)[self.rank::self.world]
        self.engine.eval()
        preds = []
        bs = self.cfg.train.eval_batch_size
        for lo in range(0, per_rank, bs):
            items = [ds[int(i)] for i in idx[lo:lo + bs]]
            x = torch.stack([it[0] for it in items]).to(self.device, self.dtype)
            preds.append(self.engine(x).argmax(-1))
        self.engine.train()
        pred = torch.cat(preds)
        index = torch.as_tensor(idx, device=self.device)
        if self.world > 1:
            all_p = [torch.empty_like(pred) for _ in range(self.world)]
            all_i = [torch.empty_like(index) for _ in range(self.world)]
            dist.all_gather(all_p, pred)
            dist.all_gather(all_i, index)
            pred, index = torch.cat(all_p), torch.cat(all_i)
        out = np.empty(n, dtype=np.int64)
        out[index.cpu().numpy()] = pred.cpu().numpy()  # padded duplicates write the same value twice
        m = classification_metrics(out, ds.labels, self.splits.shot_counts, self.cfg.data.many_threshold,
                                   self.cfg.data.few_threshold)
        scalars = {f"{prefix}/{k}" if not k.startswith("class_acc/") else
                   f"{prefix}/class_acc/{self.splits.class_names[int(k.split('/')[1])]}": v for k, v in m.items()}
        self.monitor.scalars(step, scalars)
        self.monitor.images(f"{prefix}/confusion", step, confusion_image(out, ds.labels, self.num_classes))
        row = {"step": step, **self.last_train,
               **{f"eval_{k}": v for k, v in m.items() if not k.startswith("class_acc/")}, **(extra or {})}
        self.monitor.summary_row(row)
        sel = (extra or {}).get("selected_step")
        what = f"step {step}" if sel is None else f"{prefix} (the weights of step {sel}, {split})"
        self.monitor.print(f"{what}: top1 {fmt(m['top1'])}  balanced {fmt(m['balanced_acc'])}  "
                           f"many/medium/few {fmt(m['acc_many'])}/{fmt(m['acc_medium'])}/{fmt(m['acc_few'])}")
        return m


def run(cfg: Config, resume: str | None = None) -> dict[str, float]:
    """Build and fit; returns the final test metrics (on every rank)."""
    show = int(os.environ.get("LOCAL_RANK", "0")) == 0
    trainer = Trainer(cfg, resume=resume, show_progress=show)
    return trainer.fit()
