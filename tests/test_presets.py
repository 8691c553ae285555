"""Method presets (configs/*.yaml): their key values are the papers', every one trains, every real variant validates.

The table below is the reference: each row cites where its values come from. A preset that drifts from its paper
fails here, as does a new preset without a row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_sd import save_tiny_sd

from online_aug.config import METHODS, ConfigError, load_config
from online_aug.data import build_splits
from online_aug.generator import SDEditGenerator, load_sd
from online_aug.generator.finetuned import render_prompt
from online_aug.policy import target_distribution

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMOS = ["demo", "demo-hard"]  # the embedded default and its hard regime: not paper methods
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in DEMOS)
REAL = sorted((CONFIGS / "real").glob("*.yaml"))

DA_FUSION_T0 = [0.25, 0.5, 0.75, 1.0]  # DA-Fusion (Trabucco et al. 2024) Table 1, t0 ~ U{0.25, 0.5, 0.75, 1.0}
DIFF_MIX_S = [0.5, 0.7, 0.9]  # Diff-Mix (Wang et al. 2024) §3.4 / §4.2
CLASS_PROMPT = "a photo of the digit {name}"  # the class-name prompt ("a photo of a <class name>", DA-Fusion Table 1)
AGNOSTIC = "a photo"  # DA-Fusion Table 1 "Class Agnostic Prompt", the §6.1 data-centric leakage defence
# Diff-Mix §3.3: the "Diff-" presets use the fine-tuned generator (TI + rank-10 LoRA), committed for digits.
# Here: TI + LoRA on the long-tail subset over the class-agnostic pool SD (README "Long-tail benchmark").
FINETUNED = {"aug.textual_inversion": "models/ft-digits-pool-agnostic", "aug.lora": "models/ft-digits-pool-agnostic",
             "aug.model": "models/tiny-sd-digits-pool-agnostic", "aug.prompt": AGNOSTIC}
NO_AUG = {"aug.alpha": 0.0}
FIXMATCH = {"ssl.threshold": 0.95, "ssl.weight": 1.0, "ssl.thresholds": "flexmatch", "ssl.dist_align": True,
            "ssl.strong": "rand-m9-n2-mstd0.5"}

# preset -> (source, {dotted key: value the paper gives})
PAPER: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("plain cross-entropy (Diff-Mix Table 2 'CE')", {**NO_AUG, "train.label_smoothing": 0.0}),
    "baseline-randaugment": ("DA-Fusion §5: RandAugment, torchvision defaults N=2, M=9",
                             {**NO_AUG, "train.randaugment": "rand-m9-n2"}),
    "baseline-mixup-cutmix": ("Diff-Mix §7.4: CutMix 0.1 / Mixup 0.3 per batch, Beta(1,1) in the released code",
                              {**NO_AUG, "train.mixup_alpha": 1.0, "train.cutmix_alpha": 1.0, "train.mix_prob": 0.4}),
    "baseline-drw": ("Cao et al. 2019 (LDAM-DRW): re-weight from epoch 160 of 200", {**NO_AUG, "train.drw_start": 0.8}),
    "baseline-label-smoothing": ("Diff-Mix Table 9: label smoothing 0.9 confidence",
                                 {**NO_AUG, "train.label_smoothing": 0.1}),
    "baseline-cb": ("class-balanced resampling (Kang et al. 2020)", {**NO_AUG, "data.sampler": "class_balanced"}),
    "baseline-cmo": ("CMO (Park et al. 2022) §4: CutMix from a minority batch with probability 0.5",
                     {**NO_AUG, "train.cmo_prob": 0.5}),
    "baseline-upper-bound": ("CE with the generator pool's real images added",
                             {**NO_AUG, "data.train_with_pool": True}),
    "real-guidance": ("DA-Fusion Table 1: Real Guidance t0 = 0.5, alpha 0.5, class-name prompt",
                      {"aug.alpha": 0.5, "aug.strengths": [0.5], "aug.target_mode": "intra",
                       "aug.prompt": CLASS_PROMPT}),
    "real-guidance-leakage-free": ("DA-Fusion §6.1 / Table 1: class-agnostic prompt 'a photo'",
                                   {"aug.alpha": 0.5, "aug.strengths": [0.5], "aug.target_mode": "intra",
                                    "aug.prompt": AGNOSTIC}),
    "da-fusion": ("DA-Fusion §4, Table 1: intra, t0 ~ U{.25,.5,.75,1}, alpha 0.5",
                  {"aug.alpha": 0.5, "aug.strengths": DA_FUSION_T0, "aug.target_mode": "intra",
                   "aug.prompt": "a photo of the digit {token}", "aug.textual_inversion": "models/ti-digits-pool"}),
    "da-fusion-leakage-free": ("DA-Fusion §6.1: data-centric defence, prompt 'a photo of a <w_i>', no class name",
                               {"aug.alpha": 0.5, "aug.strengths": DA_FUSION_T0, "aug.target_mode": "intra",
                                "aug.prompt": "a photo of a {token}",
                                "aug.textual_inversion": "models/ti-digits-pool-leakage-free"}),
    "real-gen": ("Diff-Mix §3.4, §4.3: from scratch (s=1, from Gaussian noise), long-tail targets, replacement 0.5",
                 {"aug.alpha": 0.5, "aug.strengths": [1.0], "aug.gen_from_noise": True,
                  "aug.target_mode": "uniformize", "aug.prompt": CLASS_PROMPT}),
    "diff-gen": ("Diff-Mix §3.4: Diff-Gen = Real-Gen with the fine-tuned SD",
                 {"aug.alpha": 0.5, "aug.strengths": [1.0], "aug.gen_from_noise": True,
                  "aug.target_mode": "uniformize", **FINETUNED}),
    "diff-aug": ("Diff-Mix §3.4, §4.2: intra with the fine-tuned SD, s ~ U{.5,.7,.9}",
                 {"aug.alpha": 0.5, "aug.strengths": DIFF_MIX_S, "aug.target_mode": "intra", **FINETUNED}),
    "diff-mix": ("Diff-Mix §3.4, §4.2, Table 6: inter, s ~ U{.5,.7,.9}, gamma 0.5",
                 {"aug.alpha": 0.5, "aug.strengths": DIFF_MIX_S, "aug.target_mode": "inter",
                  "aug.target_dist": "uniform", "aug.gamma": 0.5, **FINETUNED}),
    "diff-mix-uniformize": ("Diff-Mix §4.3, §7.4: long-tail, s = 0.7, gamma 0.5, replacement 0.5, uniformized",
                            {"aug.alpha": 0.5, "aug.strengths": [0.7], "aug.target_mode": "uniformize",
                             "aug.gamma": 0.5, **FINETUNED}),
    "real-mix": ("Diff-Mix Table 2 'Real-Mix (s=0.7)'",
                 {"aug.alpha": 0.5, "aug.strengths": [0.7], "aug.target_mode": "uniformize", "aug.gamma": 0.5,
                  "aug.prompt": CLASS_PROMPT}),
    "diff-mix-cutmix": ("Diff-Mix Table 1 'Diff-Mix + Cutmix'; CutMix as its §7.4 baseline",
                        {"aug.alpha": 0.5, "aug.strengths": DIFF_MIX_S, "aug.target_mode": "inter", "aug.gamma": 0.5,
                         "train.cutmix_alpha": 1.0, "train.mix_prob": 0.1, **FINETUNED}),
    "diff-mix-lcm": ("Diff-Mix §3.4, §4.2 with LCM-LoRA's sampler (Luo et al. 2023): K = 2 LCM steps, no CFG",
                     {"aug.alpha": 0.5, "aug.strengths": DIFF_MIX_S, "aug.target_mode": "inter",
                      "aug.target_dist": "uniform", "aug.gamma": 0.5, "aug.scheduler": "lcm", "aug.steps": 2,
                      "aug.guidance_scale": 1.0, "aug.schedule": "fewstep", "aug.guard": "on", **FINETUNED}),
    "latent-perturbation": ("semantic-aug §3.1 (z0 + delta N(0,I)) on DA-Fusion's settings (§4.2)",
                            {"aug.alpha": 0.5, "aug.strengths": DA_FUSION_T0, "aug.target_mode": "intra",
                             "aug.latent_noise": 0.2}),
    "composition": ("semantic-aug §3.4: strengths {i/k}, k = 8, composed with §3.1",
                    {"aug.alpha": 0.5, "aug.strengths": [i / 8 for i in range(1, 9)], "aug.target_mode": "intra",
                     "aug.latent_noise": 0.2}),
    "object-centric-foreground": ("semantic-aug §3.3, §4.2.1 Figs 4-5: foreground masks dilated 16 px at 512, on "
                                  "DA-Fusion's settings",
                                  {"aug.alpha": 0.5, "aug.strengths": DA_FUSION_T0, "aug.target_mode": "intra",
                                   "aug.mask_mode": "foreground"}),
    "object-centric-background": ("semantic-aug §3.3, §4.2.1 Figs 4-5: the inverted (dilated) foreground mask",
                                  {"aug.alpha": 0.5, "aug.strengths": DA_FUSION_T0, "aug.target_mode": "intra",
                                   "aug.mask_mode": "background"}),
    # FixMatch (Sohn et al. 2020) tau 0.95, lambda_u 1, RandAugment; FlexMatch thresholds; ReMixMatch alignment
    "ssl-real-pool": ("FixMatch + FlexMatch + ReMixMatch DA on the pool's real images, labels dropped",
                      {**NO_AUG, **FIXMATCH, "ssl.source": "pool"}),
    "ssl-gen": ("FixMatch + FlexMatch + ReMixMatch DA on class-free SD samples from noise (DPT's setting)",
                {**NO_AUG, **FIXMATCH, "ssl.source": "generator", "aug.gen_from_noise": True, "ssl.strengths": [1.0],
                 "aug.prompt": AGNOSTIC, "aug.model": "models/tiny-sd-digits-pool-agnostic",
                 "aug.textual_inversion": "", "aug.lora": ""}),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---------------------------------------------------------------- values


def test_every_preset_has_a_paper_row():
    assert set(PRESETS) == set(PAPER), "add the new preset (and its source) to PAPER, or remove the stale row"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_values_are_the_papers(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    source, expected = PAPER[name]
    for key, value in expected.items():
        got = _get(cfg, key)
        assert got == (pytest.approx(value) if isinstance(value, (float, list)) else value), (
            f"{name}: {key} = {got!r}, but {source} says {value!r}")
    assert cfg.aug.method in METHODS
    if name != "baseline":  # baseline.yaml predates aug.method
        assert cfg.aug.method == name
    # the shared digits-LT budget: differences come from the method alone
    assert (cfg.data.dataset, cfg.data.imbalance_ratio, cfg.data.split_seed) == ("digits", 100, 0)
    assert (cfg.data.val_per_class, cfg.data.pool_fraction) == (10, 0.5)  # the benchmark's split protocol
    assert (cfg.train.steps, cfg.train.batch_size, cfg.model.name) == (300, 64, "resnet10t")
    header = (CONFIGS / f"{name}.yaml").read_text().splitlines()[0]
    assert header.startswith("#"), f"{name}.yaml must open with a comment citing its paper"


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_variants_validate_and_keep_the_method_values(path):
    cfg = load_config(path)
    cfg.validate(cuda_available=True)
    assert cfg.data.dataset in ("cifar10", "cifar100", "imagefolder")
    assert (cfg.data.many_threshold, cfg.data.few_threshold) == (100, 20)  # the LT literature's many/few split
    preset = next(n for n in sorted(PAPER, key=len, reverse=True) if path.stem.startswith(n + "-"))
    digits = load_config(CONFIGS / f"{preset}.yaml")
    for key in ("aug.method", "aug.alpha", "aug.strengths", "aug.target_mode", "aug.gamma", "aug.latent_noise",
                "aug.gen_from_noise", "aug.mask_mode",
                "train.mixup_alpha", "train.cutmix_alpha", "train.label_smoothing", "train.drw_start"):
        assert _get(cfg, key) == _get(digits, key), f"{path.name}: {key} differs from configs/{preset}.yaml"
    if cfg.aug.alpha > 0:
        assert cfg.aug.model != "models/tiny-sd-digits"
        if "leakage-free" in path.stem:  # leakage-free stays class-agnostic
            assert "{name}" not in cfg.aug.prompt and "{name}" not in digits.aug.prompt


DIFF_MIX_FAMILY = ["real-gen", "diff-gen", "diff-aug", "diff-mix", "diff-mix-cutmix", "diff-mix-uniformize", "real-mix"]


@pytest.mark.parametrize("name", DIFF_MIX_FAMILY)
def test_diff_mix_real_variants_use_its_sampler(name):
    """Diff-Mix Table 7: DPM-Solver++ with T = 25 inference steps (img2img semantics: the grid)."""
    cfg = load_config(CONFIGS / "real" / f"{name}-cifar10lt-sd15.yaml")
    assert (cfg.aug.scheduler, cfg.aug.solver_order, cfg.aug.schedule, cfg.aug.grid_steps) == (
        "dpmsolver++", 2, "grid", 25)


def test_every_preset_has_a_real_variant():
    stems = [p.stem for p in REAL]
    for name in PRESETS:
        assert any(s == f"{name}-cifar10lt" or s.startswith(f"{name}-cifar10lt-") for s in stems), name


# ---------------------------------------------------------------- every preset trains

RUNNER = r"""
import csv, json, sys, traceback
from online_aug.config import load_config
from online_aug.trainer import Trainer
out, overrides, paths = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
results = {}
for path in paths:
    name = path.rsplit("/", 1)[-1][:-5]
    try:
        # the random tiny SD has no learned tokens: a {token} prompt falls back to the class name, and a prompt the
        # tokens would have completed ("a photo") names the class itself (one prompt for every class is refused)
        prompt = load_config(path).aug.prompt
        named = prompt.replace('{token}', '{name}') if "{" in prompt else f"{prompt} {{name}}"
        extra = [f"aug.prompt={named}"] if named != prompt else []
        cfg = load_config(path, overrides + extra + [f"run.name={name}"])
        trainer = Trainer(cfg, show_progress=False)
        metrics = trainer.fit()
        with open(trainer.run_dir / "summary.csv") as f:
            rows = list(csv.DictReader(f))
        results[name] = {"ok": True, "top1": metrics["top1"], "alpha": cfg.aug.alpha,
                         "effective_alpha": float(rows[-1].get("aug/effective_alpha") or 0)}
    except Exception:
        results[name] = {"ok": False, "error": traceback.format_exc()}
json.dump(results, open(out, "w"))
"""


@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory) -> dict[str, Any]:
    """All presets, 2 steps each, in one subprocess (one DeepSpeed start) with a random tiny SD."""
    tmp = tmp_path_factory.mktemp("presets")
    sd = save_tiny_sd(tmp / "sd")
    overrides = [f"run.out_dir={tmp / 'runs'}", "train.steps=2", "train.batch_size=8", "train.eval_every=2",
                 "train.log_every=1", "train.warmup_steps=1", "data.image_size=16", "aug.steps=1",
                 "aug.image_every=0", "aug.queue_depth=1", f"aug.model={sd}",
                 # learned tokens / LoRA belong to the committed tiny SD, not to this random one (a mismatch is an
                 # error by design); test_finetuned_presets_load_their_generator covers them
                 "aug.textual_inversion=", "aug.lora=",
                 # the random tiny SD draws no class: the guard would (rightly) turn every edit off; here the preset's
                 # pipeline is under test (the guard's own tests: tests/test_guard.py)
                 "aug.guard=off", "aug.audit=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["HF_HUB_OFFLINE"] = "1"
    out = tmp / "results.json"
    paths = [str(CONFIGS / f"{n}.yaml") for n in [*PRESETS, *DEMOS]]
    r = subprocess.run([sys.executable, "-c", RUNNER, str(out), json.dumps(overrides), *paths], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0 and out.is_file(), r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", [*PRESETS, *DEMOS])
def test_preset_trains_a_few_steps(preset_runs, name):
    res = preset_runs[name]
    assert res["ok"], res.get("error")
    assert 0 <= res["top1"] <= 1
    # wait starvation and a finite tiny SD: the edited fraction is exactly the preset's alpha
    assert res["effective_alpha"] == pytest.approx(res["alpha"])


@pytest.mark.parametrize("name", sorted(n for n, (_, v) in PAPER.items() if v.get("aug.textual_inversion")))
def test_finetuned_presets_load_their_generator(name):
    """A preset that points at committed learned tokens (and LoRA) loads them onto its own committed base model:
    the prompts carry the learned tokens, and the LoRA changed the UNet."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    names = build_splits(cfg.data).class_names
    gen = SDEditGenerator.from_config(cfg.aug, names, torch.device("cpu"))
    assert gen.class_prompts[3] == render_prompt(cfg.aug.prompt, "three", "<three>"), gen.class_prompts
    assert "<three>" in gen.class_prompts[3]
    if "leakage-free" in name:
        # No class name reaches the model: the learned token is one new id (its string is only a label), no id of a
        # class-name word is in any prompt, and the tokens were initialised from "a", not from the names.
        tok = gen.components.tokenizer
        name_ids = {i for n in names for i in tok.encode(n, add_special_tokens=False)}
        for prompt in gen.class_prompts:
            assert not name_ids & set(tok.encode(prompt, add_special_tokens=False)), prompt
        manifest = json.loads((Path(cfg.aug.textual_inversion) / "manifest.json").read_text())
        assert set(manifest["init_words"]) == {"a"}
    if cfg.aug.lora:
        plain = load_sd(cfg.aug.model, torch.device("cpu"), torch.float32).unet.state_dict()
        tuned = gen.components.unet.state_dict()
        changed = [k for k in plain if not torch.equal(plain[k], tuned[k])]
        assert changed and all("attn" in k for k in changed), changed[:5]


# ---------------------------------------------------------------- bad input


def _preset_with(tmp_path: Path, name: str, **aug: Any) -> Path:
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    data.setdefault("aug", {}).update(aug)
    path = tmp_path / f"{name}-bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_method_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="aug.method='diff-mixx' is unknown.*diff-mix"):
        load_config(_preset_with(tmp_path, "diff-mix", method="diff-mixx"))


def test_unknown_target_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="aug.target_mode: 'uniform' is not one of"):
        load_config(_preset_with(tmp_path, "diff-mix", target_mode="uniform"))
    with pytest.raises(ConfigError, match="aug.target_dist"):
        load_config(_preset_with(tmp_path, "diff-mix", target_dist="balanced"))


def test_uniformize_without_long_tail_counts_is_a_config_error():
    cfg = load_config(CONFIGS / "diff-mix-uniformize.yaml")
    with pytest.raises(ConfigError, match="uniformize needs the training class counts"):
        target_distribution(cfg.aug, None, 10)
    with pytest.raises(ConfigError, match="uniformize needs the long-tail training class counts"):
        target_distribution(cfg.aug, [0] * 10, 10)
    inverse = load_config(CONFIGS / "diff-mix.yaml", ["aug.target_dist=inverse"])
    with pytest.raises(ConfigError, match="target_dist=inverse needs the training class counts"):
        target_distribution(inverse.aug, None, 10)


@pytest.mark.parametrize("overrides, match", [
    (["train.label_smoothing=0.1"], "label_smoothing conflicts with Mixup/CutMix"),
    (["train.batch_size=9"], "even micro-batch"),
    (["train.batch_size=16", "train.micro_batch_size=3"], "micro_batch_size=3 does not divide"),
    (["train.mix_prob=1.5"], "train.mix_prob must be in"),
    (["train.cutmix_alpha=-1"], "must be >= 0"),
])
def test_mixing_that_conflicts_with_the_label_format_is_a_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "diff-mix-cutmix.yaml", overrides)


def test_preset_with_unknown_key_names_it(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'aug.strenght'"):
        load_config(_preset_with(tmp_path, "da-fusion", strenght=[0.5]))
