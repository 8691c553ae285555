"""train.guard_every=0 (the default) resolves per device: an exact per-micro-batch skip where the host read of the
loss is free (CPU), one read per train.log_every steps on CUDA, where it would stall the launch queue every step."""

from __future__ import annotations

import pytest
import torch

from online_aug.config import ConfigError, load_config
from online_aug.experiments.cache import user_config
from online_aug.faults import guard_interval


def test_auto_is_exact_on_cpu_and_log_every_on_cuda():
    assert guard_interval(0, torch.device("cpu"), 10) == 1
    assert guard_interval(0, "cpu", 50) == 1
    assert guard_interval(0, torch.device("cuda", 1), 10) == 10  # a device object only: no CUDA needed
    assert guard_interval(0, "cuda", 1) == 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_set_interval_is_kept_on_every_device(device):
    assert guard_interval(1, device, 10) == 1 and guard_interval(7, device, 10) == 7


def test_the_default_is_auto_and_negative_values_are_refused():
    assert load_config(None).train.guard_every == 0
    with pytest.raises(ConfigError, match=r"train\.guard_every must be >= 0"):
        load_config(None, ["train.guard_every=-2"])


def test_a_cpu_run_saved_with_the_old_default_is_still_the_same_run():
    """tools/compare.py reuses a finished run with the same settings: on CPU, auto and 1 are the same run."""
    import dataclasses

    now = dataclasses.asdict(load_config(None, ["run.device=cpu"]))
    old = dataclasses.asdict(load_config(None, ["run.device=cpu", "train.guard_every=1"]))
    assert user_config(now) == user_config(old)
    assert user_config(now) != user_config(dataclasses.asdict(load_config(None, ["run.device=cpu",
                                                                                 "train.guard_every=5"])))


def test_a_run_without_edits_is_the_same_run_whatever_the_aug_section_says():
    """A CE run (aug.alpha=0, no ssl.source) never builds the generator: a changed aug.* default must not make
    tools/compare.py train it again; with edits, or with generated unlabelled rows, the aug section counts."""
    import dataclasses

    def user(*over: str):
        return user_config(dataclasses.asdict(load_config("configs/baseline.yaml", ["run.device=cpu", *over])))

    assert user() == user("aug.guard_min_share=0.5", "aug.model=elsewhere", "aug.guidance_scale=7")
    assert user() != user("train.lr=0.5")
    edits = ["aug.alpha=0.5", "aug.strengths=[0.5]"]
    assert user(*edits) != user(*edits, "aug.guard_min_share=0.5")
    ssl = dataclasses.asdict(load_config("configs/ssl-gen.yaml", ["run.device=cpu"]))
    moved = dataclasses.asdict(load_config("configs/ssl-gen.yaml", ["run.device=cpu", "aug.guidance_scale=7"]))
    assert ssl["aug"]["alpha"] == 0 and user_config(ssl) != user_config(moved)  # its unlabelled rows use aug.*
