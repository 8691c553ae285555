"""CLIP filter (Diff-Mix §7.1): running-quantile drops, real samples never dropped, clear errors on bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_prefetch import FakeGenerator, TinyData
from tiny_sd import _write_tokenizer_files, save_tiny_sd
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from online_aug.augment import Augmenter
from online_aug.batches import real_loader
from online_aug.config import AugConfig, ConfigError, load_config
from online_aug.generator.clip_filter import CLIPEditFilter, RunningQuantile, build_clip_filter, load_clip
from online_aug.policy import AugPolicy
from online_aug.rng import step_rng

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 64  # the captions are ~30 byte-level tokens with this tokenizer


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A random two-layer CLIP (text and vision, 16 px input) with a local byte-level tokenizer, saved as a folder."""
    _write_tokenizer_files(path)
    tok = CLIPTokenizer.from_pretrained(path, model_max_length=MAX_TOKENS)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=MAX_TOKENS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _filter(tiny_clip: Path, fraction: float = 0.25, history: int = 2048) -> CLIPEditFilter:
    model, tok, mean, std = load_clip(str(tiny_clip))
    return CLIPEditFilter(model, tok, "digit", fraction, history=history, image_mean=mean, image_std=std)


# ---------------------------------------------------------------- running quantile


def test_first_batch_is_ranked_against_itself():
    q = RunningQuantile(0.25)
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.6])
    keep = q(scores)
    assert keep.tolist() == [True, False, True, True, True, False, True, True]  # the 2 lowest of 8


def test_exactly_the_lowest_fraction_is_dropped_once_warmed_up():
    g = torch.Generator().manual_seed(0)
    q = RunningQuantile(0.1, history=500)
    for _ in range(20):  # fill the window past its size: 20 x 64 scores
        q(torch.rand(64, generator=g))
    window = torch.tensor(list(q.window))
    batch = torch.rand(64, generator=g)
    expected = torch.cat([window[64:], batch]).sort().values  # the window the next call sees: last 500 scores
    threshold = expected[int(0.1 * len(expected))]
    keep = q(batch)
    assert q.threshold == pytest.approx(float(threshold))
    assert torch.equal(keep, batch >= threshold)
    # over the whole window, the dropped share is the fraction exactly (distinct scores)
    assert int((expected < threshold).sum()) == int(0.1 * len(expected))


def test_a_worse_batch_loses_more_than_the_fraction():
    q = RunningQuantile(0.1, history=256)
    q(torch.linspace(0.5, 1.0, 256))
    keep = q(torch.full((8,), 0.2))  # all below every recent score
    assert not keep.any()


def test_nonfinite_scores_are_dropped_and_not_remembered():
    q = RunningQuantile(0.0)
    keep = q(torch.tensor([0.5, float("nan"), float("inf"), 0.4]))
    assert keep.tolist() == [True, False, False, True]
    assert list(q.window) == pytest.approx([0.5, 0.4])


# ---------------------------------------------------------------- CLIP scorer


def test_clip_scores_are_probabilities_and_text_is_encoded_once(tiny_clip):
    f = _filter(tiny_clip)
    assert f.captions == ["a photo with a digit on it", "a photo without a digit on it"]
    calls = []
    f.model.text_model.register_forward_hook(lambda *a: calls.append(1))
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    s = f.scores(images)
    assert s.shape == (6,) and bool(((s > 0) & (s < 1)).all())
    assert torch.equal(s, f.scores(images))  # deterministic
    assert not calls  # the text tower never runs per batch
    keep = f(images, torch.zeros(6, dtype=torch.long))
    assert keep.dtype == torch.bool and int((~keep).sum()) == 1  # first batch: floor(0.25 * 6) of its own 6
    assert not keep[s.argmin()]


def test_filter_in_augmenter_never_drops_real_samples(tiny_clip):
    cfg = AugConfig(alpha=0.5, strengths=[0.5, 0.9], target_mode="inter", filter_fraction=0.5)
    clip = _filter(tiny_clip, fraction=0.5)
    aug = Augmenter(AugPolicy(cfg, 4, [16, 16, 16, 16]), FakeGenerator(), CPU, seed=3, rank=0,
                    class_names=list("abcd"), edit_filter=clip)
    loader = real_loader(TinyData(), 8, rank=0, world_size=1, seed=1, start=0, num_workers=0)
    filtered = 0
    for step, (x, y) in zip(range(4), loader):
        b = aug(x, y, step)
        plan = aug.policy.plan(y, step_rng(3, 0, step))
        edited = torch.zeros(len(y), dtype=torch.bool)
        edited[plan.index] = True
        # rows that were not edited are the real images with their one-hot labels, untouched
        assert torch.equal(b.images[~edited], x[~edited])
        assert torch.equal(b.targets[~edited], torch.nn.functional.one_hot(y[~edited], 4).float())
        # edited rows that the filter dropped are back to real image + hard label
        dropped = edited & (b.images == x).flatten(1).all(1)
        assert torch.equal(b.targets[dropped], torch.nn.functional.one_hot(y[dropped], 4).float())
        assert b.stats["aug/filtered"] == float(dropped.sum())
        assert b.stats["aug/effective_alpha"] == (4 - int(dropped.sum())) / 8
        filtered += int(dropped.sum())
    assert filtered > 0  # half of the edits are below the running median somewhere in 4 batches


def test_build_clip_filter_from_config(tiny_clip):
    cfg = load_config(None, ["aug.alpha=0.5", "aug.filter_fraction=0.1", f"aug.filter_model={tiny_clip}",
                             "aug.filter_metaclass=handwritten digit"])
    f = build_clip_filter(cfg.aug, [str(i) for i in range(10)], CPU)
    assert f.quantile.fraction == 0.1 and f.captions[1] == "a photo without a handwritten digit on it"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_filter_fraction_outside_unit_interval_is_a_config_error(fraction):
    # config.validate owns the range; the filter, built from a validated config, does not check it again
    with pytest.raises(ConfigError, match="aug.filter_fraction"):
        load_config(None, [f"aug.filter_fraction={fraction}"])


def test_missing_filter_model_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="aug.filter_model='./no/such/clip'"):
        load_clip("./no/such/clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="aug.filter_model=.*config.json"):
        load_clip(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="aug.filter_model='nobody/no-such-clip-model'.*HF_HUB_OFFLINE"):
        load_clip("nobody/no-such-clip-model")


def test_training_run_with_the_filter_counts_filtered_edits(tiny_clip, tmp_path):
    """train.py end to end: build_augmenter wires the filter in, dropped edits show up in summary.csv."""
    sd = save_tiny_sd(tmp_path / "sd")
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "train.py", "--config", "configs/diff-mix.yaml", "run.name=filt", f"run.out_dir={out}",
           "train.steps=3", "train.eval_every=3", "train.log_every=3", "train.batch_size=16", "data.image_size=16",
           f"aug.model={sd}", "aug.textual_inversion=", "aug.lora=",  # those belong to the committed tiny SD
           "aug.prompt=a photo of a {name}",  # without the learned tokens, the prompt names the class
           "aug.steps=1", "aug.image_every=0", "aug.filter_fraction=0.5",
           "aug.guard=off", "aug.audit=false",  # a random tiny SD: the guard would turn every edit off
           f"aug.filter_model={tiny_clip}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = out.glob("*-filt")
    with open(run / "summary.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    filtered, alpha = float(row["aug/filtered"]), float(row["aug/effective_alpha"])
    assert filtered >= 4  # 3 steps x 8 edits, the lower half of the running window dropped (4 in the first batch)
    assert alpha == pytest.approx(0.5 - filtered / (3 * 16), abs=1e-5)  # a dropped edit is a real sample again
