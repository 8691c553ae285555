"""Inputs that used to be accepted and quietly ruin a run are refused early, in one line that starts a fresh line:
``aug.label_rates`` measured on another data set, a prompt template that names no class when nothing else tells the
classes apart; and ``export`` writes its files with the umask's mode.

The refusals call ``train.main`` in this process: they happen while the data splits are built, before the run
directory, the classifier or the diffusion model exist. One ``train.py`` subprocess checks that an error raised once
the progress bar is on screen still starts its own line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from online_aug.config import AugConfig, ConfigError, load_config, save_config
from online_aug.experiments.suites import SUITES, Plan, Row, load_suite, preset_path
from online_aug.generator.preflight import check_generator_inputs
from online_aug.generator.prompts import check_prompt_template, check_prompts_name_classes, prompt_templates
from online_aug.policy import read_label_rates

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# real-guidance: a generator preset without learned tokens whose inputs are committed (models/tiny-sd-digits-pool)
TINY = ["--config", "configs/real-guidance.yaml", "train.steps=1", "train.eval_every=1", "train.batch_size=16",
        "data.image_size=16", "model.name=test_resnet", "aug.steps=1", "aug.image_every=0"]


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``train.main(args)`` in this process: (exit status, stderr)."""
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    status = mod.main(args)
    return status, capsys.readouterr().err


def _error_line(err: str) -> str:
    """The one ``config error:`` line, which starts a line of its own (not glued to a progress bar)."""
    assert "Traceback" not in err, err[-5000:]
    lines = [ln for ln in err.splitlines() if "config error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("config error: "), err[-5000:]
    return lines[0]


def _rates(path: Path, n: int) -> Path:
    path.write_text(json.dumps({"target_rate": {str(c): 0.5 for c in range(n)}}))
    return path


# ---------------------------------------------------------------- aug.label_rates


def test_label_rates_for_more_classes_than_the_dataset_are_refused(tmp_path: Path) -> None:
    f = _rates(tmp_path / "rates.json", 12)
    with pytest.raises(ConfigError) as info:
        read_label_rates(str(f), 10)
    msg = str(info.value)
    assert msg.startswith("aug.label_rates") and str(f) in msg and "12 classes" in msg and "has 10" in msg, msg
    assert "\n" not in msg
    assert torch.equal(read_label_rates(str(_rates(tmp_path / "ok.json", 10)), 10), torch.full((10,), 0.5))


@pytest.mark.parametrize("n", [12, 9])
def test_label_rates_fail_before_anything_is_built_on_a_line_of_their_own(
        n: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """12 rates for 10 classes used to be accepted; 9 were refused only once the progress bar was on screen, the
    error glued to it. Both now fail while the data is prepared: no run directory, no model."""
    f = _rates(tmp_path / "rates.json", n)
    out = tmp_path / "runs"
    status, err = _main([*TINY, f"aug.label_rates={f}", f"run.out_dir={out}"], capsys)
    assert status == 2, err[-3000:]
    line = _error_line(err)
    assert line.startswith("config error: aug.label_rates") and str(f) in line, line
    if n > 10:
        assert "12 classes" in line and "has 10" in line, line
    assert not out.exists()


def test_an_error_after_the_progress_bar_starts_a_fresh_line(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """A hub id that is not in the offline cache fails when the batch source loads the generator, after the bar is
    drawn; warnings are off so that nothing else ends the bar's line first."""
    env = dict(clean_env, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "aug.model=no-such-org/no-such-sd",
                           f"run.out_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train:" in proc.stderr  # the bar was on screen
    assert _error_line(proc.stderr).startswith("config error: aug.model='no-such-org/no-such-sd'")


# ---------------------------------------------------------------- prompts that name no class


def _aug(**kw) -> AugConfig:
    return AugConfig(alpha=0.5, model="some-org/some-sd", **{"target_mode": "inter", "guard": "off", **kw})


def _refused(aug: AugConfig, key: str) -> str:
    with pytest.raises(ConfigError) as info:
        check_generator_inputs(aug, 10)
    msg = str(info.value)
    assert msg.startswith(key) and "\n" not in msg, msg
    assert "{name}" in msg and "aug.textual_inversion" in msg, msg
    return msg


def test_a_prompt_that_names_no_class_is_refused_without_learned_tokens() -> None:
    assert "names no class" in _refused(_aug(prompt="", prompts=[]), "aug.prompt=''")
    _refused(_aug(prompt=" ", guard="on"), "aug.prompt=' '")  # empty: refused even where the guard would audit it
    _refused(_aug(prompt="a photo"), "aug.prompt='a photo'")
    _refused(_aug(target_mode="uniformize", prompt="a photo"), "aug.prompt='a photo'")
    _refused(_aug(prompts=["a {name}", "a photo"]), "aug.prompts[1]='a photo'")
    # intra-class edits keep the source's label and image, unless a strength of 1 leaves only the prompt
    _refused(_aug(target_mode="intra", prompt="a photo", strengths=[0.5, 1.0]), "aug.prompt='a photo'")
    _refused(_aug(target_mode="intra", prompt="a photo", strength_range=[0.3, 1.0]), "aug.prompt='a photo'")


def test_prompts_that_tell_the_classes_apart_pass() -> None:
    for prompt in ("a photo of a {name}", "{name}", "a {name!s} digit", "a photo of the digit {name:>5}"):
        check_generator_inputs(_aug(prompt=prompt), 10)
    check_generator_inputs(_aug(target_mode="intra", prompt="a photo", strengths=[0.3, 0.5]), 10)
    # the guard's audit measures whether the edits are drawn as their class, and keeps them away where they are not
    check_generator_inputs(_aug(prompt="a photo", guard="on"), 10)
    # with learned tokens a class-agnostic template gets each class's token appended (render_prompt)
    check_prompts_name_classes(_aug(prompt="", textual_inversion="models/some-ti"))


def test_train_py_refuses_the_empty_prompt_before_anything_is_built(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    status, err = _main(["--config", "configs/real-mix.yaml", "train.steps=1", "aug.prompts=[]", "aug.prompt=",
                         f"run.out_dir={out}"], capsys)
    assert status == 2, err[-3000:]
    assert _error_line(err).startswith("config error: aug.prompt='' names no class")
    assert not out.exists()


def _check_prompts(cfg_path: Path, overrides: list[str]) -> None:
    aug = load_config(cfg_path, overrides).aug
    for key, template in prompt_templates(aug):
        check_prompt_template(template, key, with_tokens=bool(aug.textual_inversion))
    check_prompts_name_classes(aug)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "real").glob("*.yaml")),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_preset_names_its_classes(path: Path) -> None:
    """Every committed preset, as it is and with tools/compare.py --model (its learned tokens dropped)."""
    _check_prompts(path, [])
    if path.parent == CONFIGS:
        row = Row(path.stem, path.stem)
        _check_prompts(path, Plan(rows=[row], seeds=[0], out=Path("/tmp/x"), model="/tmp/sd").overrides(row, 0))


@pytest.mark.parametrize("suite", sorted(p.stem for p in SUITES.glob("*.yaml")))
def test_every_suite_row_names_its_classes(suite: str) -> None:
    for row in load_suite(suite).rows:
        _check_prompts(preset_path(row.preset), row.overrides)


@pytest.mark.parametrize("kind", ["config", "suite"])
def test_a_key_written_twice_is_refused(kind: str, tmp_path: Path) -> None:
    """PyYAML keeps the second of two equal keys silently: two suites lost their rows' aug.guard=off that way."""
    path = tmp_path / "twice.yaml"
    if kind == "config":
        path.write_text("aug:\n  alpha: 0.1\ntrain:\n  steps: 5\naug:\n  alpha: 0.2\n")
        load = lambda: load_config(path)  # noqa: E731
    else:
        path.write_text("rows:\n  - name: a\n    preset: diff-mix\n    set: [aug.guard=off]\n    set: [aug.alpha=1]\n")
        load = lambda: load_suite(str(path))  # noqa: E731
    with pytest.raises(ConfigError) as e:
        load()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert ("key 'aug' appears twice" in msg and "line 5" in msg) if kind == "config" else \
        ("key 'set' appears twice" in msg and "line 5" in msg)


# ---------------------------------------------------------------- export file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_export_files_get_the_umasks_mode(umask: int, mode: int, tmp_path: Path) -> None:
    from online_aug.export import export_run

    run = tmp_path / "run"
    (run / "checkpoints" / "step00000001").mkdir(parents=True)
    save_config(load_config(CONFIGS / "baseline.yaml", ["model.name=test_resnet", "data.image_size=16"]),
                run / "config.yaml")
    net = timm.create_model("test_resnet", num_classes=10).state_dict()
    torch.save({"module": {f"net.{k}": v for k, v in net.items()}, "step": 1},
               run / "checkpoints" / "step00000001" / "mp_rank_00_model_states.pt")
    before = os.umask(umask)
    try:
        out = export_run(run, tmp_path / "export", tag="step00000001")
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {"model.safetensors": mode, "config.json": mode}, {k: oct(v) for k, v in modes.items()}
