"""Grid mode against diffusers' own pipelines over timestep spacing x N x scheduler.

Three paths: img2img (``StableDiffusionImg2ImgPipeline``), text-to-image (``StableDiffusionPipeline``; a strength-1
sample with ``gen_from_noise``) and masked blend edits (``StableDiffusionInpaintPipeline`` with a plain 4-channel
UNet). N covers grids that divide the 1000 training steps and grids that do not: Euler's linspace grid then falls
between training steps (N = 7: 832.5, 499.5, 166.5; N = 6: 799.2, ...), and DDIM's trailing grid can end with a step
down to t = 0 (N = 6, 7, 11, 13), which the inpainting blend treats as the end of the chain.
"""

from __future__ import annotations

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from tiny_sd import build_tiny_sd_components

from online_aug.generator import PerSampleScheduler, SDComponents, SDEditGenerator

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a ship"]
SCHEDULER_CLASSES = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "lcm": LCMScheduler,
                     "dpmsolver++": DPMSolverMultistepScheduler}
SPACINGS = ("leading", "trailing", "linspace")
STEPS = (4, 6, 7, 10, 11, 13)
# LCMScheduler ignores timestep_spacing (its grid comes from original_inference_steps): one spacing is enough.
CASES = [pytest.param(sch, sp, n, id=f"{sch}-{sp}-{n}") for sch in ("ddim", "euler", "dpmsolver++")
         for sp in SPACINGS for n in STEPS] + [pytest.param("lcm", "leading", n, id=f"lcm-{n}") for n in STEPS]
STRENGTH = 0.7  # int(N * 0.7) steps of the N-step grid, the same in Python floats and in decimals for these N
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny() -> dict:
    return build_tiny_sd_components(seed=0)


@pytest.fixture(autouse=True)
def _posterior_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pipelines sample the VAE posterior (drawing from the generator); SDEdit uses its mean. With the mean on
    # both sides, both draw the same noise first from identically seeded generators.
    def mode(enc, generator=None, sample_mode="sample"):
        return enc.latent_dist.mode()

    monkeypatch.setattr(img2img_module, "retrieve_latents", mode)
    monkeypatch.setattr(inpaint_module, "retrieve_latents", mode)


def _scheduler(tiny: dict, kind: str, spacing: str):
    return SCHEDULER_CLASSES[kind].from_config(tiny["scheduler"].config, timestep_spacing=spacing)


def _pipe(cls, tiny: dict, kind: str, spacing: str):
    pipe = cls(**{**tiny, "scheduler": _scheduler(tiny, kind, spacing)}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(pipe, kind: str, n: int, **kw) -> SDEditGenerator:
    comps = SDComponents(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    return SDEditGenerator(comps, PROMPTS, schedule="grid", grid_steps=n, guidance_scale=3.0, scheduler=kind, **kw)


def _images(m: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(m, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _masks(m: int = 3) -> torch.Tensor:
    masks = torch.zeros(m, 1, 16, 16)
    masks[:, :, 4:12, 6:10] = 1  # whole latent cells, so every resize of the mask to the latents agrees
    return masks


TARGETS = torch.tensor([1, 0, 2])


def _prompts() -> list[str]:
    return [PROMPTS[i] for i in TARGETS]


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(5)


@pytest.mark.parametrize(("kind", "spacing", "n"), CASES)
def test_img2img(tiny, kind: str, spacing: str, n: int) -> None:
    pipe = _pipe(StableDiffusionImg2ImgPipeline, tiny, kind, spacing)
    images = _images()
    ref = pipe(prompt=_prompts(), image=images, strength=STRENGTH, num_inference_steps=n, guidance_scale=3.0,
               output_type="pt", generator=_seed()).images
    out, finite = _gen(pipe, kind, n).edit(images, torch.full((3,), STRENGTH), TARGETS, generator=_seed())
    assert finite.all() and out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert (out - images).abs().mean() > 0.05  # a real edit, not a trivially equal no-op


@pytest.mark.parametrize(("kind", "spacing", "n"), CASES)
def test_text_to_image(tiny, kind: str, spacing: str, n: int) -> None:
    pipe = _pipe(StableDiffusionPipeline, tiny, kind, spacing)
    ref = pipe(prompt=_prompts(), num_inference_steps=n, guidance_scale=3.0, output_type="pt", height=16, width=16,
               generator=_seed()).images
    gen = _gen(pipe, kind, n, gen_from_noise=True)
    out, finite = gen.edit(_images(), torch.ones(3), TARGETS, generator=_seed())
    assert finite.all()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("kind", "spacing", "n"), CASES)
def test_masked_blend(tiny, kind: str, spacing: str, n: int) -> None:
    """Inside the mask, the blend equals the inpainting pipeline's plain-UNet branch: the kept region is the source
    noised to the next grid timestep after every step, and the clean source after the last one."""
    pipe = _pipe(StableDiffusionInpaintPipeline, tiny, kind, spacing)
    images, masks = _images(), _masks()
    ref = pipe(prompt=_prompts(), image=images, mask_image=masks, strength=STRENGTH, num_inference_steps=n,
               guidance_scale=3.0, output_type="pt", height=16, width=16, generator=_seed()).images
    gen = _gen(pipe, kind, n, mask_mode="foreground", mask_dilate=0, inpaint="blend")
    out, finite = gen.edit(images, torch.full((3,), STRENGTH), TARGETS, generator=_seed(), masks=masks)
    inside = (masks > 0).expand_as(images)
    assert finite.all() and out.shape == ref.shape
    torch.testing.assert_close(out[inside], ref[inside], atol=ATOL, rtol=0)
    assert torch.equal(out[~inside], images[~inside])  # pasted back in pixel space
    assert (out - images).abs()[inside].mean() > 0.05


@pytest.mark.parametrize("kind", ["ddim", "euler", "dpmsolver++", "lcm"])
def test_masked_blend_from_noise(tiny, kind: str) -> None:
    """Strength 1 with gen_from_noise: the inpainting pipeline's ``is_strength_max`` start (pure noise, scaled)."""
    pipe = _pipe(StableDiffusionInpaintPipeline, tiny, kind, "trailing")
    images, masks = _images(), _masks()
    ref = pipe(prompt=_prompts(), image=images, mask_image=masks, strength=1.0, num_inference_steps=7,
               guidance_scale=3.0, output_type="pt", height=16, width=16, generator=_seed()).images
    gen = _gen(pipe, kind, 7, mask_mode="foreground", mask_dilate=0, inpaint="blend", gen_from_noise=True)
    out, _ = gen.edit(images, torch.ones(3), TARGETS, generator=_seed(), masks=masks)
    inside = (masks > 0).expand_as(images)
    torch.testing.assert_close(out[inside], ref[inside], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("kind", "spacing", "masked"), [("euler", "linspace", False), ("ddim", "trailing", True)])
def test_mixed_strengths_equal_each_sample_alone(tiny, kind: str, spacing: str, masked: bool) -> None:
    """Samples joining a 7-step grid at different steps (Euler: between training steps; DDIM trailing: a last step
    down to t = 0) are computed as if each ran alone."""
    comps = SDComponents(tiny["vae"], tiny["unet"], tiny["text_encoder"], tiny["tokenizer"],
                         _scheduler(tiny, kind, spacing))
    kw = dict(mask_mode="foreground", mask_dilate=0, inpaint="blend") if masked else {}
    gen = SDEditGenerator(comps, PROMPTS, schedule="grid", grid_steps=7, guidance_scale=2.5, scheduler=kind, **kw)
    images, masks = _images(4), _masks(4)
    noise = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7 + i)) for i in range(4)])
    strengths, targets = torch.tensor([0.3, 0.9, 0.55, 1.0]), torch.tensor([2, 0, 1, 1])

    def edit(i: slice) -> torch.Tensor:
        return gen.edit(images[i], strengths[i], targets[i], noise=noise[i], masks=masks[i] if masked else None)[0]

    batch = edit(slice(0, 4))
    for i in range(4):
        torch.testing.assert_close(batch[i:i + 1], edit(slice(i, i + 1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [6, 7, 10])
def test_euler_linspace_grid_is_diffusers_own(tiny, n: int) -> None:
    """The Euler grid keeps diffusers' float timesteps (what the UNet is given) and its interpolated sigmas."""
    ref = _scheduler(tiny, "euler", "linspace")
    ref.set_timesteps(n)
    sched = PerSampleScheduler("euler", ref.config, torch.device("cpu"))
    plan = sched.grid_schedule(torch.ones(1), n)
    assert plan.t[0].tolist() == ref.timesteps.tolist()
    assert plan.t.is_floating_point() == (n != 10)  # integers stay integers: N = 10 lands on training steps
    sigmas = sched._sigma(torch.cat([plan.t[0], plan.t_prev[0, -1:]])).flatten()
    if plan.t.is_floating_point():  # interpolated exactly as diffusers does it
        assert torch.equal(sigmas, ref.sigmas)
    else:  # the few-step table: sigmas computed in float64, rounded once (within an ulp of diffusers' float32)
        torch.testing.assert_close(sigmas, ref.sigmas, atol=0, rtol=1e-6)
