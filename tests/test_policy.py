"""The augmentation policy: α fraction, target distributions, soft labels (Diff-Mix eq. 3), water-filling."""

import numpy as np
import pytest
import torch
from scipy import stats

from online_aug.config import AugConfig, ConfigError, load_config
from online_aug.policy import AugPolicy, step_rng, target_distribution, uniformize_targets


def _policy(num_classes=10, counts=None, **kw):
    return AugPolicy(AugConfig(**kw), num_classes, counts)


def test_exact_alpha_fraction_and_positions():
    p = _policy(alpha=0.25)
    labels = torch.arange(64) % 10
    plan = p.plan(labels, step_rng(0, 0, 0))
    assert plan.num_edits == 16
    assert len(set(plan.index.tolist())) == 16 and plan.index.max() < 64
    assert torch.equal(plan.source, labels[plan.index])
    unedited = torch.ones(64, dtype=torch.bool)
    unedited[plan.index] = False
    assert torch.equal(plan.soft_label[unedited], torch.nn.functional.one_hot(labels[unedited], 10).float())


def test_bernoulli_alpha_is_right_on_average():
    p = _policy(alpha=0.3, exact_alpha=False)
    labels = torch.zeros(100, dtype=torch.long)
    n = [p.plan(labels, step_rng(1, 0, k)).num_edits for k in range(200)]
    assert abs(np.mean(n) / 100 - 0.3) < 0.01
    assert len(set(n)) > 5  # really random per batch


def test_soft_label_diff_mix_eq3():
    p = _policy(num_classes=3, alpha=1.0, strengths=[0.7], gamma=0.5, target_mode="inter")
    labels = torch.zeros(200, dtype=torch.long)
    plan = p.plan(labels, step_rng(0, 0, 0))
    inter = plan.target != plan.source
    assert inter.any()
    rows = plan.soft_label[plan.index[inter]]
    assert torch.allclose(rows[:, 0], torch.full_like(rows[:, 0], 0.163), atol=5e-4)  # 1 - 0.7^0.5
    tgt = rows.gather(1, plan.target[inter][:, None]).squeeze(1)
    assert torch.allclose(tgt, torch.full_like(tgt, 0.837), atol=5e-4)
    assert torch.allclose(plan.soft_label.sum(1), torch.ones(200))
    same = plan.soft_label[plan.index[~inter]]  # a drawn target equal to the source stays a hard label
    assert torch.equal(same, torch.nn.functional.one_hot(plan.source[~inter], 3).float())


def test_intra_keeps_hard_labels_and_strength_set():
    p = _policy(alpha=0.5, target_mode="intra", strengths=[0.25, 0.5, 0.75, 1.0])
    labels = torch.arange(40) % 10
    plan = p.plan(labels, step_rng(0, 0, 3))
    assert torch.equal(plan.target, plan.source)
    assert torch.equal(plan.soft_label, torch.nn.functional.one_hot(labels, 10).float())
    assert set(plan.strength.tolist()) <= {0.25, 0.5, 0.75, 1.0}


def test_strength_range():
    p = _policy(alpha=1.0, strength_range=[0.3, 0.6])
    s = p.plan(torch.zeros(500, dtype=torch.long), step_rng(0, 0, 0)).strength
    assert s.min() >= 0.3 and s.max() <= 0.6 and s.std() > 0.05


@pytest.mark.parametrize("dist", ["uniform", "inverse"])
def test_targets_follow_requested_distribution(dist):
    counts = [100, 60, 30, 10, 5]
    p = _policy(num_classes=5, counts=counts, alpha=1.0, target_mode="inter", target_dist=dist, beta=1.0)
    labels = torch.zeros(4000, dtype=torch.long)
    tgt = p.plan(labels, step_rng(0, 0, 0)).target
    observed = np.bincount(tgt.numpy(), minlength=5)
    expected_p = np.full(5, 0.2) if dist == "uniform" else (1 / np.array(counts)) / (1 / np.array(counts)).sum()
    assert stats.chisquare(observed, expected_p * len(tgt)).pvalue > 0.01
    if dist == "inverse":  # and it is clearly not uniform
        assert stats.chisquare(observed, np.full(5, len(tgt) / 5)).pvalue < 1e-6


def test_uniformize_flattens_when_alpha_allows():
    counts = np.array([400, 200, 100, 50, 25])
    pi = counts / counts.sum()
    alpha = 0.9
    q = uniformize_targets(counts, alpha)
    mix = (1 - alpha) * pi + alpha * q
    assert np.allclose(q.sum(), 1) and (q >= 0).all()
    assert np.allclose(mix, 0.2)


def test_uniformize_water_fills_when_alpha_is_small():
    counts = np.array([400, 200, 100, 50, 25])
    pi = counts / counts.sum()
    alpha = 0.2
    q = uniformize_targets(counts, alpha)
    mix = (1 - alpha) * pi + alpha * q
    assert np.allclose(q.sum(), 1) and (q >= 0).all()
    assert q[0] == 0  # the head is already above the water level: no synthetic targets
    level = mix.min()
    filled = q > 0
    assert np.allclose(mix[filled], level)  # every class that gets targets is lifted to one level
    assert (mix[~filled] >= level - 1e-12).all()
    # no other distribution over targets makes the minimum class mass higher
    assert level >= ((1 - alpha) * pi + alpha * np.eye(5)[4]).min() - 1e-12


def test_uniformize_needs_counts_and_bad_mode():
    with pytest.raises(ConfigError, match="uniformize"):
        target_distribution(AugConfig(target_mode="uniformize", alpha=0.5), None, 5)
    # an unknown mode is the config's to refuse (validated once, at load), not the policy's
    with pytest.raises(ConfigError, match="aug.target_mode"):
        load_config(None, ["aug.target_mode=bogus"])


def test_step_rng_is_a_function_of_seed_rank_step():
    a = torch.rand(4, generator=step_rng(3, 1, 7))
    assert torch.equal(a, torch.rand(4, generator=step_rng(3, 1, 7)))
    assert not torch.equal(a, torch.rand(4, generator=step_rng(3, 0, 7)))
    assert not torch.equal(a, torch.rand(4, generator=step_rng(3, 1, 8)))
    assert not torch.equal(a, torch.rand(4, generator=step_rng(4, 1, 7)))


def test_prompt_templates_are_drawn_per_edit_after_everything_else():
    """Prompt diversity: each edit draws a template with the step RNG; with one template nothing is drawn, and the
    rest of the plan is the same either way (the draw comes last)."""
    labels = torch.arange(64) % 10
    one = _policy(alpha=0.5).plan(labels, step_rng(0, 0, 3))
    many = AugPolicy(AugConfig(alpha=0.5), 10, None, num_templates=3).plan(labels, step_rng(0, 0, 3))
    assert one.template is None
    for field in ("index", "strength", "source", "target", "soft_label"):
        assert torch.equal(getattr(one, field), getattr(many, field)), field
    assert many.template.shape == (32,) and set(many.template.tolist()) == {0, 1, 2}
    again = AugPolicy(AugConfig(alpha=0.5), 10, None, num_templates=3).plan(labels, step_rng(0, 0, 3))
    assert torch.equal(again.template, many.template)  # a function of (seed, rank, step)
    other = AugPolicy(AugConfig(alpha=0.5), 10, None, num_templates=3).plan(labels, step_rng(0, 0, 4))
    assert not torch.equal(other.template, many.template)


def test_calibrated_labels_scale_the_target_weight(tmp_path):
    """aug.label_rates: target weight s^gamma * rate(target); rate 1 everywhere is Diff-Mix eq. 3 exactly."""
    import json

    from online_aug.policy import read_label_rates

    rates = {str(c): (0.1 * c if c % 2 else 1.0) for c in range(10)}
    f = tmp_path / "rates.json"
    f.write_text(json.dumps({"target_rate": rates}))
    r = read_label_rates(str(f), 10)
    labels = torch.arange(40) % 10
    cfg = AugConfig(alpha=1.0, strengths=[0.5, 0.9], gamma=0.5)
    plain = AugPolicy(cfg, 10).plan(labels, step_rng(0, 0, 3))
    cal = AugPolicy(cfg, 10, label_rates=r).plan(labels, step_rng(0, 0, 3))
    assert torch.equal(plain.target, cal.target) and torch.equal(plain.strength, cal.strength)  # same draws
    changed = plain.source != plain.target
    assert changed.sum() > 10
    for k in torch.nonzero(changed).flatten().tolist():
        i, s, t = plain.index[k], plain.strength[k], plain.target[k]
        w = float(s) ** 0.5 * float(r[t])
        assert cal.soft_label[i, t] == pytest.approx(w, abs=1e-6)
        assert cal.soft_label[i, plain.source[k]] == pytest.approx(1 - w, abs=1e-6)
        if float(r[t]) == 1.0:
            assert torch.allclose(cal.soft_label[i], plain.soft_label[i])
    assert torch.allclose(cal.soft_label.sum(1), torch.ones(40))


def test_label_rates_bad_files(tmp_path):
    from online_aug.policy import read_label_rates

    with pytest.raises(ConfigError, match="aug.label_rates.*tools/edit_rates.py"):
        read_label_rates(str(tmp_path / "missing.json"), 10)
    f = tmp_path / "short.json"
    f.write_text('{"target_rate": {"0": 0.5}}')
    with pytest.raises(ConfigError, match="each of the 10 classes"):
        read_label_rates(str(f), 10)
    f.write_text('{"target_rate": {"0": 1.5, "1": 0.5}}')
    with pytest.raises(ConfigError, match="outside"):
        read_label_rates(str(f), 2)


def test_frequency_weighted_sources_edit_head_images_and_keep_tail_ones_real():
    """aug.source_weight=frequency: image i is a source with weight n_(class of i); the count stays round(alpha*B)."""
    counts = [56] + [1] * 9
    p = _policy(alpha=0.25, counts=counts, source_weight="frequency")
    labels = torch.arange(64) % 10  # 7 head images, 57 tail images per batch
    src = torch.cat([p.plan(labels, step_rng(0, 0, k)).source for k in range(200)])
    assert len(src) == 200 * 16
    head_share = float((src == 0).float().mean())
    # without replacement: all 7 head images are (nearly) always drawn first, the rest come from the tail
    assert head_share > 0.40 and head_share == pytest.approx(7 / 16, abs=0.02)
    uniform = torch.cat([_policy(alpha=0.25, counts=counts).plan(labels, step_rng(0, 0, k)).source
                         for k in range(200)])
    assert float((uniform == 0).float().mean()) == pytest.approx(7 / 64, abs=0.02)
    bern = _policy(alpha=0.25, counts=counts, source_weight="frequency", exact_alpha=False)
    n = [bern.plan(labels, step_rng(1, 0, k)).num_edits for k in range(200)]
    assert abs(np.mean(n) - 16) < 2.5  # Bernoulli: alpha*B on average (head probabilities capped at 1)
    with pytest.raises(ConfigError, match="aug.source_weight"):
        load_config(None, ["aug.source_weight=tail"])
