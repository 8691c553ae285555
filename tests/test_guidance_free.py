"""The guidance-free few-step path: aug.guidance_scale <= 1 runs one UNet pass of the edit batch per step (no
unconditional half), and aug.cuda_graph captures the K = 1/2 LCM loop with its per-step re-noise read from a static
buffer (drawn before the loop, in the order the eager loop draws it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_cuda_path import _fake_cuda, _graphed
from tiny_sd import build_tiny_sd_components

from online_aug.generator import SDComponents, SDEditGenerator
from online_aug.generator.graphs import graph_unsupported

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
PROMPTS = [f"digit {i}" for i in range(10)]


@pytest.fixture(scope="module")
def comps() -> SDComponents:
    t = build_tiny_sd_components(seed=0)
    return SDComponents(t["vae"], t["unet"], t["text_encoder"], t["tokenizer"], t["scheduler"])


class CountingUNet(torch.nn.Module):
    """Records the batch size of every call and forwards it."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.inner, self.batches = unet, []

    @property
    def config(self):
        return self.inner.config

    def forward(self, sample, *args, **kw):
        self.batches.append(int(sample.shape[0]))
        return self.inner(sample, *args, **kw)


def _edit(gen: SDEditGenerator, seed: int, m: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(m, 3, 16, 16, generator=g)
    s = torch.rand(m, generator=g) * 0.8 + 0.1  # new strengths each call: the timestep tables change
    out, finite = gen.edit(x, s, torch.randint(10, (m,), generator=g), generator=torch.Generator().manual_seed(seed))
    assert finite.all()
    return out


@pytest.mark.parametrize(("scheduler", "steps"), [("ddim", 4), ("lcm", 1), ("lcm", 2)])
@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_no_guidance_means_one_unet_pass_of_the_batch_per_step(comps, scheduler, steps, guidance):
    gen = SDEditGenerator(comps, PROMPTS, guidance_scale=guidance, steps=steps, scheduler=scheduler)
    gen.unet = counting = CountingUNet(comps.unet)
    _edit(gen, 0, m=3)
    assert not gen.do_cfg and counting.batches == [3] * steps  # K calls of batch M, not of 2M


def test_guidance_above_one_doubles_the_batch(comps):
    gen = SDEditGenerator(comps, PROMPTS, guidance_scale=3.0, steps=2)
    gen.unet = counting = CountingUNet(comps.unet)
    _edit(gen, 0, m=3)
    assert gen.do_cfg and counting.batches == [6, 6]


def test_lcm_few_step_loop_is_graph_capturable():
    for steps_kind in ("lcm", "ddim", "euler", "dpmsolver++"):
        cuda = SimpleNamespace(device=torch.device("cuda"), schedule="fewstep", mask_mode="off",
                               scheduler=SimpleNamespace(kind=steps_kind))
        assert graph_unsupported(cuda) is None
    grid = SimpleNamespace(device=torch.device("cuda"), schedule="grid", mask_mode="off",
                           scheduler=SimpleNamespace(kind="lcm"))
    assert "aug.schedule=grid" in graph_unsupported(grid)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_graphed_lcm_replays_equal_the_eager_loop(comps, monkeypatch, steps):
    """The stand-in graph re-runs the captured call on its static buffers: with the re-noise drawn inside the loop
    from the edit's generator, replays would not see each edit's own noise; read from the static buffer, they do."""
    _fake_cuda(monkeypatch)
    gen = SDEditGenerator(comps, PROMPTS, guidance_scale=1.0, steps=steps, scheduler="lcm")
    want = [_edit(gen, seed) for seed in range(3)] + [_edit(gen, 9, m=2)]
    noises = gen._step_noises(torch.zeros(2, 4, 8, 8), gen._schedule(torch.full((2,), 0.5)), None)
    assert (noises is None) == (steps == 1) and (noises is None or noises.shape == (steps - 1, 2, 4, 8, 8))
    _graphed(gen)
    got = [_edit(gen, seed) for seed in range(3)] + [_edit(gen, 9, m=2)]
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert len(gen.graph_loop.graphs) == 2 and gen.graph_loop.replays == 4
    if steps > 1:  # different seeds, different re-noise: the replays are not one cached output
        assert not torch.allclose(got[0], got[1])
