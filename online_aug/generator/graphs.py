"""Speed options of the generator on CUDA: ``aug.cuda_graph``, ``aug.compile``, ``aug.channels_last``.

The producer and the trainer are two Python threads launching small kernels: on a GPU they are launch-bound and take
turns at the GIL. In few-step mode the denoising loop has static shapes (K UNet calls with CFG on a batch of
exactly round(α·B) edits), so :class:`GraphedLoop` captures the whole loop once per shape as a CUDA graph, in the
thread that replays it (the producer), with ``capture_error_mode="thread_local"`` so that the trainer's thread keeps
launching meanwhile, after a warm-up on a side stream; a replay is then a single launch. Inputs are copied into
static buffers (latents, the per-sample timestep tables, the prompt embeddings, and LCM's per-step re-noise, drawn
before the loop from the edit's generator in the order the eager loop draws it) and the output is cloned out of the
graph's pool. A capture that fails leaves the eager loop in place, said once on stderr.

``aug.compile`` wraps the UNet in ``torch.compile`` instead (graphs are then not captured here: compile's own
``reduce-overhead`` mode would, and the two do not nest). ``aug.channels_last`` stores UNet and VAE weights in
channels_last, the layout cuDNN's fp16/bf16 convolution kernels are fastest in. Attention already runs through
PyTorch's SDPA (diffusers' ``AttnProcessor2_0``, the default with torch 2). TAESD (``aug.taesd``) is the
documented option for a faster encode/decode.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from online_aug.generator.schedulers import Schedule

if TYPE_CHECKING:
    from online_aug.config import AugConfig
    from online_aug.generator.sdedit import SDEditGenerator

MAX_SHAPES = 4  # graphs kept (aug.exact_alpha=false varies the edit count; each shape holds its own activations)
WARMUP = 2  # eager calls on a side stream before capture (cuDNN / cuBLAS autotuning, lazy inits stay out of it)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def graph_unsupported(gen: SDEditGenerator) -> str | None:
    """Why the loop of ``gen`` cannot be captured (None when it can)."""
    if gen.device.type != "cuda":
        return f"no CUDA device (device {gen.device})"
    if gen.schedule != "fewstep":
        return "aug.schedule=grid: each batch joins the loop at a strength-dependent step"
    if getattr(gen, "mask_mode", "off") != "off":
        return "aug.mask_mode is on (the masked loop runs eagerly)"
    return None


def apply_speed_options(gen: SDEditGenerator, aug: AugConfig) -> list[str]:
    """Set up ``aug.channels_last``, ``aug.compile`` and ``aug.cuda_graph`` on a built generator; returns one line
    per option saying what it does here (each also printed to stderr when it falls back)."""
    notes = []
    cuda = gen.device.type == "cuda"
    if aug.channels_last and cuda:
        gen.unet.to(memory_format=torch.channels_last)
        gen.vae.to(memory_format=torch.channels_last)
        notes.append("aug.channels_last: UNet and VAE weights in channels_last")
    if aug.compile:
        if cuda:
            gen.unet = torch.compile(gen.unet, dynamic=False)
            notes.append("aug.compile: UNet compiled with torch.compile (first edits of each shape compile it)")
        else:
            notes.append(f"aug.compile: eager UNet (no CUDA device, device {gen.device})")
            _say(notes[-1])
    if aug.cuda_graph != "never":
        why = "aug.compile is on" if aug.compile else graph_unsupported(gen)
        if why is None:
            gen.graph_loop = GraphedLoop(gen)
            notes.append("aug.cuda_graph: the few-step loop is captured per shape on first use")
        else:
            notes.append(f"aug.cuda_graph={aug.cuda_graph}: eager denoising loop ({why})")
            if aug.cuda_graph == "always":  # auto falls back silently: it is the default on every machine
                _say(notes[-1])
    return notes


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    lat: Tensor
    sched: Schedule
    emb: Tensor
    tcond: Tensor | None
    step_noises: Tensor | None
    out: Tensor


class GraphedLoop:
    """``gen._denoise`` as one CUDA graph per (latent shape, embedding shape, steps); eager where capture failed."""

    def __init__(self, gen: SDEditGenerator):
        self.gen = gen
        self.graphs: dict[tuple, _Captured] = {}
        self.failed: dict[tuple, str] = {}
        self.pool = None  # one memory pool for every shape's graph
        self.replays = 0

    def __call__(self, lat: Tensor, per_sample: Schedule, emb: Tensor, tcond: Tensor | None,
                 step_noises: Tensor | None = None) -> Tensor:
        key = (tuple(lat.shape), tuple(emb.shape), tuple(per_sample.t.shape), per_sample.first_step,
               None if tcond is None else tuple(tcond.shape), None if step_noises is None else tuple(step_noises.shape))
        cap = self.graphs.get(key)
        if cap is None and key not in self.failed:
            if len(self.graphs) >= MAX_SHAPES:
                self.failed[key] = f"more than {MAX_SHAPES} shapes"
                _say(f"aug.cuda_graph: eager loop for shape {key[0]} ({self.failed[key]}; aug.exact_alpha=true keeps "
                     f"one)")
            else:
                cap = self._capture(key, lat, per_sample, emb, tcond, step_noises)
        if cap is None:
            return self.gen._denoise(lat, per_sample, emb, tcond, step_noises)
        cap.lat.copy_(lat)
        for name in ("t", "t_prev", "active"):
            getattr(cap.sched, name).copy_(getattr(per_sample, name))
        cap.emb.copy_(emb)
        if tcond is not None:
            cap.tcond.copy_(tcond)
        if step_noises is not None:
            cap.step_noises.copy_(step_noises)
        cap.graph.replay()
        self.replays += 1
        return cap.out.clone()  # the graph's pool is overwritten by the next replay

    def _capture(self, key: tuple, lat: Tensor, per_sample: Schedule, emb: Tensor, tcond: Tensor | None,
                 step_noises: Tensor | None) -> _Captured | None:
        gen = self.gen
        sched = Schedule(per_sample.t.clone(), per_sample.t_prev.clone(), per_sample.active.clone(),
                         per_sample.start.clone(), per_sample.first_step)
        static = (lat.clone(), sched, emb.clone(), None if tcond is None else tcond.clone(),
                  None if step_noises is None else step_noises.clone())
        try:
            side = torch.cuda.Stream(gen.device)
            side.wait_stream(torch.cuda.current_stream(gen.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    gen._denoise(*static)
            torch.cuda.current_stream(gen.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # thread_local: the trainer's thread goes on launching (and allocating) while this thread captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = gen._denoise(*static)
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager loop, said once
            self.failed[key] = f"{type(e).__name__}: {e}"
            _say(f"aug.cuda_graph: capture failed for latents {key[0]}, eager loop instead ({self.failed[key]})")
            return None
        cap = _Captured(graph, static[0], sched, static[2], static[3], static[4], out)
        self.graphs[key] = cap
        return cap
