"""Tests of online_aug.generator on a tiny random SD built in code (CPU, no network)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
)
from tiny_sd import build_tiny_sd_components, save_tiny_sd

from online_aug.config import AugConfig, ConfigError
from online_aug.generator import SDComponents, SDEditGenerator, load_sd, load_taesd

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a ship"]
SCHEDULER_CLASSES = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "lcm": LCMScheduler,
                     "dpmsolver++": DPMSolverMultistepScheduler}


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: on a shared 2-core machine, intra-op threads cost far more in contention than they
    # gain (one edit of 32 images: ~0.1 s on 1 thread against ~0.5 s on 2 under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _components(scheduler: str = "ddim") -> SDComponents:
    c = build_tiny_sd_components(seed=0)
    sched = SCHEDULER_CLASSES[scheduler].from_config(c["scheduler"].config)
    return SDComponents(c["vae"], c["unet"], c["text_encoder"], c["tokenizer"], sched)


def _images(m: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(m, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _noise(m: int, seed: int = 7) -> torch.Tensor:
    # One generator per sample: a sample's noise does not depend on the batch it is in.
    return torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed + i)) for i in range(m)])


@pytest.mark.parametrize("schedule", ["fewstep", "grid"])
def test_mixed_strength_batch_equals_each_sample_alone(schedule: str) -> None:
    gen = SDEditGenerator(_components(), PROMPTS, schedule=schedule, steps=3, grid_steps=10, guidance_scale=2.5)
    images, noise = _images(4), _noise(4)
    strengths = torch.tensor([0.3, 0.9, 0.55, 0.7])
    targets = torch.tensor([2, 0, 1, 1])
    batch, finite = gen.edit(images, strengths, targets, noise=noise)
    assert finite.all()
    for i in range(4):
        alone, _ = gen.edit(images[i:i + 1], strengths[i:i + 1], targets[i:i + 1], noise=noise[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=0)
    # Different strengths must give different results (guards against a schedule that ignores s).
    same_s, _ = gen.edit(images[:1], strengths[1:2], targets[:1], noise=noise[:1])
    assert (same_s - batch[:1]).abs().max() > 1e-3


def test_timesteps_for_counts_steps() -> None:
    comps = _components()
    strengths = torch.tensor([0.1, 0.35, 0.6, 0.7, 1.0])  # float32: 0.7 * 10 = 6.9999998 must still count as 7
    grid = SDEditGenerator(comps, PROMPTS, schedule="grid", grid_steps=10).timesteps_for(strengths)
    assert grid.shape == (5, 11) and grid.dtype == torch.long
    assert (grid[:, :-1] >= 0).sum(1).tolist() == [1, 3, 6, 7, 10]
    assert (grid[:, -1] == -1).all()
    # Same tail as diffusers' get_timesteps for each strength.
    ref = DDIMScheduler.from_config(comps.scheduler.config)
    ref.set_timesteps(10)
    for row, s in zip(grid, [0.1, 0.35, 0.6, 0.7, 1.0]):
        n = min(int(10 * s), 10)
        assert row[:-1][row[:-1] >= 0].tolist() == ref.timesteps[10 - n:].tolist()

    few = SDEditGenerator(comps, PROMPTS, schedule="fewstep", steps=4).timesteps_for(strengths)
    assert few.shape == (5, 5)
    assert (few[:, :-1] >= 0).sum(1).tolist() == [4] * 5
    assert few[:, 0].tolist() == [100, 350, 600, 700, 999]  # t0 = min(T-1, floor(s*T))
    assert few[2].tolist() == [600, 450, 300, 150, -1]
    assert (few[:, :-1].diff(dim=1) <= 0).all()


def test_small_strength_returns_the_source() -> None:
    comps = _components()
    gen = SDEditGenerator(comps, PROMPTS, steps=4, guidance_scale=3.0)
    images, targets = _images(3), torch.tensor([0, 1, 2])
    with torch.inference_mode():  # the VAE is lossy: compare with its round trip, not with the pixels
        z = comps.vae.encode(images * 2 - 1).latent_dist.mean
        roundtrip = (comps.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    errors = []
    for s in (0.0, 0.01, 0.8):
        out, _ = gen.edit(images, torch.full((3,), s), targets, noise=_noise(3))
        errors.append((out - roundtrip).abs().mean().item())
    # A random UNet does not remove the noise it is given, so "nearly" is bounded by the smallest noise level.
    assert errors[0] < 0.01 and errors[1] < 0.03, errors
    assert errors[2] > 4 * errors[1], errors


def test_nonfinite_sample_falls_back_to_input(monkeypatch: pytest.MonkeyPatch) -> None:
    comps = _components()
    gen = SDEditGenerator(comps, PROMPTS, steps=2, guidance_scale=3.0)
    forward = comps.unet.forward

    def nan_for_sample_1(*args, **kwargs):
        out = forward(*args, **kwargs)
        out[0][1] = float("nan")  # row 1 of the [uncond; cond] batch is sample 1's unconditional branch
        return out

    monkeypatch.setattr(comps.unet, "forward", nan_for_sample_1)
    images = _images(3)
    out, finite = gen.edit(images, torch.full((3,), 0.5), torch.tensor([0, 1, 2]), noise=_noise(3))
    assert finite.tolist() == [True, False, True]
    assert torch.equal(out[1], images[1])
    assert torch.isfinite(out).all()
    assert not torch.equal(out[0], images[0])


def test_loading_errors_and_saved_folder(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_tiny_sd(tmp_path / "tiny-sd")
    # The saved folder is a real diffusers pipeline folder ...
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    assert pipe.unet.config.sample_size == 8
    # ... and load_sd reads it, frozen.
    comps = load_sd(str(folder), torch.device("cpu"), torch.float32)
    assert isinstance(comps.scheduler, DDIMScheduler)
    for module in (comps.vae, comps.unet, comps.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    mem = SDEditGenerator(_components(), PROMPTS, steps=2)
    disk = SDEditGenerator(comps, PROMPTS, steps=2)
    images, s, y = _images(2), torch.tensor([0.5, 0.8]), torch.tensor([0, 2])
    torch.testing.assert_close(mem.edit(images, s, y, noise=_noise(2))[0], disk.edit(images, s, y, noise=_noise(2))[0])

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ConfigError, match=r"aug\.model.*unet/"):
        load_sd(str(broken), torch.device("cpu"), torch.float32)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"aug\.model='nobody-xyz/no-such-sd'.*HF_HUB_OFFLINE.*local diffusers"):
        load_sd("nobody-xyz/no-such-sd", torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match=r"no such folder"):
        load_sd(str(tmp_path / "a" / "missing"), torch.device("cpu"), torch.float32)

    aug = AugConfig(model=str(folder), prompt="a photo of a {name}", steps=2, schedule="fewstep", scheduler="euler")
    gen = SDEditGenerator.from_config(aug, ["cat", "dog"], torch.device("cpu"))
    assert gen.class_prompts == ["a photo of a cat", "a photo of a dog"]
    assert gen.dtype == torch.float32 and gen.prompt_embeds.shape[0] == 2 and gen.uncond_embeds.shape[0] == 1


@pytest.mark.parametrize("scheduler", ["euler", "lcm"])
def test_other_schedulers_run_without_the_text_encoder(scheduler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    comps = _components(scheduler)
    gen = SDEditGenerator(comps, PROMPTS, scheduler=scheduler, steps=3, guidance_scale=2.0, latent_noise=0.1)

    def no_text_encoder(*args, **kwargs):
        raise AssertionError("the text encoder ran inside edit()")

    monkeypatch.setattr(comps.text_encoder, "forward", no_text_encoder)
    images = _images(5, size=12)  # classifier resolution 12, generation resolution 16
    out, finite = gen.edit(images, torch.tensor([0.2, 0.5, 0.9, 1.0, 0.7]), torch.tensor([0, 1, 2, 0, 1]),
                           generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 3, 12, 12) and out.dtype == torch.float32
    assert finite.all() and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(AssertionError, match="text encoder"):
        gen.set_class_prompts(["x", "y"])  # the cache is rebuilt with the text encoder, outside edit()


def test_set_class_prompts_rebuilds_cache() -> None:
    gen = SDEditGenerator(_components(), PROMPTS, steps=2)
    before = gen.prompt_embeds.clone()
    gen.set_class_prompts(["a photo of a truck", "a photo of a frog"])
    assert gen.prompt_embeds.shape[0] == 2
    assert not torch.equal(gen.prompt_embeds, before[:2])


def test_taesd_replaces_the_vae(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4,
                        ).save_pretrained(tmp_path / "taesd")
    taesd = load_taesd(str(tmp_path / "taesd"), torch.device("cpu"), torch.float32)
    assert not taesd.training and not any(p.requires_grad for p in taesd.parameters())
    comps = dataclasses.replace(_components(), taesd=taesd)

    def no_vae(*args, **kwargs):
        raise AssertionError("the SD VAE ran although TAESD is set")

    monkeypatch.setattr(comps.vae, "encode", no_vae)
    monkeypatch.setattr(comps.vae, "decode", no_vae)
    gen = SDEditGenerator(comps, PROMPTS, steps=2)
    out, finite = gen.edit(_images(3), torch.tensor([0.3, 0.6, 0.9]), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 3, 16, 16) and finite.all()
    with pytest.raises(ConfigError, match=r"aug\.taesd"):
        load_taesd(str(tmp_path / "x" / "missing"), torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------- text-to-image Gen, DPM-Solver++, prompt diversity


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmsolver++"])
def test_grid_gen_from_noise_ignores_the_reference(scheduler: str) -> None:
    """Grid mode, strength 1 with gen_from_noise: text-to-image (equal to StableDiffusionPipeline's, see
    test_diffusers_equivalence.py), so the reference image does not leak in."""
    gen = SDEditGenerator(_components(scheduler), PROMPTS, schedule="grid", grid_steps=10, guidance_scale=3.0,
                          scheduler=scheduler, gen_from_noise=True)
    targets = torch.tensor([1, 0, 2])
    out, finite = gen.edit(_images(3), torch.ones(3), targets, generator=torch.Generator().manual_seed(5))
    assert finite.all()
    other, _ = gen.edit(_images(3, seed=9), torch.ones(3), targets, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(other, out, atol=1e-5, rtol=0)
    # ... whereas img2img at s = 1 (the default) keeps some of the reference.
    gen.gen_from_noise = False
    i2i, _ = gen.edit(_images(3), torch.ones(3), targets, generator=torch.Generator().manual_seed(5))
    assert (i2i - out).abs().max() > 1e-3


def test_gen_from_noise_acts_on_strength_one_only() -> None:
    gen = SDEditGenerator(_components(), PROMPTS, steps=3, guidance_scale=2.5, gen_from_noise=True)
    images, noise = _images(3), _noise(3)
    strengths, targets = torch.tensor([1.0, 0.6, 1.0]), torch.tensor([0, 1, 2])
    batch, _ = gen.edit(images, strengths, targets, noise=noise)
    plain = SDEditGenerator(_components(), PROMPTS, steps=3, guidance_scale=2.5)
    ref, _ = plain.edit(images, strengths, targets, noise=noise)
    torch.testing.assert_close(batch[1], ref[1], atol=1e-5, rtol=0)  # s < 1: SDEdit as before
    assert (batch[0] - ref[0]).abs().max() > 1e-3 and (batch[2] - ref[2]).abs().max() > 1e-3
    swapped, _ = gen.edit(images.flip(0), strengths, targets, noise=noise)  # other references, same s=1 outputs
    torch.testing.assert_close(swapped[[0, 2]], batch[[0, 2]], atol=1e-5, rtol=0)


def test_text_to_image_batch_skips_the_vae_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    comps = _components()
    gen = SDEditGenerator(comps, PROMPTS, steps=2, gen_from_noise=True)
    images, targets = _images(2), torch.tensor([0, 1])
    want, _ = gen.edit(images, torch.ones(2), targets, noise=_noise(2))

    def no_encoder(*args, **kwargs):
        raise AssertionError("the VAE encoder ran for a text-to-image batch")

    monkeypatch.setattr(comps.vae, "encode", no_encoder)
    got, finite = gen.edit(images, torch.ones(2), targets, noise=_noise(2))
    assert finite.all()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(AssertionError, match="VAE encoder"):  # one SDEdit sample in the batch needs the reference
        gen.edit(images, torch.tensor([1.0, 0.5]), targets, noise=_noise(2))


def test_dpm_solver_fewstep_matches_diffusers_multistep() -> None:
    """Few-step mode: each sample's K timesteps run through DPMSolverMultistepScheduler (dpmsolver++, order 2) with
    those custom timesteps give the same result as the per-sample solver, for a batch of equal strengths."""
    comps = _components("dpmsolver++")
    gen = SDEditGenerator(comps, PROMPTS, scheduler="dpmsolver++", steps=4, guidance_scale=3.0)
    images, targets, s = _images(2), torch.tensor([2, 0]), 0.8
    out, finite = gen.edit(images, torch.full((2,), s), targets, noise=_noise(2))
    assert finite.all()
    row = gen.timesteps_for(torch.tensor([s]))[0]
    ts = row[row >= 0].tolist()  # [800, 600, 400, 200]
    ref = DPMSolverMultistepScheduler.from_config(comps.scheduler.config, algorithm_type="dpmsolver++",
                                                  solver_order=2)
    ref.set_timesteps(timesteps=ts)
    with torch.inference_mode():
        z0 = comps.vae.encode(images * 2 - 1).latent_dist.mean * comps.vae.config.scaling_factor
        lat = ref.add_noise(z0, _noise(2), torch.tensor([ts[0]] * 2))
        emb = torch.cat([gen.uncond_embeds.expand(2, -1, -1), gen.prompt_embeds[targets]])
        for t in ref.timesteps:
            o = comps.unet(torch.cat([lat, lat]), t, encoder_hidden_states=emb).sample
            u, c = o.chunk(2)
            lat = ref.step(u + 3.0 * (c - u), t, lat).prev_sample
        want = (comps.vae.decode(lat / comps.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=0)
    first = SDEditGenerator(comps, PROMPTS, scheduler="dpmsolver++", solver_order=1, steps=4, guidance_scale=3.0)
    assert (first.edit(images, torch.full((2,), s), targets, noise=_noise(2))[0] - out).abs().max() > 1e-4


@pytest.mark.parametrize("schedule", ["fewstep", "grid"])
def test_dpm_solver_mixed_strengths_equal_each_sample_alone(schedule: str) -> None:
    """The per-sample history: samples that join the grid at different steps are solved as if alone."""
    gen = SDEditGenerator(_components("dpmsolver++"), PROMPTS, scheduler="dpmsolver++", schedule=schedule, steps=3,
                          grid_steps=10, guidance_scale=2.5)
    images, noise = _images(4), _noise(4)
    strengths, targets = torch.tensor([0.3, 0.9, 0.55, 1.0]), torch.tensor([2, 0, 1, 1])
    batch, finite = gen.edit(images, strengths, targets, noise=noise)
    assert finite.all()
    for i in range(4):
        alone, _ = gen.edit(images[i:i + 1], strengths[i:i + 1], targets[i:i + 1], noise=noise[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=0)


def test_dpm_solver_bad_order_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"aug\.scheduler='dpmsolver\+\+' \(aug\.solver_order=3\).*not implemented"):
        SDEditGenerator(_components(), PROMPTS, scheduler="dpmsolver++", solver_order=3)


def test_prompt_templates_are_cached_and_drawn_per_edit(tmp_path) -> None:
    folder = save_tiny_sd(tmp_path / "sd")
    lines = "# appearance changes\na {name} at night\n\na {name} in the snow\n"
    (tmp_path / "prompts.txt").write_text(lines)
    aug = AugConfig(model=str(folder), prompt="a photo of a {name}", prompts=["a drawing of a {name}"],
                    prompt_file=str(tmp_path / "prompts.txt"), steps=2)
    gen = SDEditGenerator.from_config(aug, ["cat", "dog"], torch.device("cpu"))
    assert gen.num_templates == 4 and gen.class_prompts == ["a photo of a cat", "a photo of a dog"]
    assert gen.prompt_table[3] == ["a cat in the snow", "a dog in the snow"]
    assert gen.prompt_embeds.shape[0] == 8  # every template of every class, encoded once
    images, s, y = _images(2), torch.tensor([0.8, 0.8]), torch.tensor([1, 1])
    default, _ = gen.edit(images, s, y, noise=_noise(2))
    zero, _ = gen.edit(images, s, y, noise=_noise(2), templates=torch.tensor([0, 0]))
    torch.testing.assert_close(zero, default, atol=0, rtol=0)
    mixed, _ = gen.edit(images, s, y, noise=_noise(2), templates=torch.tensor([0, 3]))
    torch.testing.assert_close(mixed[0], default[0], atol=1e-6, rtol=0)
    assert (mixed[1] - default[1]).abs().max() > 1e-4  # template 3 conditions sample 1 differently
    with pytest.raises(ConfigError, match=r"aug\.prompt_file='.*missing\.txt' is not a file"):
        SDEditGenerator.from_config(dataclasses.replace(aug, prompt_file=str(tmp_path / "missing.txt")), ["cat", "dog"],
                                    torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"aug\.prompts\[0\]=.*placeholders"):
        SDEditGenerator.from_config(dataclasses.replace(aug, prompts=["a {colour} {name}"]), ["cat", "dog"],
                                    torch.device("cpu"))
