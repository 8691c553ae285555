"""The closed loop (aug.adaptive): statistics equal a direct computation, the policy follows its formulas, the
snapshot schedule is a function of the step alone (prefetch == sync), resume continues the same stream, bad input."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_prefetch import FakeGenerator, _loader
from tiny_sd import save_tiny_sd

from online_aug.augment import Augmenter
from online_aug.class_stats import ClassStats, Snapshot, SnapshotBoard, required_boundary
from online_aug.config import AugConfig, ConfigError, load_config
from online_aug.policy import AugPolicy, adaptive_strengths, adaptive_targets, pair_distributions
from online_aug.prefetch import Prefetcher
from online_aug.sources import SyncAugmentedSource

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- statistics


def _batch_stats(seed: int, b: int = 64, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g)
    labels = torch.randint(c, (b,), generator=g)
    edit_target = torch.where(torch.rand(b, generator=g) < 0.3, torch.randint(c, (b,), generator=g), -1)
    return logits, labels, edit_target


def _direct(logits, labels, edit_target, c):
    real = edit_target < 0
    pred = logits.argmax(1)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    acc, loss, edit_acc = torch.zeros(c), torch.zeros(c), torch.zeros(c)
    conf = torch.zeros(c, c)
    for k in range(c):
        m = real & (labels == k)
        acc[k] = (pred[m] == k).float().mean() if m.any() else float("nan")
        loss[k] = ce[m].mean() if m.any() else float("nan")
        e = (~real) & (edit_target == k)
        edit_acc[k] = (pred[e] == k).float().mean() if e.any() else float("nan")
        for j in range(c):
            conf[k, j] = (pred[m] == j).sum()
    conf = conf / conf.sum(1, keepdim=True).clamp(min=1)
    return acc, loss, conf, edit_acc


def test_statistics_match_a_direct_computation() -> None:
    c = 5
    stats = ClassStats(c, ema=0.0, device=CPU)  # ema 0: the snapshot is this interval's values
    logits, labels, et = _batch_stats(0)
    # two micro-batches in one interval accumulate like one
    stats.update(logits[:40], labels[:40], et[:40])
    stats.update(logits[40:], labels[40:], et[40:])
    snap = stats.publish(micro_step=9)
    acc, loss, conf, edit_acc = _direct(logits, labels, et, c)
    seen = ~torch.isnan(acc)
    assert torch.allclose(snap.acc[seen], acc[seen], atol=1e-6)
    assert torch.allclose(snap.loss[seen], loss[seen], atol=1e-5)
    assert torch.allclose(snap.confusion[seen], conf[seen], atol=1e-6)
    eseen = ~torch.isnan(edit_acc)
    assert torch.allclose(snap.edit_acc[eseen], edit_acc[eseen], atol=1e-6)
    assert snap.micro_step == 9 and float(stats.sums.abs().sum()) == 0  # reset for the next interval


def test_ema_folds_intervals_and_unseen_classes_keep_their_value() -> None:
    c, b = 4, 0.75
    stats = ClassStats(c, ema=b, device=CPU)
    prior = Snapshot.prior(c)
    logits, labels, _ = _batch_stats(1, b=32, c=c)
    labels[labels == 3] = 0  # class 3 never appears
    stats.update(logits, labels, None)
    first = stats.publish(0)
    acc1, *_ = _direct(logits, labels, torch.full((32,), -1), c)
    assert torch.allclose(first.acc[:3], b * prior.acc[:3] + (1 - b) * acc1[:3], atol=1e-6)
    assert first.acc[3] == prior.acc[3] and torch.equal(first.confusion[3], prior.confusion[3])
    logits2, labels2, _ = _batch_stats(2, b=32, c=c)
    labels2[labels2 == 3] = 1
    stats.update(logits2, labels2, None)
    second = stats.publish(1)
    acc2, *_ = _direct(logits2, labels2, torch.full((32,), -1), c)
    assert torch.allclose(second.acc[:3], b * first.acc[:3] + (1 - b) * acc2[:3], atol=1e-6)


# ---------------------------------------------------------------- policy formulas


def test_target_distribution_follows_error_with_a_floor() -> None:
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    acc = torch.tensor([0.9, 0.5, 0.0, 1.0])
    q = adaptive_targets(prior, acc, tau=2.0, floor=0.2)
    raw = prior * ((1 - acc.double()) + 1e-3) ** 2
    expect = 0.8 * raw / raw.sum() + 0.2 / 4
    assert torch.allclose(q, expect) and abs(float(q.sum()) - 1) < 1e-12
    assert float(q.min()) >= 0.2 / 4 - 1e-12  # the floor: a class the classifier knows perfectly still gets edits
    assert torch.allclose(adaptive_targets(prior, acc, tau=0.0, floor=0.0), prior)  # tau 0: the static prior


def test_pairs_follow_the_confusions() -> None:
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    conf = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # class 0 is mistaken for class 1
    p = pair_distributions(q, conf, pairs=0.5)
    assert torch.allclose(p.sum(1), torch.ones(3, dtype=torch.float64))
    hard_0 = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # sym conf(0, 1) = 0.2, (0, 2) = 0
    assert torch.allclose(p[0], 0.5 * q + 0.5 * hard_0, atol=1e-5)
    assert torch.allclose(p[1], 0.5 * q + 0.5 * hard_0.flip(0).roll(-1), atol=1e-5)  # 1 -> 0 (symmetric)
    assert torch.allclose(pair_distributions(q, conf, pairs=0.0), q.expand(3, 3))


def test_strengths_follow_edit_accuracy_within_bounds() -> None:
    edit_acc = torch.tensor([0.0, 0.5, 1.0])
    t = torch.tensor([0, 1, 2])
    mid = torch.full((3,), 0.5)
    s = adaptive_strengths(t, edit_acc, kappa=1.0, bounds=(0.5, 0.9), u=mid)
    assert torch.allclose(s, torch.tensor([0.5, 0.7, 0.9]))  # raised where edits are recognised
    s = adaptive_strengths(t, edit_acc, kappa=-0.5, bounds=(0.5, 0.9), u=mid)
    assert torch.allclose(s, torch.tensor([0.8, 0.7, 0.6]))
    s = adaptive_strengths(t, edit_acc, kappa=1.0, bounds=(0.5, 0.9), u=torch.tensor([0.0, 1.0, 1.0]))
    assert float(s.min()) >= 0.5 and float(s.max()) <= 0.9


def test_adaptive_plan_draws_targets_from_the_snapshot() -> None:
    cfg = AugConfig(alpha=1.0, strengths=[0.5, 0.9], target_mode="inter", adaptive=True, adaptive_tau=4.0,
                    adaptive_floor=0.0, adaptive_pairs=0.0)
    policy = AugPolicy(cfg, 4, [10, 10, 10, 10])
    snap = Snapshot.prior(4)
    snap = Snapshot(micro_step=0, loss=snap.loss, acc=torch.tensor([1.0, 1.0, 1.0, 0.0]), confusion=snap.confusion,
                    edit_acc=snap.edit_acc)
    labels = torch.randint(4, (4000,), generator=torch.Generator().manual_seed(0))
    plan = policy.plan(labels, torch.Generator().manual_seed(1), snap)
    assert float((plan.target == 3).float().mean()) > 0.99  # only class 3 is misclassified
    static = policy.plan(labels, torch.Generator().manual_seed(1), None)  # no snapshot: the static prior
    assert 0.2 < float((static.target == 3).float().mean()) < 0.3


# ---------------------------------------------------------------- snapshot schedule


def test_required_boundary_is_a_function_of_the_step() -> None:
    every, lag = 4, 3  # publications after micro-steps 3, 7, 11, ...
    got = [required_boundary(k, every, lag) for k in range(14)]
    assert got == [-1] * 6 + [3] * 4 + [7] * 4
    for k in range(40):
        m = required_boundary(k, every, lag)
        assert m == -1 or (m <= k - lag and (m + 1) % every == 0)
        assert required_boundary(k + 1, every, lag) >= m


def test_board_waits_for_the_trainer_and_close_wakes_it() -> None:
    board = SnapshotBoard(3, every=2, lag=1)
    assert board.for_step(1).micro_step == -1
    with pytest.raises(TimeoutError):
        board.for_step(2, timeout=0.05)  # needs the snapshot of micro-step 1
    board.put(Snapshot(1, torch.zeros(3), torch.ones(3), torch.eye(3), torch.ones(3)))
    assert board.for_step(2).micro_step == 1
    board.close()
    with pytest.raises(RuntimeError, match="closed"):
        board.for_step(10)


def _augmenter(board: SnapshotBoard) -> Augmenter:
    cfg = AugConfig(alpha=0.5, strengths=[0.5, 0.9], target_mode="inter", adaptive=True, adaptive_tau=2.0,
                    adaptive_pairs=0.5, adaptive_strength=0.5, dup_threshold=0.0)
    return Augmenter(AugPolicy(cfg, 4, [16, 16, 16, 16]), FakeGenerator(), CPU, seed=7, rank=0,
                     class_names=list("abcd"), board=board)


def _drive(source, stats: ClassStats, board: SnapshotBoard, steps: int, every: int) -> list:
    """A stand-in trainer: fake logits from the batch, publish at every boundary, as Trainer.train_step does."""
    out = []
    for _ in range(steps):
        b = next(source)
        logits = b.images.mean(dim=(2, 3))[:, :1] * torch.arange(1, 5.0)  # depends on the (augmented) images
        stats.update(logits, b.labels, b.edit_target)
        if (b.micro_step + 1) % every == 0:
            board.put(stats.publish(b.micro_step))
        out.append(b)
        source.release(b)
    return out


def test_prefetcher_equals_synchronous_path_with_the_closed_loop() -> None:
    every, depth = 2, 2
    runs = []
    for prefetch in (False, True):
        board = SnapshotBoard(4, every=every, lag=depth + 2)
        stats = ClassStats(4, ema=0.5, device=CPU)
        aug = _augmenter(board)
        src = (Prefetcher(_loader(), aug, CPU, depth=depth) if prefetch
               else SyncAugmentedSource(_loader(), aug, CPU, start=0))
        try:
            runs.append(_drive(src, stats, board, 16, every))
        finally:
            board.close()
            src.close()
    for a, b in zip(*runs):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.edit_target, b.edit_target)
    # the loop did steer: later plans differ from what the prior alone would give
    prior_board = SnapshotBoard(4, every=10**6, lag=depth + 2)
    static = _drive(SyncAugmentedSource(_loader(), _augmenter(prior_board), CPU, start=0),
                    ClassStats(4, 0.5, CPU), prior_board, 16, 10**6)
    assert any(not torch.equal(a.targets, b.targets) for a, b in zip(runs[0][8:], static[8:]))


# ---------------------------------------------------------------- config and resume


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["aug.adaptive=true", "aug.alpha=0"], "aug.adaptive"),
        (["aug.adaptive_tau=-1"], "aug.adaptive_tau"),
        (["aug.adaptive_floor=1.5"], "aug.adaptive_floor"),
        (["aug.adaptive_every=0"], "aug.adaptive_every"),
        (["aug.adaptive_pairs=-0.1"], "aug.adaptive_pairs"),
        (["aug.adaptive_strength=2"], "aug.adaptive_strength"),
        (["aug.adaptive_ema=1"], "aug.adaptive_ema"),
    ],
)
def test_bad_adaptive_settings_name_the_key(override: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, override)


def test_statistics_from_another_class_count_are_refused() -> None:
    state = ClassStats(5, 0.9, CPU).state_dict()
    with pytest.raises(ConfigError, match="aug.adaptive"):
        ClassStats(4, 0.9, CPU).load_state_dict(state)


def _train(args: list[str], env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.slow
def test_resume_continues_the_closed_loop_bit_for_bit(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """straight 8 steps == 4 steps + resume + 4 steps; snapshots every 2 steps (some from before the break)."""
    sd = save_tiny_sd(tmp_path / "sd")
    common = ["--config", "configs/baseline.yaml", "data.image_size=16", "train.batch_size=16",
              "model.name=test_resnet", "train.eval_every=4", "train.log_every=1", "aug.alpha=0.5",
              f"aug.model={sd}", "aug.steps=1", "aug.guard=off", "aug.audit=false",  # a random SD: no verdict
              "aug.image_every=0", "aug.adaptive=true", "aug.adaptive_every=2", "aug.adaptive_strength=0.5",
              "aug.strengths=[0.5,0.9]", "aug.target_mode=inter", "aug.queue_depth=1"]
    _train([*common, "run.name=straight", f"run.out_dir={tmp_path / 'a'}", "train.steps=8"], clean_env)
    _train([*common, "run.name=broken", f"run.out_dir={tmp_path / 'b'}", "train.steps=4"], clean_env)
    _train([*common, "run.name=broken", f"run.out_dir={tmp_path / 'b'}", "train.steps=8", "--resume", "latest"],
           clean_env)

    def losses(root: Path) -> list[tuple[str, str]]:
        rows = []
        for run in sorted(root.iterdir()):
            with open(run / "summary.csv", newline="") as f:
                rows += [(r["step"], r["train/loss"]) for r in csv.DictReader(f)]
        return rows

    straight, resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert straight and straight[-1] == resumed[-1], (straight, resumed)
    assert np.isfinite(float(straight[-1][1]))
