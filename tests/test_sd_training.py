"""The small shared pieces behind the generator tools: schedules, per-step RNG, the denoising loss, class names, and
the draw of inter-class edits (fast; no model is trained)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from tiny_sd import SD_SCHEDULER_CONFIG

from online_aug.config import ConfigError, load_config
from online_aug.generator import resolve_class_names
from online_aug.rng import step_rng
from online_aug.schedules import warmup_cosine
from online_aug.sdtrain.edit_quality import inter_class_edits
from online_aug.sdtrain.sd_training import class_uniform_weights, denoising_loss, sample_latents, training_scheduler
from online_aug.trainer import lr_lambda


def test_warmup_cosine() -> None:
    assert [warmup_cosine(s, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(9, 4, 14) == pytest.approx(0.5)  # half-way through the decay
    assert warmup_cosine(14, 4, 14, 0.1) == pytest.approx(0.1) and warmup_cosine(99, 4, 14, 0.1) == pytest.approx(0.1)
    # min_ratio 1: warm-up, then exactly constant whatever the total (what resuming fine-tuning relies on)
    assert [warmup_cosine(s, 2, t, 1.0) for s, t in [(0, 5), (1, 5), (2, 5), (7, 5), (7, 500)]] == [0.5, 1, 1, 1, 1]
    assert warmup_cosine(0, 0, 10) == 1.0  # no warm-up


def test_trainer_lr_lambda_is_warmup_cosine() -> None:
    cfg = load_config(None, ["train.steps=50", "train.warmup_steps=5", "train.min_lr_ratio=0.2"])
    f = lr_lambda(cfg, cfg.train.steps)
    for step in range(60):
        progress = min(1.0, (step - 5) / 45)
        want = (step + 1) / 5 if step < 5 else 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress))
        assert f(step) == pytest.approx(want)


def test_step_rng_is_a_function_of_its_keys() -> None:
    a = torch.rand(3, generator=step_rng(1, 0, 5))
    assert torch.equal(a, torch.rand(3, generator=step_rng(1, 0, 5)))
    assert not torch.equal(a, torch.rand(3, generator=step_rng(1, 0, 6)))


def test_training_scheduler_has_the_models_noise_schedule() -> None:
    ddim = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    torch.testing.assert_close(training_scheduler(ddim.config).alphas_cumprod, ddim.alphas_cumprod, rtol=0, atol=0)


class _EchoUNet(torch.nn.Module):
    """Predicts its noisy input, and remembers the timesteps it was called with."""

    def forward(self, z, t, encoder_hidden_states):
        self.t = t
        return SimpleNamespace(sample=z)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoising_loss_noises_with_the_schedule(prediction_type: str) -> None:
    sched = training_scheduler(DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type).config)
    z0 = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    unet = _EchoUNet()
    loss = denoising_loss(unet, sched, z0, torch.zeros(4, 1, 1), torch.Generator().manual_seed(3))
    # The same draws, in the documented order: timesteps, then noise.
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    assert torch.equal(unet.t, t)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(zt, target))


def test_class_uniform_weights_and_posterior_samples() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    w = class_uniform_weights(labels, 3)
    assert [float(w[labels == c].sum()) for c in range(3)] == pytest.approx([1.0, 1.0, 1.0])
    mean, std = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(sample_latents(mean, std, g), 2 * torch.randn(2, 3, generator=torch.Generator()
                                                                            .manual_seed(0)))


def test_resolve_class_names() -> None:
    assert resolve_class_names([], ["a", "b"]) == ["a", "b"]
    assert resolve_class_names(["x", "y"], ["a", "b"]) == ["x", "y"]
    with pytest.raises(ConfigError, match=r"aug\.class_names has 1 names but the dataset has 2 classes"):
        resolve_class_names(["x"], ["a", "b"])
    with pytest.raises(ConfigError, match=r"--names has 3 names"):
        resolve_class_names(["x", "y", "z"], ["a", "b"], key="--names")


def test_inter_class_edits_never_target_the_source() -> None:
    labels = np.repeat(np.arange(5), 4)
    index, source, target = inter_class_edits(labels, 5, 500, seed=0)
    assert (source == labels[index]).all() and (target != source).all()
    assert set(target.tolist()) == set(range(5))
    again = inter_class_edits(labels, 5, 500, seed=0)
    assert all((a == b).all() for a, b in zip((index, source, target), again))
