"""Classifier recipes end to end: SGD + Nesterov for train.epochs with best-on-val selection,
a frozen pretrained backbone, and the export of both runs as timm / Hugging Face folders that timm loads and that
reproduce the run's test accuracy exactly.

Two ``train.py`` subprocesses (timm's tiny ``test_resnet`` at 16 px on the embedded digits, seconds of training each);
the ZeRO-1 run exports through DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``, the ZeRO-0 one from
``mp_rank_00_model_states.pt``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from online_aug.config import ConfigError, load_config, read_resolved
from online_aug.data import build_splits
from online_aug.export import export_run
from online_aug.monitor import read_summary
from online_aug.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600
TINY = ["--config", "configs/baseline.yaml", "model.name=test_resnet", "data.image_size=16", "train.batch_size=32",
        "train.warmup_steps=2"]


def _train(args: list[str], env: dict[str, str]) -> Path:
    out = Path(next(a for a in args if a.startswith("run.out_dir=")).split("=", 1)[1])
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory: pytest.TempPathFactory, clean_env: dict[str, str]) -> Path:
    """Balanced digits (val 10 / class, pool 0.5), SGD + Nesterov for one epoch, best-on-val, ZeRO-1."""
    out = tmp_path_factory.mktemp("selected")
    return _train([*TINY, "data.imbalance_ratio=1", "train.zero_stage=1", "train.select=val", "train.optimizer=sgd",
                   "train.nesterov=true", "train.lr=0.1", "train.weight_decay=0.0001", "train.epochs=1",
                   "train.eval_every=4", f"run.out_dir={out}"], clean_env)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pretrained' test_resnet (random, 1000 classes) as the local weights file model.pretrained_file reads."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory, clean_env: dict[str, str], backbone_file: Path) -> Path:
    """Head-only training of the pretrained backbone on balanced digits, ZeRO-0, checkpoints at steps 6 and 12."""
    out = tmp_path_factory.mktemp("frozen")
    return _train([*TINY, "data.imbalance_ratio=1", "model.pretrained=true", f"model.pretrained_file={backbone_file}",
                   "model.freeze_backbone=true", "train.lr=0.05", "train.steps=12", "train.eval_every=6",
                   "train.ckpt_every=6", "train.zero_stage=0", f"run.out_dir={out}"], clean_env)


def _timm_accuracy(model: torch.nn.Module, run_dir: Path) -> tuple[float, np.ndarray, np.ndarray]:
    """Top-1 of ``model`` on the run's test split, preprocessed only by what the export's config says."""
    cfg = load_config(run_dir / "config.yaml")
    test = build_splits(cfg.data).test
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    model.eval()
    with torch.no_grad():
        x = torch.stack([transform(test.pil(i, resize=False)) for i in range(len(test))])
        pred = model(x).argmax(-1).numpy()
    return float((pred == test.labels).mean()), pred, test.labels


def _check_round_trip(run_dir: Path, export: Path, tb_prefix: str) -> None:
    config = json.loads((export / "config.json").read_text())
    model = timm.create_model(f"local-dir:{export}", pretrained=True)
    acc, pred, labels = _timm_accuracy(model, run_dir)
    final = read_summary(run_dir)[-1]
    assert f"{acc:.6g}" == final["eval_top1"], (acc, final)  # summary.csv keeps 6 significant digits
    # every class's accuracy as the run logged it: the same predictions, not only the same count
    tb = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    tb.Reload()
    for c, name in enumerate(config["label_names"]):
        logged = tb.Scalars(f"{tb_prefix}/class_acc/{name}")[-1].value
        assert float((pred[labels == c] == c).mean()) == pytest.approx(logged, abs=1e-6), name
    assert len(set(pred.tolist())) > 1  # a classifier that predicts one class would make this test toothless
    # the other loading form: the architecture by name, the file and the preprocessing through the overlay
    overlay = dict(config["pretrained_cfg"], file=str(export / "model.safetensors"))
    by_file = timm.create_model(config["architecture"], pretrained=True, num_classes=config["num_classes"],
                                pretrained_cfg_overlay=overlay)
    assert _timm_accuracy(by_file, run_dir)[0] == acc


# ---------------------------------------------------------------- SGD, epochs, best-on-val, ZeRO-1 export


def test_epochs_set_the_steps_and_sgd_ran(selected_run: Path) -> None:
    cfg = load_config(selected_run / "config.yaml")
    n_train = len(build_splits(cfg.data).train)
    steps = read_resolved(selected_run / "config.yaml")["train_steps"]  # recorded beside the config, not in it
    assert cfg.train.epochs == 1 and steps == math.ceil(n_train / 32)
    assert cfg.train.steps == load_config(REPO / "configs" / "baseline.yaml").train.steps  # the config stays as asked
    tag = (selected_run / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step{steps:08d}"
    optim = torch.load(next((selected_run / "checkpoints" / tag).glob("*optim_states.pt")), map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
    group = optim["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 0.0001)
    assert all("momentum_buffer" in s for s in optim["state"].values())  # torch.optim.SGD's state


def test_select_val_reports_the_best_val_weights_on_test(selected_run: Path) -> None:
    steps = read_resolved(selected_run / "config.yaml")["train_steps"]
    rows = read_summary(selected_run)
    val = [r for r in rows if r["split"] == "val"]
    assert [int(r["step"]) for r in val] == [*range(4, steps, 4), steps]
    best = max(val, key=lambda r: (float(r["eval_balanced_acc"]), -int(r["step"])))  # first best
    final = rows[-1]
    assert final["split"] == "test" and int(final["step"]) == steps
    assert int(final["selected_step"]) == int(best["step"])
    states = torch.load(selected_run / "checkpoints" / "best" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    assert states["step"] == int(best["step"]) and states["select_best"]["step"] == int(best["step"])
    assert (selected_run / "checkpoints" / "latest").read_text().strip() != "best"


def test_export_of_a_zero1_run_reproduces_its_test_accuracy(selected_run: Path) -> None:
    export = export_run(selected_run)
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["label_names"][:2] == ["zero", "one"]
    pc = config["pretrained_cfg"]
    assert pc["mean"] == config["mean"] == [0.5] * 3 and pc["std"] == [0.5] * 3
    assert pc["input_size"] == config["input_size"] == [3, 16, 16] and pc["crop_mode"] == "squash"
    assert config["online_aug"]["checkpoint_tag"] == "best"
    assert config["online_aug"]["step"] == int(read_summary(selected_run)[-1]["selected_step"])
    _check_round_trip(selected_run, export, "selected")


# ---------------------------------------------------------------- frozen backbone, ZeRO-0 export


def test_freeze_backbone_trains_only_the_head(frozen_run: Path, backbone_file: Path) -> None:
    ref = load_file(str(backbone_file))
    heads = []
    for tag in ("step00000006", "step00000012"):
        sd = torch.load(frozen_run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
        net = {k.removeprefix("net."): v for k, v in sd.items() if k.startswith("net.")}
        # the file's backbone, BatchNorm running statistics included (it stays in eval mode)
        assert all(torch.equal(net[k], v) for k, v in ref.items() if not k.startswith("fc."))
        assert net["fc.weight"].shape == (10, ref["fc.weight"].shape[1])  # a new 10-class head
        heads.append(net["fc.weight"])
    assert not torch.equal(*heads)  # the head trained
    # the normalisation of the pretrained config travels in the checkpoint
    assert torch.allclose(sd["mean"].flatten(), torch.tensor(timm.get_pretrained_cfg("test_resnet").mean))


def test_export_of_a_zero0_run_reproduces_its_test_accuracy(frozen_run: Path, tmp_path: Path) -> None:
    export = export_run(frozen_run, tmp_path / "exported")
    config = json.loads((export / "config.json").read_text())
    assert config["online_aug"]["checkpoint_tag"] == "step00000012" and config["online_aug"]["step"] == 12
    assert config["mean"] == pytest.approx(list(timm.get_pretrained_cfg("test_resnet").mean))
    _check_round_trip(frozen_run, export, "eval")


# ---------------------------------------------------------------- selection logic, bad input


def test_select_keeps_the_first_best_score(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from online_aug import checkpoint

    saved = []
    monkeypatch.setattr(checkpoint, "save_best", lambda engine, run_dir, step, client, rank: saved.append(step))
    trainer = Trainer.__new__(Trainer)  # only what _select touches
    scores = iter([0.3, 0.5, 0.4, 0.5, 0.6])
    trainer.evaluate = lambda step, split, extra=None: {"balanced_acc": next(scores)}
    trainer.best, trainer.engine, trainer.run_dir, trainer.rank = {}, None, tmp_path, 0
    for step in (10, 20, 30, 40, 50):
        trainer._select(step)
    assert saved == [10, 20, 50] and trainer.best == {"score": 0.6, "step": 50}


def test_export_without_a_checkpoint_is_one_line_naming_the_folder(tmp_path: Path,
                                                                   clean_env: dict[str, str]) -> None:
    run = tmp_path / "20260101-000000-unfinished"
    run.mkdir()
    (run / "config.yaml").write_text("run: {name: unfinished}\n")
    with pytest.raises(ConfigError, match=f"^{run}: no checkpoint to export"):
        export_run(run)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), str(run)], cwd=REPO, env=clean_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not (run / "export").exists()
    lines = [ln for ln in proc.stderr.splitlines() if "WARNING" not in ln and ln.strip()]
    assert lines == [f"export error: {run}: no checkpoint to export ({run}/checkpoints/latest is missing; did the "
                     f"run finish?)"]
    with pytest.raises(ConfigError, match="not a run directory"):
        export_run(tmp_path / "nowhere")


def test_the_exported_tag_is_the_one_the_final_metrics_describe(tmp_path: Path) -> None:
    """checkpoint.final_tag: ``best`` for train.select=val, else the tag a resume would pick (never an incomplete one);
    a folder from before completeness markers gives the tag ``latest`` names; an empty one gives None."""
    from online_aug.checkpoint import BEST, MARKER, final_tag

    ckpt = tmp_path / "checkpoints"
    assert final_tag(ckpt) is None and final_tag(ckpt, "val") is None
    for tag in ("step00000004", "step00000008"):
        (ckpt / tag).mkdir(parents=True)
    (ckpt / "latest").write_text("step00000004")
    assert final_tag(ckpt) == "step00000004"  # no markers: a folder written before them
    (ckpt / "step00000004" / MARKER).write_text(json.dumps({"seq": 1}))
    (ckpt / "latest").write_text("step00000008")  # step 8 never completed
    assert final_tag(ckpt) == "step00000004" and final_tag(ckpt, "val") == "step00000004"
    (ckpt / BEST).mkdir()
    assert final_tag(ckpt, "val") == BEST and final_tag(ckpt, "last") == "step00000004"


def test_pseudo_label_check_labels_generated_images_with_the_run_s_classifier_and_the_pool_judge(
        frozen_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """tools/pseudo_label_check.py: a finished run's classifier and a pool-fit judge each name every generated image
    once; the histogram rows add up to the images asked for."""
    import importlib.util

    from tiny_sd import save_tiny_sd

    spec = importlib.util.spec_from_file_location("plc", REPO / "tools" / "pseudo_label_check.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    sd = save_tiny_sd(tmp_path / "sd")
    rc = tool.main(["--config", str(REPO / "configs/ssl-gen.yaml"), "--run", str(frozen_run), "--n", "12",
                    f"aug.model={sd}", "aug.steps=1", "data.image_size=16", "data.imbalance_ratio=1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.rstrip().endswith("pool judge"))
    rows = [line.split() for line in lines[head + 1:head + 11]]
    assert len(rows) == 10 and sum(int(r[2]) for r in rows) == 12 and sum(int(r[4]) for r in rows) == 12
    assert all(int(r[3]) <= int(r[2]) for r in rows) and "agree on" in out
