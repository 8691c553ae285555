"""Per-sample timestep schedules and scheduler updates for batched SDEdit (Meng et al., 2022).

diffusers' schedulers step a whole batch at one shared timestep. Online augmentation draws a strength per image, so
every sample here carries its own schedule (a row of a ``[M, S]`` table) and the DDIM / Euler / LCM / DPM-Solver++
update is written out per sample with ``alphas_cumprod`` gathered at each row's timestep. The updates reproduce
``DDIMScheduler.step`` (eta=0), ``EulerDiscreteScheduler.step`` (no churn), ``LCMScheduler.step`` and
``DPMSolverMultistepScheduler.step`` (``algorithm_type="dpmsolver++"``, orders 1 and 2, midpoint) from the loaded
scheduler config; the grid schedule reproduces ``StableDiffusionImg2ImgPipeline.get_timesteps``.

Schedule tables are built on the host from the strengths (one copy of ``M`` floats), so the denoising loop itself
needs no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler
from torch import Tensor

SchedulerKind = Literal["ddim", "euler", "lcm", "dpmsolver++"]
SCHEDULER_CLASSES: dict[str, Any] = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "lcm": LCMScheduler,
                                     "dpmsolver++": DPMSolverMultistepScheduler}
SOLVER_ORDERS = (1, 2)  # DPM-Solver++ orders of the per-sample update (diffusers' 2M is order 2)
# The DPM-Solver++ variant reproduced: sigmas at the integer timesteps, the last step first order down to sigma 0.
DPM_SETTINGS: dict[str, Any] = dict(algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero",
                                    lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                                    use_lu_lambdas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                                    use_flow_sigmas=False)

# Strengths arrive as float32 tensors: 0.35 is stored as 0.34999999, and floor(1000 * s) would give 349 where the
# caller meant 350 (as the Python float diffusers receives would give). Strengths are therefore rounded to 6
# decimals (float32 resolution) before the floor.
def _floor_times(s: Tensor, n: int) -> Tensor:
    """``floor(n * s)`` of the 6-decimal strength (a tiny tolerance absorbs the remaining double rounding)."""
    s6 = torch.round(s.double() * 1e6) / 1e6
    return torch.floor(s6 * n + 1e-9).long()


def full_strength(strengths: Tensor) -> Tensor:
    """``[M]`` bool on the host: the strengths that are 1 (to 6 decimals), the samples text-to-image Gen starts from
    pure noise."""
    s = strengths.detach().to("cpu", torch.float64).reshape(-1)
    return _floor_times(s, 10**6) >= 10**6


@dataclass
class Schedule:
    """Per-sample schedule over ``S`` loop steps (all tensors on one device).

    Attributes:
        t: ``[M, S]``, the timestep sample ``m`` is at when loop step ``k`` runs (fed to the UNet). Long, except
            for a grid that falls between training steps (Euler with "linspace" spacing, e.g. 832.5 for N = 7):
            float64 holding diffusers' float32 timesteps, whose sigmas are interpolated as diffusers does.
        t_prev: ``[M, S]``, same dtype, the timestep step ``k`` moves it to; ``-1`` means the end of the chain
            (``final_alpha_cumprod`` for DDIM/LCM, sigma 0 for Euler and DPM-Solver++).
        active: ``[M, S]`` bool, whether sample ``m`` is updated at step ``k`` (grid mode: it has joined).
        start: ``[M]``, same dtype, the timestep the clean latent is noised to; ``-1`` for a sample with no steps.
        first_step: first loop step at which any sample is active (a host int: earlier steps are skipped).
    """

    t: Tensor
    t_prev: Tensor
    active: Tensor
    start: Tensor
    first_step: int

    def to(self, device: torch.device) -> Schedule:
        return Schedule(
            self.t.to(device, non_blocking=True),
            self.t_prev.to(device, non_blocking=True),
            self.active.to(device, non_blocking=True),
            self.start.to(device, non_blocking=True),
            self.first_step,
        )

    def table(self) -> Tensor:
        """``[M, S+1]`` timesteps: ``t`` with inactive steps set to -1, then a final column of -1 (clean)."""
        t = torch.where(self.active, self.t, torch.full_like(self.t, -1))
        return torch.cat([t, torch.full_like(t[:, :1], -1)], dim=1)


def fewstep_schedule(strengths: Tensor, steps: int, num_train_timesteps: int) -> Schedule:
    """K steps for every sample from its own start ``t0 = min(T-1, floor(s*T))`` down to the clean end.

    ``t_k = round(t0 * (K - k) / K)`` for ``k = 0..K-1`` (round half up), and the step after ``t_{K-1}`` goes to -1
    (clean). Every sample runs exactly ``K`` UNet evaluations whatever its strength; ``s -> 0`` gives ``t0 = 0``,
    steps that leave the latent (nearly) unchanged.
    """
    s = strengths.detach().to("cpu", torch.float64).reshape(-1)
    T, K = num_train_timesteps, steps
    t0 = _floor_times(s, T).clamp(0, T - 1)
    frac = torch.arange(K, 0, -1, dtype=torch.float64) / K  # (K-k)/K for k = 0..K-1
    t = torch.floor(t0[:, None].double() * frac[None, :] + 0.5).long()
    t_prev = torch.cat([t[:, 1:], torch.full_like(t[:, :1], -1)], dim=1)
    active = torch.ones_like(t, dtype=torch.bool)
    return Schedule(t, t_prev, active, t[:, 0].clone(), 0)


@dataclass
class SolverHistory:
    """What a multistep solver keeps per sample: its last data prediction and the timestep it was made at.

    ``has[m]`` is False until sample ``m`` has taken a step (grid mode: samples join the loop at different steps).
    """

    x0: Tensor
    t: Tensor
    has: Tensor


class PerSampleScheduler:
    """DDIM (eta=0), Euler (sigma space), LCM or DPM-Solver++ (multistep, order 1 or 2) updates, one timestep per
    sample.

    Built from the loaded scheduler's config (``alphas_cumprod``, ``prediction_type``, ``set_alpha_to_one``,
    ``clip_sample``, LCM's ``timestep_scaling``), whatever scheduler class that config came from.
    """

    def __init__(self, kind: SchedulerKind, config: Any, device: torch.device, solver_order: int = 2) -> None:
        if kind not in SCHEDULER_CLASSES:
            raise ValueError(f"unknown scheduler {kind!r}; choose one of {sorted(SCHEDULER_CLASSES)}")
        if kind == "dpmsolver++" and solver_order not in SOLVER_ORDERS:
            raise ValueError(f"solver order {solver_order} is not implemented per sample; use one of {SOLVER_ORDERS}")
        self.kind = kind
        self.solver_order = int(solver_order)
        # A private instance: set_timesteps mutates it, and the loaded scheduler may be shared with a pipeline.
        extra = dict(DPM_SETTINGS, solver_order=self.solver_order) if kind == "dpmsolver++" else {}
        self.ref = SCHEDULER_CLASSES[kind].from_config(config, **extra)
        cfg = self.ref.config
        if getattr(cfg, "thresholding", False):
            raise ValueError("scheduler config has thresholding=True, which the per-sample update does not implement")
        self.prediction_type: str = cfg.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.num_train_timesteps: int = int(cfg.num_train_timesteps)
        clip = getattr(cfg, "clip_sample", False)
        self.clip_sample_range: float | None = float(cfg.clip_sample_range) if clip else None
        ac = self.ref.alphas_cumprod.double()
        if kind in ("euler", "dpmsolver++"):
            final = torch.ones(1, dtype=torch.float64)  # these end at sigma = 0 (final_sigmas_type "zero")
        else:
            final = torch.as_tensor(self.ref.final_alpha_cumprod, dtype=torch.float64).reshape(1)
        # Index t + 1, so that t = -1 (end of chain) gathers the final value without a branch.
        ac_ext = torch.cat([final, ac])
        self.ac_ext = ac_ext.float().to(device)
        self.sigma_ext = ((1 - ac_ext) / ac_ext).sqrt().float().to(device)
        # Sigmas between training steps, as EulerDiscreteScheduler.set_timesteps makes them: its float32 sigma
        # table, linearly interpolated in float64 (np.interp), the result rounded to float32.
        ac32 = self.ref.alphas_cumprod.float()
        sigma32 = ((1 - ac32) / ac32) ** 0.5
        self.sigma_interp = torch.cat([torch.zeros(1, dtype=torch.float64), sigma32.double()]).to(device)
        self.timestep_scaling = float(getattr(cfg, "timestep_scaling", 10.0))
        self.sigma_data = 0.5  # LCM boundary condition constant, as in LCMScheduler

    # ------------------------------------------------------------------ schedules

    def grid_timesteps(self, num_steps: int) -> Tensor:
        """The N-step grid of ``set_timesteps(N)`` for this scheduler class: long where every entry is a training
        step, else (Euler, "linspace" spacing, N - 1 not dividing T - 1) float64 of diffusers' float32 timesteps."""
        self.ref.set_timesteps(num_steps, device="cpu")
        grid = self.ref.timesteps.double()
        return grid.long() if torch.equal(grid, grid.round()) else grid

    def grid_schedule(self, strengths: Tensor, num_steps: int) -> Schedule:
        """diffusers img2img semantics per sample: the tail of one N-step grid.

        ``init_timestep = min(int(N*s), N)``, ``t_start = max(N - init_timestep, 0)``, the sample runs
        ``timesteps[t_start:]`` (these schedulers have ``order`` 1, DPM-Solver++'s multistep included) and is noised
        at ``timesteps[t_start]``. A DDIM step moves to ``t - T // N`` as ``DDIMScheduler.step`` does; Euler, LCM and
        DPM-Solver++ move to the next grid entry.
        """
        s = strengths.detach().to("cpu", torch.float64).reshape(-1)
        N = num_steps
        grid = self.grid_timesteps(N)
        if grid.numel() != N:
            raise ValueError(f"{self.kind} scheduler gave {grid.numel()} timesteps for num_inference_steps={N}")
        n = _floor_times(s, N).clamp(0, N)  # init_timestep: steps each sample runs
        t_start = (N - n).clamp(min=0)
        M = s.numel()
        t = grid[None, :].expand(M, N).clone()
        if self.kind == "ddim":
            prev = grid - self.num_train_timesteps // N
            prev = torch.where(prev >= 0, prev, torch.full_like(prev, -1))
        else:
            prev = torch.cat([grid[1:], grid.new_full((1,), -1)])
        t_prev = prev[None, :].expand(M, N).clone()
        active = torch.arange(N)[None, :] >= t_start[:, None]
        start = torch.where(n > 0, grid[t_start.clamp(max=N - 1)], grid.new_full(n.shape, -1))
        first = int(N - n.max().item()) if M else N
        return Schedule(t, t_prev, active, start, first)

    # ------------------------------------------------------------------ per-sample math

    def _a(self, t: Tensor) -> Tensor:
        return self.ac_ext[t + 1].view(-1, 1, 1, 1)

    def _sigma(self, t: Tensor) -> Tensor:
        if not t.is_floating_point():
            return self.sigma_ext[t + 1].view(-1, 1, 1, 1)
        lo = torch.floor(t)
        i = lo.long() + 1  # t = -1 (end of chain) reads sigma 0 at index 0
        hi = self.sigma_interp[(i + 1).clamp(max=self.sigma_interp.numel() - 1)]
        sigma = self.sigma_interp[i] + (t - lo) * (hi - self.sigma_interp[i])
        return sigma.float().view(-1, 1, 1, 1)

    def add_noise(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Noise clean latents to each sample's own timestep (``t = -1``: left clean)."""
        if self.kind == "euler":
            x = z0 + noise * self._sigma(t)
        else:
            a = self._a(t)
            x = a**0.5 * z0 + (1 - a) ** 0.5 * noise
        return torch.where((t >= 0).view(-1, 1, 1, 1), x, z0)

    def init_noise(self, noise: Tensor, t: Tensor) -> Tensor:
        """Pure noise at each sample's timestep ``t`` (text-to-image from scratch), scaled as the text-to-image
        pipeline scales its first latents (``init_noise_sigma``: 1, or Euler's sigma of ``t``)."""
        if self.kind != "euler":
            return noise
        sigma = self._sigma(t)
        if getattr(self.ref.config, "timestep_spacing", "linspace") in ("linspace", "trailing"):
            return noise * sigma
        return noise * (sigma**2 + 1) ** 0.5

    def scale_model_input(self, x: Tensor, t: Tensor) -> Tensor:
        if self.kind == "euler":
            return x / (self._sigma(t) ** 2 + 1) ** 0.5
        return x

    def new_history(self, x: Tensor) -> SolverHistory | None:
        """Empty per-sample history for a multistep solver (None for the one-step updates)."""
        if self.kind != "dpmsolver++":
            return None
        m = x.shape[0]
        return SolverHistory(torch.zeros_like(x), torch.full((m,), -1, dtype=torch.long, device=x.device),
                             torch.zeros(m, dtype=torch.bool, device=x.device))

    def _x0_eps(self, out: Tensor, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """(predicted clean latent, predicted noise) from the model output, as DDIMScheduler.step derives them."""
        b = 1 - a
        if self.prediction_type == "epsilon":
            x0, eps = (x - b**0.5 * out) / a**0.5, out
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x - a**0.5 * x0) / b**0.5
        else:  # v_prediction
            x0 = a**0.5 * x - b**0.5 * out
            eps = a**0.5 * out + b**0.5 * x
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def step(self, out: Tensor, x: Tensor, t: Tensor, t_prev: Tensor, noise: Tensor | None = None,
             history: SolverHistory | None = None, active: Tensor | None = None) -> Tensor:
        """One update of every sample from ``t[m]`` to ``t_prev[m]`` (``-1``: end of chain).

        ``noise`` is needed by LCM only (re-noising to ``t_prev``); samples whose ``t_prev`` is -1 return the
        denoised latent, as ``LCMScheduler.step`` does on its last step. DPM-Solver++ needs ``history``
        (:meth:`new_history`), updated in place for the ``active`` samples (all when None).
        """
        if self.kind == "dpmsolver++":
            if history is None:
                raise ValueError("DPM-Solver++ steps need the per-sample history of new_history()")
            return self._dpm_step(out, x, t, t_prev, history, active)
        if self.kind == "euler":
            sigma, sigma_prev = self._sigma(t), self._sigma(t_prev)
            if self.prediction_type == "epsilon":
                x0 = x - sigma * out
            elif self.prediction_type == "v_prediction":
                x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
            else:
                x0 = out
            derivative = (x - x0) / sigma
            return x + derivative * (sigma_prev - sigma)
        a, a_prev = self._a(t), self._a(t_prev)
        if self.kind == "ddim":
            x0, eps = self._x0_eps(out, x, a)
            return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        # LCM: consistency-model boundary condition, then re-noise to t_prev with fresh noise.
        x0, _ = self._x0_eps(out, x, a)
        scaled = t.view(-1, 1, 1, 1).to(x.dtype) * self.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        denoised = c_out * x0 + c_skip * x
        if noise is None:
            return denoised
        renoised = a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * noise
        return torch.where((t_prev < 0).view(-1, 1, 1, 1), denoised, renoised)


    def _dpm_alpha_sigma_lambda(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t`` and lambda = log(alpha / sigma) at ``t``."""
        sigma = self._sigma(t)
        alpha = 1 / (sigma**2 + 1) ** 0.5
        s = sigma * alpha
        return alpha, s, torch.log(alpha) - torch.log(s)

    # Hand-written because diffusers' multistep scheduler keeps one history and one step index for the whole batch,
    # while here every sample has its own timesteps and joins the loop at its own step (grid mode).
    def _dpm_step(self, out: Tensor, x: Tensor, t: Tensor, t_prev: Tensor, history: SolverHistory,
                  active: Tensor | None) -> Tensor:
        """DPM-Solver++ (Lu et al. 2022) per sample, as ``DPMSolverMultistepScheduler.step`` with the settings of
        ``DPM_SETTINGS``: first order on a sample's first step and on the step down to sigma 0, else (order 2) the
        2M midpoint update from the previous data prediction."""
        a = self._a(t)
        x0, _ = self._x0_eps(out, x, a)  # convert_model_output: the data prediction (dpmsolver++)
        alpha_t, sigma_t, lambda_t = self._dpm_alpha_sigma_lambda(t_prev)
        _, sigma_s0, lambda_s0 = self._dpm_alpha_sigma_lambda(t)
        h = lambda_t - lambda_s0
        phi = alpha_t * (torch.exp(-h) - 1.0)
        first = (sigma_t / sigma_s0) * x - phi * x0
        new = first
        if self.solver_order == 2:
            _, _, lambda_s1 = self._dpm_alpha_sigma_lambda(history.t.clamp(min=0))
            r0 = (lambda_s0 - lambda_s1) / h
            second = first - 0.5 * phi * (1.0 / r0) * (x0 - history.x0)
            use2 = (history.has & (t_prev >= 0)).view(-1, 1, 1, 1)
            new = torch.where(use2, second, first)  # the unused branch may hold inf (sigma 0): where() drops it
        upd = torch.ones_like(history.has) if active is None else active
        history.x0 = torch.where(upd.view(-1, 1, 1, 1), x0, history.x0)
        history.t = torch.where(upd, t, history.t)
        history.has = history.has | upd
        return new


def guidance_scale_embedding(w: Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of the guidance scale for LCM-distilled UNets (``time_cond_proj_dim``), as diffusers."""
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = math.log(10000.0) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, dtype=dtype, device=w.device) * -emb)
    emb_w = w.to(dtype)[:, None] * freqs[None, :]
    out = torch.cat([torch.sin(emb_w), torch.cos(emb_w)], dim=1)
    if embedding_dim % 2 == 1:
        out = torch.nn.functional.pad(out, (0, 1))
    return out
