"""aug.reuse (the in-memory reuse ring, bit-exact on resume) and aug.safety_checker (re-sample once, then real)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_prefetch import CPU, FakeGenerator, TinyData, _loader

from online_aug.augment import Augmenter
from online_aug.config import AugConfig, Config, ConfigError, load_config
from online_aug.policy import AugPolicy
from online_aug.sources import SyncAugmentedSource, _rebuild_reuse_ring


class CountingGenerator(FakeGenerator):
    def __init__(self):
        super().__init__()
        self.images = 0

    def edit(self, images, strengths, targets, generator=None, **kw):
        self.images += len(images)
        return super().edit(images, strengths, targets, generator)


def _augmenter(gen, reuse=1, safety=None, alpha=0.5):
    cfg = AugConfig(alpha=alpha, strengths=[0.5, 0.9], target_mode="inter")
    return Augmenter(AugPolicy(cfg, 4, [16, 16, 16, 16]), gen, CPU, seed=7, rank=0, class_names=list("abcd"),
                     reuse=reuse, safety=safety)


def _run(reuse, steps=9, start=0, rebuild=False):
    gen = CountingGenerator()
    aug = _augmenter(gen, reuse)
    if rebuild:
        cfg = Config()
        cfg.aug.reuse, cfg.run.seed = reuse, 1  # the loader seed of test_prefetch._loader
        _rebuild_reuse_ring(aug, cfg, SimpleNamespace(train=TinyData()), CPU, 0, 1, 8, start)
    src = SyncAugmentedSource(_loader(start), aug, CPU, start=start)
    return [next(src) for _ in range(steps - start)], gen


def _slots(batch):
    return (batch.edit_target >= 0).nonzero().flatten()  # positions of the edits, in plan (slot) order


def test_reuse_uses_each_edit_in_k_consecutive_steps_and_cuts_generation():
    k = 3
    batches, gen = _run(k)
    for i, b in enumerate(batches):
        assert b.stats["aug/effective_alpha"] == 0.5  # reused edits count as edits
        pos = _slots(b)
        assert len(pos) == 4
        for j in range(4):
            lag = (i + j) % k
            if lag and i - lag >= 0:  # slot j reuses the edit made in slot j of step i - lag: image and label
                made = batches[i - lag]
                p, q = pos[j], _slots(made)[j]
                assert torch.equal(b.images[p], made.images[q])
                assert torch.equal(b.targets[p], made.targets[q])
                assert b.edit_target[p] == made.edit_target[q]
    fresh = [b.stats["aug/fresh_edits"] for b in batches]
    assert fresh[0] == 4 and sum(fresh) == gen.images
    assert sum(fresh[k:]) == pytest.approx(4 * (len(batches) - k) / k, abs=2)  # ~1/k of the edits generated
    assert all(b.stats["aug/fresh_edits"] + b.stats["aug/reused_edits"] == 4 for b in batches)
    plain, plain_gen = _run(1)
    assert plain_gen.images == 4 * len(plain) and all(b.stats["aug/reused_edits"] == 0 for b in plain)
    assert torch.equal(plain[0].images, batches[0].images)  # step 0 has nothing to reuse


def test_resume_with_reuse_is_bit_exact():
    full, _ = _run(3, steps=9)
    resumed, _ = _run(3, steps=9, start=5, rebuild=True)
    for a, b in zip(full[5:], resumed):
        assert a.micro_step == b.micro_step
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.edit_target, b.edit_target)
    cold, _ = _run(3, steps=9, start=5)  # without the rebuilt ring the reused slots fall back to real images
    assert not torch.equal(cold[0].images, full[5].images)
    assert cold[0].stats["aug/effective_alpha"] < 0.5


@pytest.mark.parametrize("overrides, match", [
    (["aug.reuse=0"], r"aug\.reuse must be >= 1"),
    (["aug.reuse=2", "aug.exact_alpha=false"], r"aug\.reuse > 1 .*aug\.exact_alpha=true"),
    (["aug.reuse=2", "aug.alpha=0.5", "aug.adaptive=true"], r"aug\.reuse > 1 .*aug\.adaptive"),
    (["aug.scheduler=dpmsolver++", "aug.solver_order=3"], r"aug\.solver_order=3: .*orders 1 and 2"),
    (["aug.solver_order=1"], r"aug\.solver_order=1 applies to aug\.scheduler=dpmsolver\+\+ only"),
    (["aug.prompt_file=no/such/prompts.txt"], r"aug\.prompt_file='no/such/prompts\.txt' is not a file"),
    (["aug.alpha=0.5", "aug.gen_from_noise=true"], r"aug\.gen_from_noise=true .*no strength is 1"),
])
def test_bad_keys_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- safety checker


class FlagFirstCalls:
    """A fake checker: flags every image for the first ``n`` calls, then none (deterministic)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, images):
        self.calls += 1
        return torch.full((len(images),), self.calls <= self.n)


def test_flagged_edits_are_resampled_once_then_fall_back_to_real():
    x, y = next(iter(_loader()))
    clean = _augmenter(CountingGenerator())(x, y, micro_step=0)
    gen = CountingGenerator()
    once = _augmenter(gen, safety=FlagFirstCalls(1))(x, y, micro_step=0)
    assert gen.images == 8 and once.stats["aug/unsafe_resampled"] == 4 and once.stats["aug/unsafe_dropped"] == 0
    assert once.stats["aug/effective_alpha"] == 0.5
    pos = _slots(clean)
    assert not torch.equal(once.images[pos], clean.images[pos])  # the re-sample drew fresh noise
    assert torch.equal(once.targets, clean.targets)  # same plan, same labels

    always = _augmenter(CountingGenerator(), safety=FlagFirstCalls(99))(x, y, micro_step=0)
    assert always.stats["aug/unsafe_dropped"] == 4 and always.stats["aug/effective_alpha"] == 0.0
    assert torch.equal(always.images, x)
    assert torch.equal(always.targets, torch.nn.functional.one_hot(y, 4).float())

    never = FlagFirstCalls(0)
    gen = CountingGenerator()
    b = _augmenter(gen, safety=never)(x, y, micro_step=0)
    assert gen.images == 4 and never.calls == 1 and torch.equal(b.images, clean.images)


def _save_tiny_checker(folder, weight):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=99),
                     vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(cfg)
    # the thresholds decide: cosine - weight > 0 flags, so -2 flags every image and 2 none
    checker.concept_embeds_weights.data.fill_(weight)
    checker.special_care_embeds_weights.data.fill_(2.0)
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")


def test_safety_checker_loads_from_the_model_folder_and_flags(tmp_path):
    from online_aug.generator.safety import load_safety_checker

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    _save_tiny_checker(tmp_path / "flags", -2.0)
    flags = load_safety_checker("model", str(tmp_path / "flags"), CPU, torch.float32)
    assert flags(images).tolist() == [True, True, True]
    _save_tiny_checker(tmp_path / "passes", 2.0)
    passes = load_safety_checker(str(tmp_path / "passes" / "safety_checker"), "unused", CPU, torch.float32)
    assert passes(images).tolist() == [False, False, False]
    with pytest.raises(ConfigError, match=r"aug\.safety_checker='model': no StableDiffusionSafetyChecker"):
        load_safety_checker("model", str(tmp_path / "passes" / "feature_extractor"), CPU, torch.float32)
    with pytest.raises(ConfigError, match=r"aug\.safety_checker='\./missing/checker': no such folder"):
        load_safety_checker("./missing/checker", "unused", CPU, torch.float32)
