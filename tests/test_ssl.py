"""Semi-supervised rows (ssl.*, docs/ssl.md): what each lever computes, on hand-checkable tensors, and the run's
contracts (resume bit for bit, prefetch == synchronous) on a few CPU steps with the pool's images unlabelled and
with a random tiny SD's images."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from online_aug.config import ConfigError, SSLConfig, load_config
from online_aug.pseudo_labels import PseudoLabeler, align_distribution, confident_rows, flexmatch_thresholds

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the levers, on tensors


def test_threshold_masks_exactly_the_low_confidence_rows() -> None:
    p = torch.tensor([[0.96, 0.02, 0.02], [0.50, 0.30, 0.20], [0.10, 0.85, 0.05], [0.05, 0.15, 0.80],
                      [0.94, 0.03, 0.03]])
    pseudo, mask = confident_rows(p, torch.tensor([0.95, 0.80, 0.90]))
    assert pseudo.tolist() == [0, 0, 1, 2, 0]
    assert mask.tolist() == [True, False, True, False, False]  # 0.85 >= 0.80; 0.80 < 0.90; 0.94 < 0.95
    # at the threshold exactly, the row counts (FixMatch's max_probs.ge(tau))
    assert confident_rows(torch.tensor([[0.9, 0.1]]), torch.tensor([0.9, 0.9]))[1].item()


def test_distribution_alignment_keeps_the_expected_class_marginal() -> None:
    # every row the same: the aligned rows are the target exactly
    p = torch.tensor([[0.8, 0.2], [0.8, 0.2]])
    q = align_distribution(p, torch.tensor([0.5, 0.5]), p.mean(0))
    assert torch.allclose(q, torch.full((2, 2), 0.5))
    # by hand: p = (0.6, 0.3, 0.1), running mean (0.6, 0.3, 0.1), target (0.2, 0.3, 0.5) -> p * t / m = t
    p = torch.tensor([[0.6, 0.3, 0.1]])
    q = align_distribution(p, torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.6, 0.3, 0.1]))
    assert torch.allclose(q, torch.tensor([[0.2, 0.3, 0.5]]))
    # a head-heavy batch: the aligned batch marginal moves from the teacher's toward the uniform target
    p = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4]])
    q = align_distribution(p, torch.tensor([0.5, 0.5]), p.mean(0))
    assert abs(float(q.mean(0)[0]) - 0.5) < abs(float(p.mean(0)[0]) - 0.5)
    assert torch.allclose(q.sum(-1), torch.ones(3))
    # by hand, row 0: (0.9 * 0.5 / (2.2/3), 0.1 * 0.5 / (0.8/3)) normalised
    a, b = 0.9 / (2.2 / 3), 0.1 / (0.8 / 3)
    assert float(q[0, 0]) == pytest.approx(a / (a + b))


def test_flexmatch_thresholds_rise_and_fall_as_specified() -> None:
    tau = 0.9
    t = flexmatch_thresholds(tau, torch.tensor([10.0, 5.0, 0.0]), torch.tensor(2.0))
    # b = (1, 0.5, 0): T = tau * b / (2 - b) = (0.9, 0.3, 0)
    assert torch.allclose(t, torch.tensor([0.9, 0.3, 0.0]))
    # more confident rows of class 1: its threshold rises, the others stay
    t2 = flexmatch_thresholds(tau, torch.tensor([10.0, 8.0, 0.0]), torch.tensor(2.0))
    assert t2[1] > t[1] and t2[0] == t[0] and t2[2] == t[2]
    # warm-up: many unconfident rows lower every threshold (the teacher is unsure of everything)
    t3 = flexmatch_thresholds(tau, torch.tensor([10.0, 5.0, 0.0]), torch.tensor(40.0))
    assert (t3[:2] < t[:2]).all()
    assert torch.allclose(t3, tau * torch.tensor([0.25, 0.125, 0.0]) / (2 - torch.tensor([0.25, 0.125, 0.0])))
    assert float(flexmatch_thresholds(tau, torch.zeros(3), torch.tensor(0.0)).max()) == 0.0  # before any count


def _labeler(**kw) -> tuple[PseudoLabeler, nn.Linear]:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    cfg = SSLConfig(source="pool", **kw)
    return PseudoLabeler(cfg, model, [5, 3, 1], ["a", "b", "c"], torch.device("cpu")), model


def test_labeler_counts_and_masks_through_the_teacher() -> None:
    lab, _ = _labeler(thresholds="fixed", threshold=0.8, dist_align=False, stats_ema=0.0)
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.05, 0.05, 0.9]]))
    pseudo, mask = lab.label(logits)  # the teacher is the identity: p = softmax(log p) = p
    assert pseudo.tolist() == [0, 0, 2] and mask.tolist() == [1.0, 0.0, 1.0]
    assert lab.state["confident"].tolist() == [1.0, 0.0, 1.0] and float(lab.state["unconfident"]) == 1.0
    s = lab.scalars()
    assert s["ssl/mask_rate"] == pytest.approx(2 / 3) and s["ssl/pseudo/a"] == 1 and s["ssl/pseudo/c"] == 1
    assert s["ssl/threshold/b"] == pytest.approx(0.8) and s["ssl/used_rows"] == 2
    assert "2 used" in lab.report() and "3 unlabelled rows" in lab.report()
    # the loss: masked CE toward the pseudo-labels, mean over all rows
    lab2, _ = _labeler(thresholds="fixed", threshold=0.8, dist_align=False)
    student = torch.randn(3, 3)
    ce = torch.nn.functional.cross_entropy(student, torch.tensor([0, 0, 2]), reduction="none")
    assert torch.allclose(lab2.loss(student, logits), (ce * torch.tensor([1.0, 0.0, 1.0])).mean())


def test_teacher_is_the_hand_computed_ema_after_k_steps() -> None:
    d = 0.9
    lab, model = _labeler(teacher_decay=d, teacher_warmup=False)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(torch.randn(prm.shape, generator=g))
        lab.update_teacher(model, step)
        ema = {k: d * ema[k] + (1 - d) * v for k, v in model.state_dict().items()}
    for k, v in lab.teacher.module.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=1e-6, atol=1e-6)
    # timm's warm-up: the decay after optimizer step s is min(decay, 1 - s^(-2/3)); the first update copies
    lab, model = _labeler(teacher_decay=0.99, teacher_warmup=True)
    with torch.no_grad():
        model.weight.add_(1.0)
    lab.update_teacher(model, 1)
    assert lab.last_decay == 0.0 and torch.equal(lab.teacher.module.weight, model.weight)
    lab.update_teacher(model, 9)
    assert lab.last_decay == pytest.approx(1 - 9 ** (-2 / 3))


def test_labeler_state_round_trips() -> None:
    lab, model = _labeler()
    lab.label(torch.randn(4, 3))
    with torch.no_grad():
        model.weight.add_(0.5)
    lab.update_teacher(model, 3)
    other, _ = _labeler()
    other.load_state_dict(lab.state_dict())
    for k, v in lab.state_dict()["stats"].items():
        assert torch.equal(other.state[k], v), k
    assert torch.equal(other.teacher.module.weight, lab.teacher.module.weight)


def test_unlabelled_pool_rows_are_keyed_by_step_and_leave_global_rngs_alone() -> None:
    from online_aug.data import build_splits
    from online_aug.unlabelled import UnlabelledRows

    cfg = load_config(ROOT / "configs/ssl-real-pool.yaml", ["data.image_size=16"])
    splits = build_splits(cfg.data)
    rows = UnlabelledRows(cfg, torch.device("cpu"), 0, splits.num_classes, pool=splits.pool)
    images = torch.rand(4, 3, 16, 16)
    random.seed(5)
    before = (random.random(), np.random.get_state()[1][:3].copy(), torch.get_rng_state())
    random.seed(5)
    w1, s1 = rows(images, 7)
    w2, s2 = rows(images, 7)
    assert random.random() == before[0] and torch.equal(torch.get_rng_state(), before[2])
    assert torch.equal(w1, w2) and torch.equal(s1, s2)  # a function of the step
    w3, _ = rows(images, 8)
    assert not torch.equal(w1, w3)
    assert w1.shape == (4 * cfg.ssl.mu, 3, 16, 16) and not torch.equal(w1, s1)  # the strong view differs


def test_balanced_edit_sources_vary_every_class_as_often() -> None:
    """ssl.edit_sources=balanced: the SDEdit starts from training images of a class drawn uniformly, not from the
    long-tailed micro-batch; keyed by the step like every unlabelled row."""
    from online_aug.unlabelled import UnlabelledRows

    class Identity:  # the edit returns its source: what was drawn is what comes out
        def edit(self, src, strength, target, generator=None):
            return src, torch.ones(len(src), dtype=torch.bool)

    cfg = load_config(ROOT / "configs/ssl-gen.yaml", ["data.image_size=8", "ssl.strengths=[0.5]",
                                                      "ssl.edit_sources=balanced"])
    sources = [torch.full((n, 3, 8, 8), c / 10) for c, n in enumerate([5, 1, 3])]
    rows = UnlabelledRows(cfg, torch.device("cpu"), 0, 3, editor=Identity(), sources=sources)
    batch = torch.zeros(64, 3, 8, 8)  # a head-only micro-batch: with balanced sources it is never edited
    drawn = torch.cat([rows(batch, k)[0][:, 0, 0, 0] for k in range(20)])
    share = torch.stack([(drawn - c / 10).abs().lt(1e-6).float().mean() for c in range(3)])
    assert share.sum() == 1 and (share - 1 / 3).abs().max() < 0.05, share
    assert torch.equal(rows(batch, 3)[0], rows(batch, 3)[0])
    cfg.ssl.edit_sources = "batch"
    assert UnlabelledRows(cfg, torch.device("cpu"), 0, 3, editor=Identity())(batch, 3)[0].abs().sum() == 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("overrides", "key"), [
    (["ssl.threshold=1.5"], "ssl.threshold"),
    (["ssl.threshold=-0.1"], "ssl.threshold"),
    (["ssl.mu=0"], "ssl.mu"),
    (["ssl.source=pool", "train.mixup_alpha=0.2"], "train.mixup_alpha"),
    (["ssl.source=pool", "train.zero_stage=3"], "train.zero_stage"),
    (["ssl.source=pool", "data.pool_fraction=0"], "data.pool_fraction"),
    (["ssl.source=pool", "aug.alpha=0.5"], "aug.alpha"),
    (["ssl.source=pool", "ssl.strong=autoaug"], "ssl.strong"),
    (["ssl.source=bogus"], "ssl.source"),
])
def test_bad_ssl_input_is_a_one_line_error_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/baseline.yaml", overrides)
    assert key in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the run: resume and prefetch


RUNNER = r"""
import json, shutil, sys
import torch
from online_aug.config import load_config
from online_aug.trainer import Trainer
out, base = sys.argv[1], json.loads(sys.argv[2])
runs = json.loads(sys.argv[3])
results = {}
dirs = {}
for name, extra, resume in runs:
    cfg = load_config("configs/baseline.yaml", base + extra + [f"run.name={name}"])
    trainer = Trainer(cfg, resume=dirs.get(resume), show_progress=False)
    losses = []
    step = trainer.train_step
    def record(batch, step=step):
        loss = step(batch)
        losses.append(float(loss))
        return loss
    trainer.train_step = record
    trainer.fit()
    dirs[name] = str(trainer.run_dir / "checkpoints" / "step00000002")
    state = trainer.ssl.state_dict()
    results[name] = {"losses": losses,
                     "teacher": [v.double().sum().item() for v in state["teacher"].values()],
                     "stats": {k: v.tolist() for k, v in state["stats"].items()}}
json.dump(results, open(out, "w"))
"""


def _runs(tmp: Path, base: list[str], runs: list[tuple[str, list[str], str | None]]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    out = tmp / "results.json"
    r = subprocess.run([sys.executable, "-c", RUNNER, str(out), json.dumps(base), json.dumps(runs)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and out.is_file(), r.stderr[-4000:]
    return json.loads(out.read_text())


BASE = ["train.batch_size=16", "data.image_size=16", "model.name=test_resnet", "train.log_every=1",
        "train.eval_every=4", "train.ckpt_every=2", "train.keep_last=4", "train.warmup_steps=1",
        "train.zero_stage=1", "ssl.threshold=0.3", "ssl.stats_ema=0.5", "ssl.start=0.25"]


@pytest.fixture(scope="module")
def pool_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ssl")
    base = [*BASE, f"run.out_dir={tmp / 'runs'}", "ssl.source=pool"]
    return _runs(tmp, base, [("full", ["train.steps=4"], None),
                             ("resumed", ["train.steps=4"], "full"),
                             ("sync", ["train.steps=4", "aug.prefetch=false"], None)])


def test_resume_at_step_k_equals_the_uninterrupted_run(pool_runs: dict) -> None:
    full, resumed = pool_runs["full"], pool_runs["resumed"]
    assert len(full["losses"]) == 4 and len(resumed["losses"]) == 2
    assert resumed["losses"] == full["losses"][2:]  # bit for bit
    assert resumed["teacher"] == full["teacher"]
    assert resumed["stats"] == full["stats"]
    assert full["stats"]["rows"] == 3 * 16  # mu = 1: one unlabelled row per labelled row, from step 2 (ssl.start)


def test_prefetch_equals_the_synchronous_path(pool_runs: dict) -> None:
    assert pool_runs["sync"]["losses"] == pool_runs["full"]["losses"]
    assert pool_runs["sync"]["stats"] == pool_runs["full"]["stats"]


def test_generator_rows_prefetch_equals_synchronous(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tiny_sd import save_tiny_sd

    tmp = tmp_path_factory.mktemp("ssl-gen")
    sd = save_tiny_sd(tmp / "sd")
    base = [*BASE, f"run.out_dir={tmp / 'runs'}", "ssl.source=generator", f"aug.model={sd}", "aug.prompt=a photo",
            "aug.steps=1", "ssl.strengths=[0.5,1.0]", "aug.gen_from_noise=true", "train.steps=2", "train.eval_every=2",
            "train.batch_size=8"]
    res = _runs(tmp, base, [("prefetch", [], None), ("sync", ["aug.prefetch=false"], None)])
    assert res["prefetch"]["losses"] == res["sync"]["losses"]
    assert res["prefetch"]["stats"] == res["sync"]["stats"] and res["prefetch"]["stats"]["rows"] == 16
