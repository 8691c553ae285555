"""Fine-tuning at paper scale: images streamed from the stored originals at the generator's
resolution, mixed precision, gradient checkpointing, multi-vector tokens, the papers' recipes, exact resume.

All on the random tiny SD of tests/tiny_sd.py (16 px native) and small image folders, so each test takes seconds.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_sd import save_tiny_sd

from online_aug.config import AugConfig, load_config
from online_aug.data import build_splits
from online_aug.data.datasets import LabeledImages
from online_aug.generator import load_sd
from online_aug.generator.finetuned import LORA_FILE, MANIFEST, apply_finetuned
from online_aug.sdtrain.finetune import RECIPES, FinetuneError, FinetuneOptions, finetune, recipe_options
from online_aug.sdtrain.sd_training import StepBatchSampler, resize_crop
from tools import finetune_sd

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 12


def _photos(root: Path) -> Path:
    """Class folders of non-square 'photos' (40 x 56 px), larger than the generator's 16 px."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            arr = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
            arr[..., c] = 255
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    tmp = tmp_path_factory.mktemp("stream")
    root = _photos(tmp / "photos")
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=8",
                             "data.test_fraction=0.25", "data.imbalance_ratio=1", "data.val_per_class=0",
                             "data.pool_fraction=0", "aug.prompt=a photo of a {name}"])
    return cfg, build_splits(cfg.data), save_tiny_sd(tmp / "sd")


def _opts(**kw: Any) -> FinetuneOptions:
    d: dict[str, Any] = dict(steps=4, batch_size=3, lr=0.05, lora_rank=2, lora_lr=0.05, warmup=1, crop="random",
                             hflip=True, show_progress=False)
    d.update(kw)
    return FinetuneOptions(**d)


def test_images_stream_from_the_files_never_the_whole_split(setup, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The split (27 training photos) is larger than the cap on decoded images alive at once (one batch, 3): each
    step decodes its own batch from the files at full size, and no all-images tensor is ever built."""
    cfg, splits, sd = setup
    assert len(splits.train) > 3 * 8
    alive: set[int] = set()
    peak, sizes = [0], []
    original = LabeledImages.pil

    def counting_pil(self: LabeledImages, i: int, resize: bool = True) -> Image.Image:
        img = original(self, i, resize)
        sizes.append(img.size)
        alive.add(id(img))
        weakref.finalize(img, alive.discard, id(img))
        peak[0] = max(peak[0], len(alive))
        return img

    def no_tensors(self: LabeledImages, resolution: int | None = None) -> Any:
        raise AssertionError("fine-tuning loaded the whole split")

    monkeypatch.setattr(LabeledImages, "pil", counting_pil)
    monkeypatch.setattr(LabeledImages, "tensors", no_tensors)
    m = finetune(cfg, splits, str(sd), tmp_path / "ft", _opts(steps=3))
    assert len(sizes) == 3 * 3 and set(sizes) == {(56, 40)}  # 3 steps x 3 images, each the original file's size
    assert peak[0] <= 3, peak
    assert m["resolution"] == 16


def test_resize_crop_is_the_diffusers_preprocessing() -> None:
    img = torch.rand(3, 40, 56)
    center = resize_crop(img, 16, 0.5, 0.5, False)
    assert center.shape == (3, 16, 16) and center.min() >= -1 and center.max() <= 1
    full = torch.nn.functional.interpolate(img[None], size=(16, 22), mode="bilinear", antialias=True,
                                           align_corners=False)[0].clamp(0, 1) * 2 - 1
    torch.testing.assert_close(center, full[:, :, 3:19])  # shorter side to 16, then the middle 16 columns
    torch.testing.assert_close(resize_crop(img, 16, 0.0, 1.0, True), full[:, :, 6:22].flip(-1))
    s = StepBatchSampler(torch.ones(10), 4, seed=3, start=5, stop=7, crop="random", hflip=True)
    assert list(s) == [s.keys(5), s.keys(6)] and s.keys(5) != s.keys(6)
    assert StepBatchSampler(torch.ones(10), 4, seed=3, start=0, stop=9, crop="random", hflip=True).keys(5) == s.keys(5)


def test_resume_equals_uninterrupted_with_bf16_checkpointing_and_random_crops(setup, tmp_path: Path) -> None:
    """bf16 autocast on the CPU, gradient checkpointing, random crops and flips: 2 + 2 steps == 4 steps."""
    cfg, splits, sd = setup
    kw = dict(mixed_precision="bf16", gradient_checkpointing=True, num_vectors=2, ckpt_every=2)
    full = tmp_path / "full"
    m = finetune(cfg, splits, str(sd), full, _opts(**kw))
    assert m["options"]["mixed_precision"] == "bf16" and m["classes"]["0"]["vectors"] == 2
    part = tmp_path / "part"
    finetune(cfg, splits, str(sd), part, _opts(**{**kw, "steps": 2}))
    finetune(cfg, splits, str(sd), part, _opts(**kw), resume=True)
    for f in ["learned_embeds/class_0000.safetensors", "learned_embeds/class_0002.safetensors", LORA_FILE]:
        a, b = load_file(str(full / f)), load_file(str(part / f))
        for k in a:
            assert a[k].dtype == torch.float32  # fp32 master weights under the bf16 autocast
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    init = load_sd(str(sd), torch.device("cpu"), torch.float32).text_encoder.get_input_embeddings().weight
    learned = load_file(str(full / "learned_embeds/class_0000.safetensors"))["<ant>"]
    assert learned.shape == (2, init.shape[1])
    assert not torch.allclose(learned[0], learned[1])  # the two vectors learned apart from their common init


def test_multi_vector_tokens_load_as_diffusers_does(setup, tmp_path: Path) -> None:
    """A 3-vector token is the words <t>, <t>_1, <t>_2 (diffusers' load_textual_inversion naming) in the prompt."""
    cfg, splits, sd = setup
    out = tmp_path / "mv"
    finetune(cfg, splits, str(sd), out, _opts(steps=1, lora_rank=0, num_vectors=3))
    m = json.loads((out / MANIFEST).read_text())
    assert m["prompts"][1] == "a photo of a <bee> <bee>_1 <bee>_2"
    comps = load_sd(str(sd), torch.device("cpu"), torch.float32)
    n0 = len(comps.tokenizer)
    phrases = apply_finetuned(comps, AugConfig(model=str(sd), prompt="a photo of a {name}",
                                               textual_inversion=str(out)), 3)
    assert phrases[2] == "<cat> <cat>_1 <cat>_2" and len(comps.tokenizer) == n0 + 9
    saved = load_file(str(out / m["classes"]["2"]["file"]))["<cat>"]
    ids = comps.tokenizer.convert_tokens_to_ids(["<cat>", "<cat>_1", "<cat>_2"])
    torch.testing.assert_close(comps.text_encoder.get_input_embeddings().weight[ids], saved)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(out / m["classes"]["2"]["file"]))
    assert pipe.maybe_convert_prompt("a photo of a <cat>", pipe.tokenizer) == "a photo of a " + phrases[2]


def test_recipes_hold_the_papers_values_and_flags_override_them() -> None:
    dm = recipe_options("diff-mix")
    assert (dm.steps, dm.batch_size, dm.lr, dm.lora_lr, dm.lora_rank, dm.resolution) == (35000, 8, 5e-5, 5e-5, 10, 512)
    da = recipe_options("da-fusion")
    assert (da.steps, da.batch_size, da.lr, da.num_vectors, da.lora_rank, da.init_word) == (2000, 4, 5e-4, 4, 0, "the")
    assert da.gradient_checkpointing and da.mixed_precision == "auto" and set(RECIPES) == {"da-fusion", "diff-mix"}
    args = finetune_sd.parse_args(["--out", "x", "--recipe", "diff-mix", "--steps", "10", "--no-hflip"])
    opts = finetune_sd.options(args)
    assert (opts.steps, opts.hflip, opts.lora_rank, opts.batch_size) == (10, False, 10, 8)
    assert finetune_sd.options(finetune_sd.parse_args(["--out", "x"])) == FinetuneOptions(show_progress=True)


def test_bad_requests_are_one_line_errors(setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, splits, sd = setup
    assert finetune_sd.main(["--out", str(tmp_path / "a"), "--recipe", "dreambooth"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--recipe 'dreambooth' does not exist" in err and "diff-mix" in err
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(FinetuneError, match="fp16 needs a CUDA device"):
        finetune(cfg, splits, str(sd), tmp_path / "b", _opts(mixed_precision="fp16"))
    with pytest.raises(FinetuneError, match="--resolution 18 must be a multiple of 4"):
        finetune(cfg, splits, str(sd), tmp_path / "c", _opts(resolution=18))


def test_sd15_architecture_has_the_published_sizes() -> None:
    """online_aug.sdtrain.sd15's configs build SD 1.5's parts (counted on the meta device: no memory, no weights): the
    published parameter counts, CLIP's vocabulary and special-token ids."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from online_aug.sdtrain.sd15 import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, sd15_tokenizer

    with torch.device("meta"):
        sizes = [sum(p.numel() for p in m.parameters()) for m in (
            UNet2DConditionModel(sample_size=64, **UNET_CONFIG), AutoencoderKL(sample_size=512, **VAE_CONFIG),
            CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)))]
    assert sizes == [859_520_964, 83_653_863, 123_060_480]
    tok = sd15_tokenizer()
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (49408, 49406, 49407, 77)
    assert tok("a photo of a <t>").input_ids[0] == 49406
