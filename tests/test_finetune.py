"""online_aug.sdtrain.finetune (run by tools/finetune_sd.py) and online_aug.generator.finetuned: textual inversion
(+ LoRA) learned, saved, loaded.

Most tests use the random tiny SD of tests/tiny_sd.py (its character-level tokenizer splits every class name, which
is what the initializer test needs); the learning tests use the committed models/tiny-sd-digits (which learned the
class names) and models/tiny-sd-digits-agnostic (trained with the one prompt "a photo": it never saw a class name).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from tiny_sd import build_tiny_tokenizer, save_tiny_sd

from online_aug.config import AugConfig, Config, ConfigError, load_config
from online_aug.data import Splits, build_splits
from online_aug.generator import SDEditGenerator, load_sd
from online_aug.generator.finetuned import LORA_FILE, MANIFEST, apply_finetuned
from online_aug.generator.prompts import class_prompts, render_prompt
from online_aug.sdtrain.edit_quality import edit_target_rates
from online_aug.sdtrain.finetune import FinetuneError, FinetuneOptions, evaluate, finetune, format_eval, init_embeddings
from tools import finetune_sd

ROOT = Path(__file__).resolve().parents[1]

DEMO_SD = ROOT / "models" / "tiny-sd-digits"
AGNOSTIC_SD = ROOT / "models" / "tiny-sd-digits-agnostic"
TEMPLATE = "a photo of a {token} {name}"  # Diff-Mix's "[v_i] [metaclass]" form
# The split the committed tiny SDs were built on (their build_info.json): the learning tests fine-tune on the images
# those models know, whatever split configs/demo.yaml uses today.
BUILT_ON = ["data.imbalance_ratio=20", "data.val_per_class=0", "data.pool_fraction=0"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(None, ["data.image_size=16"])


@pytest.fixture(scope="module")
def splits(cfg: Config) -> Splits:
    return build_splits(cfg.data)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def _opts(**kw: Any) -> FinetuneOptions:
    d: dict[str, Any] = dict(steps=4, batch_size=8, lr=0.05, lora_rank=2, lora_lr=0.05, warmup=1, template=TEMPLATE,
                             show_progress=False)
    d.update(kw)
    return FinetuneOptions(**d)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, cfg: Config, splits: Splits, base: Path) -> Path:
    """TI + LoRA (rank 2) after 4 steps, with a checkpoint every 2."""
    out = tmp_path_factory.mktemp("ft") / "ti-lora"
    finetune(cfg, splits, str(base), out, _opts(ckpt_every=2))
    return out


def _aug(base: Path, out: Path | None, lora: bool = True, **kw: Any) -> AugConfig:
    return AugConfig(model=str(base), prompt=TEMPLATE, textual_inversion=str(out) if out else "",
                     lora=str(out) if out and lora else "", **kw)


def test_written_files(tuned: Path, splits: Splits) -> None:
    m = json.loads((tuned / MANIFEST).read_text())
    assert m["num_classes"] == 10 and m["steps"] == 4 and m["seed"] == 0 and m["lora"]["rank"] == 2
    assert [m["classes"][str(i)]["token"] for i in range(10)] == [f"<{n}>" for n in splits.class_names]
    assert m["prompts"][3] == "a photo of a <three> three"
    assert m["base"]["unet_signature"] and m["base"]["text_encoder_signature"]
    assert (tuned / LORA_FILE).is_file()
    assert sorted(p.name for p in (tuned / "checkpoints").glob("*.pt")) == ["step-0000002.pt", "step-0000004.pt"]


@pytest.mark.parametrize("with_lora", [True, False])
def test_diffusers_and_generator_agree(tuned: Path, base: Path, splits: Splits, with_lora: bool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """load_textual_inversion + load_lora_weights in a fresh img2img pipeline == our generator (grid mode)."""
    m = json.loads((tuned / MANIFEST).read_text())
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion([str(tuned / m["classes"][str(i)]["file"]) for i in range(10)])
    if with_lora:
        pipe.load_lora_weights(str(tuned))
    # As in test_generator: the pipeline samples the VAE posterior, SDEdit uses its mean.
    monkeypatch.setattr(img2img_module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode())
    aug = _aug(base, tuned, lora=with_lora, schedule="grid", grid_steps=10, guidance_scale=3.0)
    gen = SDEditGenerator.from_config(aug, splits.class_names, CPU)
    assert gen.class_prompts[7] == "a photo of a <seven> seven"
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    targets, s = torch.tensor([1, 0, 7]), 0.6
    kw = dict(image=images, strength=s, num_inference_steps=10, guidance_scale=3.0, output_type="pt")
    ref = pipe(prompt=[gen.class_prompts[i] for i in targets], generator=torch.Generator().manual_seed(5), **kw).images
    out, finite = gen.edit(images, torch.full((3,), s), targets, generator=torch.Generator().manual_seed(5))
    assert finite.all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)  # our LoRA is fused, diffusers' is not: rounding only

    # What was learned matters: without the LoRA, or with the class names instead of the tokens, outputs change.
    plain = StableDiffusionImg2ImgPipeline.from_pretrained(base, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    names = [render_prompt(TEMPLATE, splits.class_names[i], None) for i in targets]
    other = plain(prompt=names, generator=torch.Generator().manual_seed(5), **kw).images
    assert (out - other).abs().max() > 1e-3


def test_learned_rows_only_change(tuned: Path, base: Path) -> None:
    comps = load_sd(str(base), CPU, torch.float32)
    before = comps.text_encoder.get_input_embeddings().weight.clone()
    gen_cfg = _aug(base, tuned, lora=False)
    tokens = apply_finetuned(comps, gen_cfg, 10)
    after = comps.text_encoder.get_input_embeddings().weight
    assert after.shape[0] == before.shape[0] + 10
    assert torch.equal(after[: before.shape[0]], before)
    ids = comps.tokenizer.convert_tokens_to_ids(tokens)
    assert ids == list(range(before.shape[0], before.shape[0] + 10))


def test_resume_continues_exactly(tmp_path: Path, cfg: Config, splits: Splits, base: Path, tuned: Path) -> None:
    out = tmp_path / "resumed"
    finetune(cfg, splits, str(base), out, _opts(steps=2))
    m = finetune(cfg, splits, str(base), out, _opts(steps=4), resume=True)
    assert m["resumed_from_step"] == 2 and m["steps"] == 4
    from safetensors.torch import load_file

    for f in ["learned_embeds/class_0000.safetensors", "learned_embeds/class_0009.safetensors", LORA_FILE]:
        a, b = load_file(str(tuned / f)), load_file(str(out / f))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)  # == the uninterrupted 4-step run


def test_resume_from_another_run_is_an_error(tmp_path: Path, cfg: Config, splits: Splits, base: Path,
                                             tuned: Path) -> None:
    with pytest.raises(FinetuneError, match=r"another run \(different template\)"):
        finetune(cfg, splits, str(base), tuned, _opts(template="a photo {token}"), resume=True)
    other = save_tiny_sd(tmp_path / "other-sd", seed=1)  # same architecture, other weights
    with pytest.raises(FinetuneError, match=r"another run \(different base, base_model\)"):
        finetune(cfg, splits, str(other), tuned, _opts(), resume=True)
    three = load_config(None, ["data.image_size=16", "aug.class_names=[a,b,c,d,e,f,g,h,i,j]"])
    with pytest.raises(FinetuneError, match=r"different class_names, .*tokens"):
        finetune(three, splits, str(base), tuned, _opts(), resume=True)
    with pytest.raises(FinetuneError, match=r"holds no checkpoint"):
        finetune(cfg, splits, str(base), tmp_path / "empty", _opts(), resume=True)
    # The CLI refuses to overwrite a finished folder without --resume / --force.
    assert finetune_sd.main(["--model", str(base), "--out", str(tuned), "--steps", "1", "--no-progress"]) == 2


def test_initializer_split_into_several_tokens(cfg: Config, splits: Splits, base: Path, tmp_path: Path) -> None:
    tok = build_tiny_tokenizer()
    comps = load_sd(str(base), CPU, torch.float32)
    table = comps.text_encoder.get_input_embeddings().weight
    emb, pieces = init_embeddings(tok, comps.text_encoder, ["zero", "a"], "average")
    assert pieces == [["z", "e", "r", "o</w>"], ["a</w>"]]
    ids = tok.encode("zero", add_special_tokens=False)
    torch.testing.assert_close(emb[0], table[ids].mean(0))  # the mean of the sub-token embeddings
    torch.testing.assert_close(emb[1], table[tok.convert_tokens_to_ids("a</w>")])
    with pytest.raises(ValueError, match=r"'zero' is split by the tokenizer into 4 tokens \['z', 'e', 'r', 'o</w>'\]"):
        init_embeddings(tok, comps.text_encoder, ["zero"], "error")
    with pytest.raises(ConfigError, match=r"--init-word: .*'zero' is split"):
        finetune(cfg, splits, str(base), tmp_path / "x", _opts(init_split="error"))
    # A single-token initializer passes the strict mode.
    m = finetune(cfg, splits, str(base), tmp_path / "y", _opts(steps=1, lora_rank=0, init_word="a",
                                                                          init_split="error"))
    assert m["init_subtokens"][0] == ["a</w>"] and m["lora"] is None


def test_token_folder_for_another_number_of_classes(tuned: Path, base: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"aug\.textual_inversion: {tuned / MANIFEST} holds tokens for 10 classes "
                                          r"but the dataset has 3"):
        SDEditGenerator.from_config(_aug(base, tuned, lora=False), ["cat", "dog", "ship"], CPU)
    broken = tmp_path / "broken"
    shutil.copytree(tuned, broken)
    (broken / "learned_embeds" / "class_0004.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"class_0004\.safetensors \(the embedding of class 4, '<four>'\) is missing"):
        SDEditGenerator.from_config(_aug(base, broken, lora=False), [str(i) for i in range(10)], CPU)
    with pytest.raises(ConfigError, match=r"aug\.textual_inversion='.*nowhere': no such folder"):
        SDEditGenerator.from_config(_aug(base, tmp_path / "nowhere", lora=False), ["a", "b"], CPU)
    with pytest.raises(ConfigError, match=r"uses \{token\} but no learned tokens"):
        SDEditGenerator.from_config(_aug(base, None), ["a", "b"], CPU)


def test_finetuned_on_another_base_model(tuned: Path, tmp_path: Path) -> None:
    names = [str(i) for i in range(10)]
    # Same architecture, other weights: the probe catches it.
    other = save_tiny_sd(tmp_path / "other-sd", seed=1)
    with pytest.raises(ConfigError, match=r"aug\.textual_inversion: .*manifest\.json was learned on a different base "
                                          r"model .*differs in weights"):
        SDEditGenerator.from_config(_aug(other, tuned, lora=False), names, CPU)

    # A different UNet: with the manifest, the signature; without it (a bare diffusers LoRA), the key/shape check.
    wide = tmp_path / "wide-sd"
    shutil.copytree(other, wide)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    shutil.rmtree(wide / "unet")
    unet.save_pretrained(wide / "unet")
    aug = AugConfig(model=str(wide), prompt="a photo of a {name}", lora=str(tuned))
    with pytest.raises(ConfigError, match=r"aug\.lora: .*manifest\.json was learned on a different base model "
                                          r".*differs in unet_signature"):
        SDEditGenerator.from_config(aug, names, CPU)
    bare = tmp_path / "bare-lora"
    bare.mkdir()
    shutil.copy(tuned / LORA_FILE, bare / LORA_FILE)
    aug.lora = str(bare)
    with pytest.raises(ConfigError, match=rf"aug\.lora: {bare / LORA_FILE}: .* does not fit .*different UNet"):
        SDEditGenerator.from_config(aug, names, CPU)
    aug.lora = str(tmp_path)  # a folder without the LoRA file
    with pytest.raises(ConfigError, match=rf"aug\.lora: {tmp_path / LORA_FILE} is missing"):
        SDEditGenerator.from_config(aug, names, CPU)


def test_prompt_rules() -> None:
    assert render_prompt("a photo of the digit {name}", "three", "<three>") == "a photo of the digit <three>"
    assert render_prompt("a photo of a {token} digit", "three", "<three>") == "a photo of a <three> digit"
    assert render_prompt("a photo", "three", "<three>") == "a photo <three>"
    assert render_prompt("a photo of a {token} {name}", "three", None) == "a photo of a three three"
    assert class_prompts("a {name}", ["x", "y"]) == ["a x", "a y"]
    with pytest.raises(ConfigError, match=r"only the \{name\} and \{token\} placeholders"):
        class_prompts("a {label}", ["x"])


@pytest.mark.skipif(not (DEMO_SD / "model_index.json").is_file(), reason="models/tiny-sd-digits not built")
def test_textual_inversion_learns_the_classes(tmp_path: Path) -> None:
    """Tokens initialised from an uninformative word ("a", the same for every class) learn each class from the
    training split: s=0.9 edits toward a target go from chance to landing on it (README: "Fine-tuning the
    generator" has the full-budget numbers from tools/finetune_sd.py --eval)."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", BUILT_ON)
    splits = build_splits(cfg.data)
    out, template = tmp_path / "ti", "a photo of the digit {token}"
    finetune(cfg, splits, str(DEMO_SD), out, FinetuneOptions(
        steps=60, batch_size=32, lr=0.05, warmup=10, template=template, init_word="a", init_split="error",
        show_progress=False))
    kw: dict[str, Any] = dict(n_edits=100, modes=("fewstep",), seed=0)
    # Before: every class prompted with the initializer, i.e. what the tokens are before training.
    x, y = splits.train.tensors()
    before = edit_target_rates(load_sd(str(DEMO_SD), CPU, torch.float32), [render_prompt(template, "a", None)] * 10,
                               x, y, **kw)
    gen = SDEditGenerator.from_config(AugConfig(model=str(DEMO_SD), prompt=template, textual_inversion=str(out)),
                                      splits.class_names, CPU)
    after = edit_target_rates(gen.components, gen.class_prompts, x, y, **kw)
    b, a = before["modes"]["fewstep"]["0.9"]["target_rate"], after["modes"]["fewstep"]["0.9"]["target_rate"]
    assert b < 0.25, b  # about chance (0.1): one prompt for all classes cannot pick a target
    assert a >= 0.6 and a > b + 0.4, (b, a)


def test_eval_measures_before_names_and_after(tuned: Path, base: Path, cfg: Config, splits: Splits) -> None:
    """--eval: the same edits judged three ways; 'before' starts from the tokens' initial values."""
    m = json.loads((tuned / MANIFEST).read_text())
    ev = evaluate(cfg, splits, str(base), tuned, m, n_edits=10, guidance_scale=2.0, device=CPU,
                              show_progress=False)
    for k in ("before", "names", "after"):
        for mode in ("fewstep", "grid"):
            cell = ev[k]["modes"][mode]["0.9"]
            assert 0.0 <= cell["target_rate"] <= 1.0, (k, mode, cell)
    assert ev["chance"] == pytest.approx(0.1)
    table = format_eval(ev).splitlines()
    assert "names" in table[0] and "before" in table[0] and len(table) == 3


@pytest.mark.skipif(not (AGNOSTIC_SD / "model_index.json").is_file(), reason="models/tiny-sd-digits-agnostic not built")
def test_ti_plus_lora_teaches_a_class_agnostic_model(tmp_path: Path) -> None:
    """The class-agnostic tiny SD cannot draw a class on request; tokens learned jointly with a rank-10 UNet LoRA
    (Diff-Mix's TI + LoRA) on the training split make s=0.9 edits land on the target. TI alone cannot do this on a
    model whose UNet only ever saw one prompt (README); the budget here is kept near the smallest that lands above
    chance reliably (much smaller budgets stay at chance)."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", BUILT_ON)
    splits = build_splits(cfg.data)
    out, template = tmp_path / "ti-lora", "a photo"
    finetune(cfg, splits, str(AGNOSTIC_SD), out, FinetuneOptions(
        steps=2000, batch_size=32, lr=0.05, lora_rank=10, lora_lr=1e-2, warmup=20, template=template,
        show_progress=False))
    kw: dict[str, Any] = dict(n_edits=100, modes=("fewstep",), seed=0)
    x, y = splits.train.tensors()
    before = edit_target_rates(load_sd(str(AGNOSTIC_SD), CPU, torch.float32), [template] * 10, x, y, **kw)
    aug = AugConfig(model=str(AGNOSTIC_SD), prompt=template, textual_inversion=str(out), lora=str(out))
    gen = SDEditGenerator.from_config(aug, splits.class_names, CPU)
    assert gen.class_prompts[3] == "a photo <three>"
    after = edit_target_rates(gen.components, gen.class_prompts, x, y, **kw)
    b, a = before["modes"]["fewstep"]["0.9"]["target_rate"], after["modes"]["fewstep"]["0.9"]["target_rate"]
    assert b < 0.25, b  # about chance (0.1)
    assert a >= 0.5 and a > b + 0.3, (b, a)


def test_lora_scale_merges_a_fraction_of_the_update(base: Path, tuned: Path) -> None:
    """aug.lora_scale (diffusers' lora_scale): the merged weights move linearly with the scale from the base's."""
    from online_aug.generator.finetuned import apply_lora

    def weights(scale: float | None) -> torch.Tensor:
        comps = load_sd(str(base), torch.device("cpu"), torch.float32)
        if scale is not None:
            apply_lora(comps.unet, tuned, scale=scale)
        return torch.cat([p.detach().flatten() for n, p in comps.unet.named_parameters() if "attn" in n])

    w0, w1, half = weights(None), weights(1.0), weights(0.5)
    assert not torch.allclose(w0, w1)
    torch.testing.assert_close(half, (w0 + w1) / 2, atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError, match="aug.lora_scale must be > 0"):
        load_config(None, ["aug.lora_scale=0"])
