"""tools/distill_lcm.py / online_aug.sdtrain.lcm_distill on the tiny random SD: the recipe's math by hand, a
distillation step moves only the LoRA, the saved folder loads through aug.lora and edits with K = 1 LCM, resume is
bit for bit, the leakage record carries the teacher's, and bad input is one line."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_sd import save_tiny_sd

from online_aug.config import AugConfig, ConfigError, load_config
from online_aug.data import build_splits, check_generator_folders
from online_aug.generator import SDEditGenerator, load_sd
from online_aug.generator.finetuned import LORA_FILE, base_identity, save_lora, write_manifest
from online_aug.sdtrain.finetune import add_lora
from online_aug.sdtrain.lcm_distill import (
    DDIMSolver,
    DistillOptions,
    add_lcm_lora,
    boundary_scalings,
    distill,
    distill_loss,
    huber_loss,
    x0_eps,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FAST = dict(batch_size=4, lora_rank=2, lr=1e-3, show_progress=False)


def _tool():
    spec = importlib.util.spec_from_file_location("distill_lcm_tool", ROOT / "tools" / "distill_lcm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("lcm") / "sd")


def _cfg(model: Path, *extra: str):
    return load_config(ROOT / "configs" / "demo.yaml", [f"aug.model={model}", "aug.guidance_scale=3", *extra])


# ---------------------------------------------------------------- the recipe's math, by hand


def test_boundary_scalings_huber_and_solver_match_a_hand_computation():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0  # the consistency function is the identity at t = 0
    assert math.isclose(float(c_skip[1]), 0.25 / (190**2 + 0.25), rel_tol=1e-6)
    assert math.isclose(float(c_out[1]), 190 / math.sqrt(190**2 + 0.25), rel_tol=1e-6)
    assert float(c_skip[2]) < 1e-6 and math.isclose(float(c_out[2]), 1.0, rel_tol=1e-6)
    d = torch.tensor([[0.003, -0.004]])
    want = ((9e-6 + 1e-6) ** 0.5 - 1e-3 + (16e-6 + 1e-6) ** 0.5 - 1e-3) / 2
    assert math.isclose(float(huber_loss(d, torch.zeros_like(d), 1e-3)), want, rel_tol=1e-5)
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    s = DDIMSolver(ac, 1000, 50)
    assert s.timesteps[:3].tolist() == [19, 39, 59] and s.timesteps[-1] == 999 and s.skip == 20
    x0, eps = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    got = s.step(x0, eps, torch.tensor([0, 3]))  # grid point 0 steps to alphas_cumprod[0], point 3 to [59]
    for i, a in enumerate((ac[0], ac[59])):
        assert math.isclose(float(got[i]), float(a.sqrt() * 2 - (1 - a).sqrt()), rel_tol=1e-6)
    x, out = torch.randn(3, 4), torch.randn(3, 4)
    al, si = torch.tensor(0.6), torch.tensor(0.8)
    for kind in ("epsilon", "v_prediction", "sample"):  # (x0, eps) always re-noise to x
        p0, pe = x0_eps(out, x, al, si, kind)
        torch.testing.assert_close(al * p0 + si * pe, x)


class _ZeroUNet(torch.nn.Module):
    """Predicts eps = 0 (so x0 = x / alpha): the loss is then a closed form of the inputs."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.adapters = []

    def disable_adapters(self):
        self.adapters.append("off")

    def enable_adapters(self):
        self.adapters.append("on")

    def forward(self, x, t, encoder_hidden_states):
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def test_distill_loss_is_the_recipe_on_a_tiny_tensor():
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    solver = DDIMSolver(ac, 1000, 50)
    z0, noise = torch.tensor([[[[0.5]]], [[[-1.0]]]]), torch.tensor([[[[0.3]]], [[[0.2]]]])
    index = torch.tensor([0, 10])
    unet = _ZeroUNet()
    loss = distill_loss(unet, solver, ac, "epsilon", z0, torch.zeros(2, 1, 1), torch.zeros(1, 1, 1), index, noise,
                        torch.tensor([3.0, 5.0]), DistillOptions(huber_c=1e-3))
    assert unet.adapters == ["off", "on"]  # the teacher ran with the LoRA disabled
    terms = []
    for i, n in enumerate(index.tolist()):
        ts = 20 * (n + 1) - 1
        te = max(ts - 20, 0)
        a_s, a_e = float(ac[ts]), float(ac[te])
        x = a_s**0.5 * float(z0[i]) + (1 - a_s) ** 0.5 * float(noise[i])
        cs, co = 0.25 / ((10 * ts) ** 2 + 0.25), 10 * ts / ((10 * ts) ** 2 + 0.25) ** 0.5
        pred = cs * x + co * x / a_s**0.5  # student: eps = 0
        x_prev = (float(ac[ts - 20]) if n else float(ac[0])) ** 0.5 * x / a_s**0.5  # teacher's DDIM step, CFG of 0s
        ce, oe = 0.25 / ((10 * te) ** 2 + 0.25), 10 * te / ((10 * te) ** 2 + 0.25) ** 0.5
        target = ce * x_prev + oe * x_prev / a_e**0.5
        terms.append(((pred - target) ** 2 + 1e-6) ** 0.5 - 1e-3)
    assert math.isclose(float(loss), sum(terms) / 2, rel_tol=1e-4)


# ---------------------------------------------------------------- training on the tiny SD


def test_a_distillation_step_moves_only_the_lora_and_the_loss_is_finite(sd):
    cfg = _cfg(sd)
    splits = build_splits(cfg.data)
    gen = SDEditGenerator.from_config(cfg.aug, splits.class_names, CPU)
    unet = gen.unet
    add_lcm_lora(unet, 2, seed=0)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ac = gen.components.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 8, 8, generator=g)
    loss = distill_loss(unet, DDIMSolver(ac), ac, "epsilon", z0, gen.prompt_embeds[:3], gen.uncond_embeds,
                        torch.tensor([5, 20, 49]), torch.randn(z0.shape, generator=g), torch.tensor([3.0, 3, 3]),
                        DistillOptions())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    opt.step()
    moved = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert {n for n in before if "lora_B" in n} <= moved  # B starts at 0: the step is what moved it


def test_the_distilled_folder_stacks_through_aug_lora_and_edits_in_one_step(sd, tmp_path):
    # the teacher with its own LoRA (tools/finetune_sd.py's format), distilled; then the stack loads and edits
    unet = load_sd(str(sd), CPU, torch.float32).unet
    ft = tmp_path / "ft"
    ft.mkdir()
    config = add_lora(unet, 2, seed=3)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_lora(ft, unet, config)
    cfg = _cfg(sd, f"aug.lora={ft}")
    splits = build_splits(cfg.data)
    out = tmp_path / "lcm"
    m = distill(cfg, splits, out, DistillOptions(steps=2, **FAST))
    assert math.isfinite(m["final_loss_ema"]) and (out / LORA_FILE).is_file()
    assert m["use"]["aug.lora"] == [f"{ft}:1", str(out)] and m["options"]["w_min"] == m["options"]["w_max"] == 3.0
    aug = AugConfig(model=str(sd), lora=m["use"]["aug.lora"], scheduler="lcm", steps=1, guidance_scale=1.0,
                    prompt=cfg.aug.prompt)
    gen = SDEditGenerator.from_config(aug, splits.class_names, CPU)
    teacher = SDEditGenerator.from_config(AugConfig(model=str(sd), lora=str(ft), prompt=cfg.aug.prompt),
                                          splits.class_names, CPU)
    diff = max((a - b).abs().max().item() for a, b in zip(gen.unet.parameters(), teacher.unet.parameters()))
    assert diff > 0  # the LCM-LoRA is merged on top of the teacher's
    assert not gen.do_cfg  # guidance <= 1: one UNet pass per step
    x = splits.train.tensors(16)[0][:4]
    edited, finite = gen.edit(x, torch.full((4,), 0.9), torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert edited.shape == (4, 3, 16, 16) and bool(finite.all()) and torch.isfinite(edited).all()
    assert (edited - gen.edit(x, torch.full((4,), 0.9), torch.arange(4),
                              generator=torch.Generator().manual_seed(0))[0]).abs().max() == 0


def test_resume_after_k_steps_is_the_uninterrupted_run_bit_for_bit(sd, tmp_path):
    from safetensors.torch import load_file

    cfg = _cfg(sd)
    splits = build_splits(cfg.data)
    distill(cfg, splits, tmp_path / "a", DistillOptions(steps=4, ema=0.5, **FAST))
    distill(cfg, splits, tmp_path / "b", DistillOptions(steps=2, ema=0.5, ckpt_every=1, **FAST))
    m = distill(cfg, splits, tmp_path / "b", DistillOptions(steps=4, ema=0.5, ckpt_every=1, **FAST), resume=True)
    assert m["resumed_from_step"] == 2
    a, b = load_file(str(tmp_path / "a" / LORA_FILE)), load_file(str(tmp_path / "b" / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="another run"):  # a resume with other settings is refused
        distill(cfg, splits, tmp_path / "b", DistillOptions(steps=5, **{**FAST, "lr": 5e-3}), resume=True)


def test_the_leakage_record_carries_the_teacher_s_and_is_refused_like_it(sd, tmp_path):
    import shutil

    teacher = tmp_path / "sd"
    shutil.copytree(sd, teacher)
    cfg = _cfg(teacher)
    splits = build_splits(cfg.data)
    test_image = int(splits.test.index[0])
    (teacher / "build_info.json").write_text(json.dumps({"data": {"dataset": "digits", "indices": [test_image]}}))
    out = tmp_path / "lcm"
    m = distill(cfg, splits, out, DistillOptions(steps=1, **FAST))
    seen = set(m["data"]["indices"])
    assert set(splits.train.index.tolist()) <= seen and test_image in seen
    with pytest.raises(ConfigError, match="test split"):
        check_generator_folders([str(out)], splits)


def test_eval_with_the_pool_judge_is_kept_beside_the_training_split_one(sd, tmp_path, capsys):
    # --eval-judge pool fits the audit's judge on the generator pool and files the result under eval_pool, leaving
    # the training-split judge's eval (the guard's view) as it was
    tool = _tool()
    out = tmp_path / "lcm"
    base = ["--config", str(ROOT / "configs/demo.yaml"), f"aug.model={sd}", "--out", str(out), "--no-progress",
            "--eval-edits", "2"]
    assert tool.main([*base, "--steps", "1", "--batch-size", "4", "--lora-rank", "2", "--eval"]) == 0
    first = json.loads((out / "manifest.json").read_text())["eval"]
    assert tool.main([*base, "--eval-only", "--eval-judge", "pool"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["eval"] == first and first["judge"] == "train"
    assert m["eval_pool"]["judge"] == "pool" and "pool" in m["eval_pool"]["protocol"]
    judges = {s["judge"] for s in m["eval_pool"]["settings"].values()}
    assert judges and all("not the training split" in j for j in judges)
    assert "classes within 0.05" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input: one line, before any training


def test_bad_input_is_one_line(sd, tmp_path, capsys):
    tool = _tool()
    rc = tool.main(["--config", str(ROOT / "configs/demo.yaml"), f"aug.model={tmp_path / 'nope'}", "--out",
                    str(tmp_path / "o1"), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "aug.model" in err and len(err.splitlines()) == 1
    # a LoRA learned on another base model (same architecture, other weights)
    other = save_tiny_sd(tmp_path / "other", seed=1)
    comps = load_sd(str(other), CPU, torch.float32)
    ident = base_identity(comps)
    config = add_lora(comps.unet, 2, seed=0)
    lora = tmp_path / "lora-other"
    lora.mkdir()
    save_lora(lora, comps.unet, config)
    write_manifest(lora, {"base_model": str(other), "base": ident, "lora": {"file": LORA_FILE}})
    capsys.readouterr()  # the set-up's own progress bars
    rc = tool.main(["--config", str(ROOT / "configs/demo.yaml"), f"aug.model={sd}", f"aug.lora={lora}",
                    "--out", str(tmp_path / "o2"), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    # one error line, the last (the loaders' progress bars come before it: the base is known once it is loaded)
    assert rc == 2 and "different base model" in err.splitlines()[-1]
    assert sum(ln.startswith("error:") for ln in err.splitlines()) == 1
    rc = tool.main(["--config", str(ROOT / "configs/demo.yaml"), f"aug.model={sd}", "--out", str(tmp_path / "o3"),
                    "--mixed-precision", "fp16", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--mixed-precision fp16 needs a CUDA device" in err
