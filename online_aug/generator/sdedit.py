"""Batched SDEdit with a strength, target class and timestep schedule per sample.

SDEdit (Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations", ICLR 2022)
noises a real image's latent to an intermediate timestep and denoises it under a (target-class) prompt; diffusers
implements it as ``StableDiffusionImg2ImgPipeline``. Here every image of a batch has its own strength and target, so
the schedule is a per-sample table and the scheduler update is per sample (see :mod:`.schedulers`); one UNet call per
loop step serves the whole batch, with classifier-free guidance as ``[uncond; cond]``.

Prompt embeddings are computed once per class and cached; the text encoder never runs inside :meth:`edit`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from online_aug.config import ConfigError, fp16_needs_cuda
from online_aug.devices import resolve_dtype
from online_aug.generator.finetuned import apply_finetuned
from online_aug.generator.loading import SDComponents, load_sd
from online_aug.generator.prompts import check_prompt_template, class_prompts, prompt_templates, resolve_class_names
from online_aug.generator.schedulers import (
    PerSampleScheduler,
    Schedule,
    SchedulerKind,
    fewstep_schedule,
    full_strength,
    guidance_scale_embedding,
)

if TYPE_CHECKING:
    from online_aug.config import AugConfig

def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _fit_mask(m: Tensor, size: tuple[int, int]) -> Tensor:
    """A {0, 1} mask at another size: a cell counts as edited when any pixel of it is (max pool down, nearest up)."""
    if tuple(m.shape[-2:]) == size:
        return m
    if m.shape[-2] > size[0] or m.shape[-1] > size[1]:
        return F.adaptive_max_pool2d(m, size)
    return F.interpolate(m, size=size, mode="nearest")


class SDEditGenerator:
    """Few-step (default) or diffusers-grid SDEdit over a batch with per-sample strength and target class.

    ``strength`` (as diffusers describes it): indicates extent to transform the reference ``image``. Must be between
    0 and 1. ``image`` is used as a starting point and more noise is added the higher the ``strength``. The number of
    denoising steps depends on the amount of noise initially added. When ``strength`` is 1, added noise is maximum
    and the denoising process runs for the full number of iterations specified in ``num_inference_steps``. A value
    of 1 essentially ignores ``image``.

    How a strength ``s`` becomes a schedule (``T`` = ``num_train_timesteps``, 1000 for SD):

    - ``schedule="fewstep"``: every sample runs exactly ``K = steps`` UNet evaluations. Its start is
      ``t0 = min(T - 1, floor(s * T))``; step ``k`` (``k = 0..K-1``) is at ``t_k = round(t0 * (K - k) / K)``
      (round half up) and moves to ``t_{k+1}``; the last step moves to the end of the chain (timestep -1:
      ``final_alpha_cumprod`` for DDIM/LCM, sigma 0 for Euler). The image is noised to ``t0``. ``num_inference_steps``
      of the description above is ``K`` here, whatever ``s``.
    - ``schedule="grid"``: exactly ``StableDiffusionImg2ImgPipeline``'s schedule for ``(N = grid_steps, s)``:
      ``scheduler.set_timesteps(N)``, ``init_timestep = min(int(N * s), N)``, ``t_start = max(N - init_timestep, 0)``,
      ``timesteps = scheduler.timesteps[t_start:]``; the image is noised at ``timesteps[0]`` and runs ``int(N * s)``
      steps. Samples join the shared N-step loop at their entry step and are left untouched before it.

    ``int(N*s)`` and ``floor(s*T)`` are taken of the strength rounded to 6 decimals, so a float32 0.35 counts as
    0.35 (350, not 349). Where Python's double rounding makes diffusers land one lower (``int(100 * 0.29)`` is 28)
    this gives the decimal answer (29).

    Text-to-image Gen (``gen_from_noise``): a sample of strength 1 starts from pure noise (scaled as
    ``StableDiffusionPipeline`` scales its first latents) instead of the reference noised to the first timestep,
    where SD's ``alphas_cumprod`` at t = 999 still lets about 7 % of the reference latent through. In grid mode such
    a sample is ``StableDiffusionPipeline``'s text-to-image; it shares the batch with the SDEdit samples.

    DPM-Solver++ (``scheduler="dpmsolver++"``, ``solver_order`` 1 or 2) keeps a history per sample: a sample's
    first step is first order, as is the step down to sigma 0, whichever loop step the sample joins at.

    Guidance: classifier-free guidance with batch ``[uncond; cond]`` when ``guidance_scale > 1`` and the UNet has no
    ``time_cond_proj_dim``; an LCM-distilled UNet (with ``time_cond_proj_dim``) gets the guidance-scale embedding
    instead, as in diffusers.
    """

    def __init__(
        self,
        components: SDComponents,
        class_prompts: list[str],
        *,
        negative_prompt: str = "",
        guidance_scale: float = 3.0,
        schedule: Literal["fewstep", "grid"] = "fewstep",
        steps: int = 4,
        grid_steps: int = 25,
        scheduler: SchedulerKind = "ddim",
        solver_order: int = 2,
        gen_from_noise: bool = False,
        resolution: int = 0,
        latent_noise: float = 0.0,
        mask_mode: Literal["off", "foreground", "background"] = "off",
        mask_dilate: int = 0,
        inpaint: Literal["unet", "blend"] = "unet",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # The settings' ranges are config.validate's; what is checked here needs the loaded model.
        self.components = components
        self.vae, self.unet, self.taesd = components.vae, components.unet, components.taesd
        self.text_encoder, self.tokenizer = components.text_encoder, components.tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.guidance_scale = float(guidance_scale)
        self.schedule = schedule
        self.steps = int(steps)
        self.grid_steps = int(grid_steps)
        self.latent_noise = float(latent_noise)
        self.gen_from_noise = bool(gen_from_noise)
        self.negative_prompt = negative_prompt
        self.mask_mode, self.mask_dilate, self.inpaint = mask_mode, int(mask_dilate), inpaint
        self._check_inpaint_unet()
        try:
            self.scheduler = PerSampleScheduler(scheduler, components.scheduler.config, self.device, solver_order)
        except ValueError as e:
            raise ConfigError(f"aug.scheduler={scheduler!r} (aug.solver_order={solver_order}): {e}") from e
        if schedule == "grid" and scheduler == "lcm":
            orig = int(getattr(self.scheduler.ref.config, "original_inference_steps", grid_steps))
            if grid_steps > orig:
                raise ConfigError(f"aug.grid_steps={grid_steps} exceeds the LCM scheduler's original_inference_steps "
                                  f"({orig}); lower aug.grid_steps")

        self.vae_scale_factor = components.vae_scale_factor
        native = int(self.unet.config.sample_size) * self.vae_scale_factor
        self.resolution = int(resolution) or native
        # The UNet halves the latent once per down block but the last; the latent side must survive that.
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        if self.resolution % multiple:
            raise ConfigError(f"aug.resolution={self.resolution} must be a multiple of {multiple} for this model "
                              f"(0 uses the native {native})")

        self.time_cond_proj_dim = self.unet.config.time_cond_proj_dim
        self.do_cfg = self.guidance_scale > 1 and self.time_cond_proj_dim is None
        self.timestep_cond: Tensor | None = None
        if self.time_cond_proj_dim is not None:
            w = torch.tensor([self.guidance_scale - 1.0], device=self.device)
            self.timestep_cond = guidance_scale_embedding(w, self.time_cond_proj_dim).to(self.dtype)

        self.graph_loop = None  # aug.cuda_graph: a generator.graphs.GraphedLoop, set by apply_speed_options
        self.prompt_embeds: Tensor
        self.uncond_embeds: Tensor
        self.set_class_prompts(class_prompts)

    @classmethod
    def from_config(cls, aug: AugConfig, class_names: list[str], device: torch.device) -> SDEditGenerator:
        """Load ``aug.model`` (+ ``aug.textual_inversion`` / ``aug.lora``) and build the generator.

        Prompts are ``aug.prompt`` per class (see :func:`~online_aug.generator.prompts.render_prompt`: ``{name}``
        is the class name, or its learned token when ``aug.textual_inversion`` is set).
        """
        names = resolve_class_names(aug.class_names, class_names)
        templates = prompt_templates(aug)  # every template checked (and aug.prompt_file read) before loading
        for key, template in templates:
            check_prompt_template(template, key, with_tokens=bool(aug.textual_inversion))
        device = torch.device(device)
        fp16_needs_cuda("aug.dtype", aug.dtype, device.type == "cpu")  # a tool's --device may differ from run.device
        dtype = resolve_dtype(aug.dtype, device)
        components = load_sd(aug.model, device, dtype, aug.taesd)
        # Learned tokens and LoRA (tools/finetune_sd.py) go in before __init__ builds the prompt cache from them.
        tokens = apply_finetuned(components, aug, len(names))
        prompts = [class_prompts(template, names, tokens, key) for key, template in templates]
        return cls(
            components,
            prompts,
            negative_prompt=aug.negative_prompt,
            guidance_scale=aug.guidance_scale,
            schedule=aug.schedule,
            steps=aug.steps,
            grid_steps=aug.grid_steps,
            scheduler=aug.scheduler,
            solver_order=aug.solver_order,
            gen_from_noise=aug.gen_from_noise,
            resolution=aug.resolution,
            latent_noise=aug.latent_noise,
            mask_mode=aug.mask_mode,
            mask_dilate=aug.mask_dilate,
            inpaint=aug.inpaint,
            device=device,
            dtype=dtype,
        )

    def _check_inpaint_unet(self) -> None:
        """The UNet's input channels must fit the masked-edit setting: latents only (plain SD; ``blend``), or
        latents + mask + masked-image latents (the SD-inpainting architecture; ``unet``)."""
        lc, got = int(self.vae.config.latent_channels), int(self.unet.config.in_channels)
        if self.mask_mode == "off":
            if got != lc:
                raise ConfigError(f"aug.model's UNet takes {got} input channels (an inpainting model: latents, mask, "
                                  f"masked-image latents); set aug.mask_mode=foreground or background to use it")
        elif self.inpaint == "unet" and got != 2 * lc + 1:
            raise ConfigError(f"aug.mask_mode={self.mask_mode} with aug.inpaint=unet needs an SD-inpainting UNet "
                              f"({2 * lc + 1} input channels) but aug.model's has {got}; set aug.inpaint=blend "
                              f"(masked SDEdit on this UNet) or point aug.model at an inpainting model")
        elif self.inpaint == "blend" and got != lc:
            raise ConfigError(f"aug.inpaint=blend runs a plain UNet ({lc} input channels) but aug.model's has {got} "
                              f"(an inpainting model); set aug.inpaint=unet")

    def edit_region(self, masks: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``(region at the generation resolution R, region at size)``, [M, 1, ., .] in {0, 1}, 1 = edited.

        ``masks`` are object masks (> 0.5 = object) at any size; the object is dilated by ``mask_dilate`` pixels at
        R (semantic-aug §4.2.1: 16 px at 512, so the whole object is enclosed); background mode edits the
        complement of the dilated object, so the object and a margin around it stay as they are.
        """
        R = self.resolution
        m = F.interpolate((masks.float() > 0.5).float(), size=(R, R), mode="nearest")
        if self.mask_dilate > 0:
            m = F.max_pool2d(m, 2 * self.mask_dilate + 1, stride=1, padding=self.mask_dilate)
        if self.mask_mode == "background":
            m = 1 - m
        return m, _fit_mask(m, size)

    # ------------------------------------------------------------------ prompts

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """``[P, L, D]`` text embeddings, tokenised and encoded as ``StableDiffusionPipeline.encode_prompt`` does."""
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(self.device)
        out = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return out.to(device=self.device, dtype=self.dtype)

    def set_class_prompts(self, prompts: list[str] | list[list[str]]) -> None:
        """Rebuild the prompt cache: ``prompt_embeds [P*C, L, D]`` and ``uncond_embeds [1, L, D]``.

        ``prompts`` is one prompt per class, or (prompt diversity) one such list per template: row ``p * C + c`` of
        the cache is template ``p`` of class ``c``, so template 0 is indexed by the class id alone.
        """
        table = [list(row) for row in prompts] if prompts and isinstance(prompts[0], list) else [list(prompts)]
        if not table[0]:
            raise ConfigError("no class prompts: the dataset has no classes or aug.class_names is empty")
        if any(len(row) != len(table[0]) for row in table):
            raise ValueError("every prompt template needs one prompt per class")
        self.prompt_table = table
        self.class_prompts = table[0]
        self.num_templates = len(table)
        flat = [p for row in table for p in row]
        self.prompt_embeds = torch.cat([self.encode_prompts(flat[i:i + 256]) for i in range(0, len(flat), 256)])
        self.uncond_embeds = self.encode_prompts([self.negative_prompt])

    # ------------------------------------------------------------------ schedule

    def _schedule(self, strengths: Tensor) -> Schedule:
        if self.schedule == "fewstep":
            return fewstep_schedule(strengths, self.steps, self.scheduler.num_train_timesteps)
        return self.scheduler.grid_schedule(strengths, self.grid_steps)

    def timesteps_for(self, strengths: Tensor) -> Tensor:
        """``[M, S+1]`` timesteps per sample (``S = steps`` or ``grid_steps``), on ``strengths.device``: long, or
        float64 where the grid falls between training steps (Euler with "linspace" spacing, e.g. N = 7).

        Column ``k < S`` is the timestep the sample is at when loop step ``k`` runs, or -1 when it does not take part
        in that step (grid mode, before it joins); the last column is -1, the clean end of the chain. The number of
        denoising steps of a sample is ``(table[:, :-1] >= 0).sum(1)``: ``K`` in few-step mode, ``int(N*s)`` in grid
        mode. (DDIM in grid mode steps from ``t`` to ``t - T//N`` as diffusers does, which can differ by one from the
        next column when ``T/N`` is not an integer and spacing is "trailing" or "linspace".)
        """
        return self._schedule(strengths).table().to(strengths.device)

    # ------------------------------------------------------------------ VAE

    def _encode(self, x: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> scaled latents (the VAE posterior mean: SDEdit's noise comes from add_noise only)."""
        if self.taesd is not None:
            return self.taesd.encode(x).latents * self.taesd.config.scaling_factor
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor  # force_upcast

    def _decode(self, z: Tensor) -> Tensor:
        if self.taesd is not None:
            return self.taesd.decode(z / self.taesd.config.scaling_factor).sample
        return self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    # ------------------------------------------------------------------ edit

    def _step_noises(self, lat: Tensor, per_sample: Schedule, generator: torch.Generator | None) -> Tensor | None:
        """LCM's re-noise of every loop step but the last, ``[steps, M, C, h, w]`` float32, drawn before the loop
        (None for the other schedulers, or when no step re-noises). The draws are the ones the loop would make one
        by one, in the same order; drawn ahead, a CUDA graph of the loop reads them from a static buffer (a graph
        cannot replay draws from a host generator)."""
        n = per_sample.t.shape[1] - 1 - per_sample.first_step
        if self.scheduler.kind != "lcm" or n <= 0:
            return None
        dev, dt = self.device, self.dtype
        return torch.stack([randn_tensor(lat.shape, generator=generator, device=dev, dtype=dt).float()
                            for _ in range(n)])

    def _denoise(self, lat: Tensor, per_sample: Schedule, emb: Tensor, tcond: Tensor | None = None,
                 step_noises: Tensor | None = None, extra_in: Tensor | None = None, region_lat: Tensor | None = None,
                 z_ref: Tensor | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """The denoising loop over the schedule's steps (float32 latents in and out); what ``aug.cuda_graph``
        captures once per shape (generator/graphs.py). ``step_noises``: LCM's re-noise per step
        (:meth:`_step_noises`; drawn here from ``generator`` when None)."""
        dev, dt = self.device, self.dtype
        S = per_sample.t.shape[1]
        history = self.scheduler.new_history(lat)  # multistep solvers: each sample's own previous prediction
        for k in range(per_sample.first_step, S):
            t, t_prev, active = per_sample.t[:, k], per_sample.t_prev[:, k], per_sample.active[:, k]
            inp = self.scheduler.scale_model_input(lat, t).to(dt)
            if extra_in is not None:
                inp = torch.cat([inp, extra_in], 1)
            t_in = t.float() if t.is_floating_point() else t  # diffusers' float32 timesteps (Euler, linspace)
            if self.do_cfg:
                inp, t_in = torch.cat([inp, inp]), torch.cat([t_in, t_in])
            out = self.unet(inp, t_in, encoder_hidden_states=emb, timestep_cond=tcond, return_dict=False)[0].float()
            if self.do_cfg:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
            step_noise = None
            if self.scheduler.kind == "lcm" and k < S - 1:
                step_noise = (step_noises[k - per_sample.first_step] if step_noises is not None else
                              randn_tensor(lat.shape, generator=generator, device=dev, dtype=dt).float())
            new = self.scheduler.step(out, lat, t, t_prev, step_noise, history, active)
            if region_lat is not None and self.inpaint == "blend":
                # The kept region, as StableDiffusionInpaintPipeline blends it: the reference noised to the next
                # grid timestep (not t_prev: a DDIM step on a trailing or linspace grid lands off the grid), and the
                # clean reference after the last step, also where that step ends at t = 0 (DDIM, trailing).
                t_keep = per_sample.t[:, k + 1] if k + 1 < S else torch.full_like(t, -1)
                new = region_lat * new + (1 - region_lat) * self.scheduler.add_noise(z_ref, noise, t_keep)
            # Grid mode: a sample that has not joined yet keeps its noised latent (the mask is a tensor op: no sync).
            lat = torch.where(active.view(-1, 1, 1, 1), new, lat)
        return lat

    @torch.inference_mode()
    def edit(
        self,
        images: Tensor,
        strengths: Tensor,
        targets: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        masks: Tensor | None = None,
        templates: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """SDEdit ``images`` towards the prompts of ``targets``, each sample with its own strength.

        Args:
            images: ``[M, 3, H, W]`` float in [0, 1] at the classifier resolution, on ``self.device``.
            strengths: ``[M]`` float in [0, 1] (see the class docstring). Keep them on the CPU: the schedule table is
                built on the host, so strengths on the GPU cost one device sync here (before the loop, never in it).
            targets: ``[M]`` long class ids indexing the prompt cache.
            templates: optional ``[M]`` long prompt-template ids (prompt diversity; default template 0).
            generator: RNG for all noise (CPU or ``self.device`` generator; ``randn_tensor`` draws on the generator's
                device and copies). Draw order: the SDEdit noise ``[M, 4, h, w]`` (unless ``noise`` is given), then
                the latent perturbation if ``latent_noise > 0``, then (LCM) one ``[M, 4, h, w]`` re-noise per step
                except the last. The first draw is the same call as the img2img pipeline's ``prepare_latents``.
            noise: optional ``[M, 4, h, w]`` SDEdit noise (``h = w = resolution / vae scale``), e.g. drawn per sample
                so that a sample's result does not depend on the batch it is in.
            masks: ``[M, 1, H', W']`` object masks (> 0.5 = object), required when ``mask_mode`` is not off. Only the
                :meth:`edit_region` changes: with ``inpaint="unet"`` the SD-inpainting UNet gets the mask and the
                masked-image latents as diffusers' ``StableDiffusionInpaintPipeline`` builds them; with ``"blend"``
                the kept region of the latent is replaced after every step by the reference noised to the next
                timestep of the sample's schedule, or the clean reference after its last step (the plain-UNet branch
                of that pipeline; RePaint, Lugmayr et al. 2022, without its resampling). Either way the decoded edit
                is pasted into the source through the region at the classifier resolution (diffusers'
                ``apply_overlay``): the kept pixels are the source's exactly, not a VAE round trip of them.

        Returns:
            ``(edited, finite)``: ``edited`` is ``[M, 3, H, W]`` float32 in [0, 1]; ``finite`` is ``[M]`` bool. A
            sample whose decoded image is not finite is replaced by its input image and flagged False.
        """
        M, _, H, W = images.shape
        dev, dt = self.device, self.dtype
        if (masks is None) != (self.mask_mode == "off"):
            raise ValueError(f"aug.mask_mode={self.mask_mode}: masks must be given exactly when a mask mode is on")
        per_sample = self._schedule(strengths).to(dev)  # each sample's timesteps, one column per loop step
        targets = targets.to(dev)
        R = self.resolution

        x = _resize(images.to(dev, torch.float32), (R, R)) * 2 - 1
        # The loop state stays float32 (the UNet runs in self.dtype): per-sample alphas are float32 tensors, and
        # fp16 latents would lose precision in the x0 reconstruction at high noise levels.
        gen = full_strength(strengths) if self.gen_from_noise else None  # text-to-image samples (host bools)
        if gen is not None and bool(gen.all()) and masks is None:  # no reference is read: skip the VAE encoder
            side = R // self.vae_scale_factor
            z0 = torch.zeros(M, int(self.vae.config.latent_channels), side, side, device=dev)
        else:
            z0 = self._encode(x.to(dt)).float()
        if noise is None:
            noise = randn_tensor(z0.shape, generator=generator, device=dev, dtype=dt)
        elif noise.shape != z0.shape:
            raise ValueError(f"noise must have shape {tuple(z0.shape)}, got {tuple(noise.shape)}")
        z_ref = z0
        if self.latent_noise > 0:  # latent perturbation (semantic-aug §3.1): z0 + delta * N(0, I)
            z0 = z0 + self.latent_noise * randn_tensor(z0.shape, generator=generator, device=dev, dtype=dt).float()
        noise = noise.to(dev).float()
        lat = self.scheduler.add_noise(z0, noise, per_sample.start)
        if gen is not None:  # text-to-image Gen: a sample of strength 1 starts from pure noise, not the reference
            lat = torch.where(gen.to(dev).view(-1, 1, 1, 1), self.scheduler.init_noise(noise, per_sample.start), lat)
        region = region_lat = extra_in = None
        if masks is not None:
            region_r, region = self.edit_region(masks.to(dev), (H, W))
            region_lat = _fit_mask(region_r, tuple(lat.shape[-2:]))
            if self.inpaint == "unet":  # the inpainting UNet's extra inputs, as StableDiffusionInpaintPipeline's
                masked = self._encode((x * (region_r < 0.5)).to(dt)).float()
                extra_in = torch.cat([F.interpolate(region_r, size=lat.shape[-2:]), masked], 1).to(dt)

        rows = targets if templates is None else templates.to(dev) * len(self.class_prompts) + targets
        cond = self.prompt_embeds[rows]
        if self.do_cfg:
            emb = torch.cat([self.uncond_embeds.expand(M, -1, -1), cond])
        else:
            emb = cond
        tcond = None
        if self.timestep_cond is not None:
            tcond = self.timestep_cond.expand(emb.shape[0], -1)

        step_noises = self._step_noises(lat, per_sample, generator)
        if self.graph_loop is not None and extra_in is None and region_lat is None:
            lat = self.graph_loop(lat, per_sample, emb, tcond, step_noises)  # aug.cuda_graph: one replay per edit
        else:
            lat = self._denoise(lat, per_sample, emb, tcond, step_noises, extra_in, region_lat, z_ref, noise, generator)

        img = self._decode(lat.to(dt)).float()
        # NaN/inf guard as a tensor op (no host sync): checked before clamping, which would turn inf into 1.
        finite = torch.isfinite(img).flatten(1).all(dim=1)
        img = _resize((img / 2 + 0.5).clamp(0, 1), (H, W)).clamp(0, 1)
        edited = torch.where(finite.view(-1, 1, 1, 1), img, images.to(dev, torch.float32))
        if region is not None:
            edited = torch.where(region > 0, edited, images.to(dev, torch.float32))
        return edited, finite
