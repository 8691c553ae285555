"""The generator audit and the guard: what the audit measures, what the policy does with its verdict, and what a run
does end to end (every class off: the baseline's batches bit for bit; guard off: the edits as before the guard,
with a warning), plus the label correction's arithmetic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from online_aug.audit import audit_generator
from online_aug.augment import AUDIT_PER_CLASS, guard_bank
from online_aug.config import ConfigError, load_config
from online_aug.data import build_splits
from online_aug.losses import correct_labels
from online_aug.monitor import read_summary
from online_aug.policy import AugPolicy

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    cfg = load_config("configs/diff-mix.yaml", ["aug.audit_edits=12"])
    splits = build_splits(cfg.data, None)
    bank = guard_bank(splits.train, splits.num_classes, AUDIT_PER_CLASS)
    pool = guard_bank(splits.pool, splits.num_classes, 200)  # real images the classifier never sees
    return cfg, splits, bank, pool


class _Editor:
    """Stand-ins for generators, by what they return for an edit toward class c."""

    def __init__(self, kind: str, bank: list[torch.Tensor], pool: list[torch.Tensor]):
        self.kind, self.bank, self.pool = kind, bank, pool

    def edit(self, images, strengths, targets, generator=None):
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        out = []
        for x, c in zip(images, targets.tolist()):
            if self.kind == "knows":  # a new, varied image of the class (as a generator that knows it draws)
                out.append(self.pool[c][torch.randint(len(self.pool[c]), (1,), generator=g)][0])
            elif self.kind == "copies":  # the class's first training image, learned by heart
                out.append(self.bank[c][0])
            else:  # "ignores": the source comes back (the prompt does not move it)
                out.append(x)
        return torch.stack(out), torch.ones(len(out), dtype=torch.bool)


@pytest.mark.parametrize("kind, helps", [("knows", True), ("copies", False), ("ignores", False)])
def test_audit_tells_a_generator_that_knows_the_classes_from_one_that_copies_or_ignores(digits, kind, helps):
    cfg, splits, bank, pool = digits
    audit = audit_generator(cfg, _Editor(kind, bank, pool), bank, splits.class_names,
                            splits.train.class_counts(), CPU)
    allowed = audit.allowed
    if helps:
        assert allowed.float().mean() >= 0.8, audit.table()
    else:
        assert not allowed.any(), audit.table()
    if kind == "copies":
        assert all(c.copy_share == 1.0 and c.spread < 0.05 for c in audit.classes)
    if kind == "ignores":
        assert np.mean([c.target_rate for c in audit.classes]) < 0.3


def test_audit_says_how_well_its_judge_knows_each_class_without_changing_a_verdict(digits):
    cfg, splits, bank, pool = digits
    args = (cfg, _Editor("ignores", bank, pool), bank, splits.class_names, splits.train.class_counts(), CPU)
    plain = audit_generator(*args)
    audit = audit_generator(*args, held_out=pool)
    assert [c.helps for c in audit.classes] == [c.helps for c in plain.classes]
    assert all(np.isnan(c.judge_recall) for c in plain.classes)
    recall = [c.judge_recall for c in audit.classes]
    assert all(0.0 <= r <= 1.0 for r in recall)
    # the judge fit on 56 images of a class knows real ones far better than the one fit on a single image
    counts = splits.train.class_counts()
    many, single = int(np.argmax(counts)), [c for c, n in enumerate(counts) if n == 1]
    assert recall[many] > max(recall[c] for c in single)
    weak = [c for c in audit.classes if not c.helps and c.judge_recall < 0.5 and "does not draw" in c.why]
    table = audit.table()
    assert weak and "(real)" in table and "uncertain: the judge calls only" in table  # "one": a 1-image class


def test_a_judge_fit_on_a_richer_bank_measures_the_generator_not_its_one_training_image(digits):
    """``judge_bank`` (tools/distill_lcm.py --eval-judge pool): a generator that draws new real instances of every
    class scores on the 1-image classes what it draws, not what a judge fit on one image can recognise; the edits'
    sources and the copy measure stay the training bank's."""
    cfg, splits, bank, pool = digits
    draws, fit = [x[1::2] for x in pool], [x[0::2] for x in pool]  # the judge never sees the drawn images
    args = (cfg, _Editor("knows", bank, draws), bank, splits.class_names, splits.train.class_counts(), CPU)
    plain, rich = audit_generator(*args), audit_generator(*args, judge_bank=fit)
    single = [c for c, n in enumerate(splits.train.class_counts()) if n == 1]
    assert np.mean([rich.classes[c].target_rate for c in single]) > np.mean(
        [plain.classes[c].target_rate for c in single]) + 0.2, (plain.table(), rich.table())
    assert min(c.target_rate for c in rich.classes) >= 0.7, rich.table()
    assert [c.copy_share for c in rich.classes] == [c.copy_share for c in plain.classes]
    assert "not the training split" in rich.judge and "(training split)" in plain.judge


def test_audit_leaves_the_run_random_streams_alone(digits):
    cfg, splits, bank, pool = digits
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    audit_generator(cfg, _Editor("knows", bank, pool), bank, splits.class_names, splits.train.class_counts(), CPU)
    assert torch.equal(torch.rand(4), want)


def test_guarded_policy_draws_targets_only_among_allowed_classes() -> None:
    cfg = load_config("configs/diff-mix.yaml", ["aug.alpha=0.5", "aug.guard_fallback=source"]).aug
    counts = [50, 30, 10, 5, 1]
    labels = torch.randint(5, (4096,), generator=torch.Generator().manual_seed(0))
    allowed = torch.tensor([False, True, False, True, False])
    plan = AugPolicy(cfg, 5, counts, allowed=allowed).plan(labels, torch.Generator().manual_seed(1))
    free = AugPolicy(cfg, 5, counts).plan(labels, torch.Generator().manual_seed(1))
    assert set(plan.target.tolist()) == {1, 3}
    # exactly the unguarded plan's edits toward the allowed classes; the others stay real rows (one-hot)
    keep = allowed[free.target]
    assert torch.equal(plan.index, free.index[keep]) and torch.equal(plan.strength, free.strength[keep])
    assert torch.equal(plan.soft_label[plan.index], free.soft_label[free.index[keep]])
    dropped = free.index[~keep]
    assert torch.equal(plan.soft_label[dropped], torch.nn.functional.one_hot(labels[dropped], 5).float())
    # all allowed (or no guard): exactly the unguarded plan, bit for bit
    every = torch.ones(5, dtype=torch.bool)
    a = AugPolicy(cfg, 5, counts, allowed=every).plan(labels, torch.Generator().manual_seed(1))
    b = AugPolicy(cfg, 5, counts).plan(labels, torch.Generator().manual_seed(1))
    assert torch.equal(a.target, b.target) and torch.equal(a.soft_label, b.soft_label)
    # intra-class edits of a class the generator cannot help stay real rows
    intra = load_config("configs/da-fusion.yaml").aug
    p = AugPolicy(intra, 5, counts, allowed=allowed).plan(labels, torch.Generator().manual_seed(1))
    assert set(p.source.tolist()) <= {1, 3} and torch.equal(p.source, p.target)


def test_guard_fallback_target_turns_each_refused_edit_into_a_real_image_of_its_target(digits) -> None:
    from online_aug.augment import Augmenter, RealRefill

    cfg = load_config("configs/diff-mix.yaml", ["aug.alpha=0.5", "aug.guard_min_share=0",
                                                "aug.guard_fallback=target"]).aug
    counts = [50, 30, 10, 5, 0]  # class 4 has no training image: nothing to refill it with
    labels = torch.randint(4, (4096,), generator=torch.Generator().manual_seed(0))
    allowed = torch.tensor([False, True, False, True, False])
    plan = AugPolicy(cfg, 5, counts, allowed=allowed).plan(labels, torch.Generator().manual_seed(1))
    src = AugPolicy(load_config("configs/diff-mix.yaml", ["aug.alpha=0.5", "aug.guard_fallback=source"]).aug, 5,
                    counts, allowed=allowed).plan(labels, torch.Generator().manual_seed(1))
    free = AugPolicy(cfg, 5, counts).plan(labels, torch.Generator().manual_seed(1))
    # the edits are the fallback=source plan's, bit for bit; every refused edit with a refillable class is refilled
    assert torch.equal(plan.index, src.index) and torch.equal(plan.strength, src.strength)
    assert torch.equal(plan.target, src.target)
    refused = ~allowed[free.target] & (torch.tensor(counts)[free.target] > 0)
    assert torch.equal(plan.refill_index, free.index[refused])
    assert torch.equal(plan.refill_class, free.target[refused]) and set(plan.refill_class.tolist()) == {0, 2}
    assert torch.equal(plan.soft_label[plan.refill_index],
                       torch.nn.functional.one_hot(plan.refill_class, 5).float())
    to_empty = free.index[free.target == 4]  # class 4 refused and empty: the row stays its source, one-hot
    assert torch.equal(plan.soft_label[to_empty], torch.nn.functional.one_hot(labels[to_empty], 5).float())
    # the refused classes get at least the label mass the unguarded edits gave them (one-hot instead of s^gamma)
    assert (plan.soft_label[:, [0, 2]].sum(0) >= free.soft_label[:, [0, 2]].sum(0)).all()
    # the augmenter puts a real training image of the target class into each refilled row, and says so
    dcfg, splits, bank, pool = digits
    aug = Augmenter(AugPolicy(load_config("configs/diff-mix.yaml", ["aug.alpha=0.5", "aug.guard_min_share=0",
                                                                    "aug.guard_fallback=target"]).aug,
                              10, splits.train.class_counts(), allowed=torch.arange(10) % 2 == 1),
                    _Editor("knows", bank, pool), CPU, 0, 0, splits.class_names,
                    refill=RealRefill(splits.train, 10))
    x, y = splits.train.subset(np.arange(64)).tensors()[:2]
    y = torch.as_tensor(y).long()
    batch = aug(x, y.clone(), micro_step=3)
    refilled = (batch.labels != y).nonzero().flatten()
    assert batch.stats["aug/guard_refills"] > 0 and len(refilled) > 0
    for i in range(len(x)):
        hard = int(batch.labels[i])
        if int(batch.edit_target[i]) >= 0:
            continue  # an edit toward an allowed (odd) class
        assert hard % 2 == 0 or hard == int(y[i])  # refills go to refused (even) classes only
        assert torch.equal(batch.targets[i], torch.nn.functional.one_hot(torch.tensor(hard), 10).float())
        if i in refilled.tolist():
            assert any(torch.equal(batch.images[i], b) for b in bank[hard])  # one of its class's training images
    # the default is all or nothing (equal to the baseline by construction when any class fails); the fallback
    # acts only on a partial guard
    assert load_config("configs/diff-mix.yaml").aug.guard_min_share == 1
    assert load_config("configs/diff-mix.yaml").aug.guard_fallback == "target"


def test_label_correction_moves_only_the_edited_rows() -> None:
    target = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0]])
    logits = torch.tensor([[0.0, 0.0, 9.0], [9.0, 0.0, 0.0]], requires_grad=True)
    out = correct_labels(target, logits, torch.tensor([False, True]), 0.5)
    assert torch.equal(out[0], target[0])  # a real row keeps its label
    p = torch.softmax(logits.detach(), -1)[1]
    assert torch.allclose(out[1], 0.5 * target[1] + 0.5 * p) and torch.allclose(out.sum(1), torch.ones(2))
    assert not out.requires_grad  # no gradient through the classifier's own prediction
    with pytest.raises(ConfigError, match="aug.label_correction"):
        load_config("configs/diff-mix.yaml", ["aug.label_correction=0.3", "train.mixup_alpha=0.2"])
    with pytest.raises(ConfigError, match="aug.label_correction"):
        load_config("configs/diff-mix.yaml", ["aug.label_correction=1.0"])


def test_guard_on_needs_the_audit() -> None:
    with pytest.raises(ConfigError, match="aug.audit=true"):
        load_config("configs/diff-mix.yaml", ["aug.audit=false"])
    load_config("configs/diff-mix.yaml", ["aug.audit=false", "aug.guard=off"])


# ---------------------------------------------------------------- end to end

FAST = ["train.steps=4", "train.eval_every=4", "train.log_every=1", "train.batch_size=16", "data.image_size=16",
        "model.name=test_resnet", "aug.audit_edits=3", "aug.image_every=0"]


def _run(out: Path, extra: list[str], env: dict[str, str]) -> tuple[Path, str]:
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "configs/diff-mix.yaml", *FAST,
                           f"run.out_dir={out}", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir, proc.stdout + proc.stderr


def _losses(run_dir: Path) -> list[str]:
    return [r["train/loss"] for r in read_summary(run_dir)]


@pytest.mark.slow
def test_a_guard_that_turns_every_class_off_trains_the_baseline_and_says_so(tmp_path, clean_env) -> None:
    # thresholds no generator can meet: every class off
    off, text = _run(tmp_path / "off", ["aug.guard_min_target_rate=1.0", "aug.guard_min_spread=100"], clean_env)
    assert "THE GENERATOR CANNOT HELP THIS DATA SET" in text and (off / "audit.md").is_file()
    base, _ = _run(tmp_path / "base", ["aug.alpha=0"], clean_env)
    assert _losses(off) == _losses(base)  # the baseline's batches, bit for bit
    assert all(r.get("aug/effective_alpha") in (None, "", "0") for r in read_summary(off))  # nothing generated
    # aug.guard=off: the edits as configured (identical to a run without the audit), and a one-line warning
    forced, text = _run(tmp_path / "forced", ["aug.guard=off", "aug.guard_min_target_rate=1.0"], clean_env)
    assert "warning: aug.guard=off" in text
    plain, _ = _run(tmp_path / "plain", ["aug.guard=off", "aug.audit=false"], clean_env)
    assert _losses(forced) == _losses(plain) and _losses(forced) != _losses(base)


def test_a_class_without_training_images_gets_no_edits_and_an_audit_without_two_classes_says_what_to_set(digits):
    cfg, splits, bank, pool = digits
    holed = list(bank)
    holed[3] = torch.full((1, 3, 8, 8), 1e3)  # what guard_bank holds for a class with no training image
    counts = list(splits.train.class_counts())
    counts[3] = 0
    audit = audit_generator(cfg, _Editor("knows", bank, pool), holed, splits.class_names, counts, CPU)
    assert not audit.allowed[3] and "no training image" in audit.classes[3].why
    assert audit.allowed.sum() >= 7
    with pytest.raises(ConfigError, match="aug.audit=false"):
        audit_generator(cfg, _Editor("knows", bank, pool), [bank[0], torch.full((1, 3, 8, 8), 1e3)], ["a", "b"],
                        [1, 0], CPU)


def test_audit_of_an_object_centric_generator_edits_the_whole_image(digits):
    cfg, splits, bank, pool = digits
    seen = []

    class Masked(_Editor):
        mask_mode = "background"

        def edit(self, images, strengths, targets, generator=None, masks=None):
            seen.append(masks)
            return super().edit(images, strengths, targets, generator)

    audit_generator(cfg, Masked("knows", bank, pool), bank, splits.class_names, splits.train.class_counts(), CPU)
    # background mode edits where the mask is 0: an all-zero mask is the whole image
    assert seen and all(m is not None and m.shape[1] == 1 and not m.any() for m in seen)


def test_the_guard_trains_the_baseline_when_the_helped_classes_hold_too_little_of_the_targets(digits):
    from online_aug.audit import guard_decides_baseline

    cfg, splits, bank, pool = digits
    audit = audit_generator(cfg, _Editor("knows", bank, pool), bank, splits.class_names,
                            splits.train.class_counts(), CPU)
    for c in audit.classes[:3]:  # three classes it cannot help
        c.helps = False
    uniform = torch.full((10,), 0.1)
    assert guard_decides_baseline(audit, uniform, 1.0) and audit.partial_share == pytest.approx(0.7)
    assert not guard_decides_baseline(audit, uniform, 0.6) and not audit.baseline
    tail = torch.tensor([0.5, 0.5] + [0.0] * 8)  # a rebalancing target distribution on the first two classes
    assert guard_decides_baseline(audit, tail, 0.1) and audit.partial_share == 0.0
