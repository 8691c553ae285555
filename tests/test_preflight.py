"""generator.preflight: the aug.* folders and files are checked before any model is built, one line per error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from online_aug.config import AugConfig, ConfigError
from online_aug.generator.preflight import check_generator_inputs

REPO = Path(__file__).resolve().parents[1]


def _sd_folder(root: Path, sample_size: int = 8, down_blocks: int = 2, vae_blocks: int = 2) -> Path:
    """A diffusers-layout folder with the configs preflight reads (no weights: nothing is loaded)."""
    for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        (root / sub).mkdir(parents=True)
    (root / "unet" / "config.json").write_text(json.dumps(
        {"sample_size": sample_size, "down_block_types": ["CrossAttnDownBlock2D"] * down_blocks}))
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32] * vae_blocks}))
    (root / "model_index.json").write_text("{}")
    return root


def _finetuned(root: Path, num_classes: int = 3, lora: bool = False) -> Path:
    """A folder in the layout tools/finetune_sd.py writes: manifest.json + learned_embeds/ (+ LoRA weights)."""
    (root / "learned_embeds").mkdir(parents=True)
    classes = {}
    for i in range(num_classes):
        rel = f"learned_embeds/class_{i:04d}.safetensors"
        (root / rel).write_bytes(b"")
        classes[str(i)] = {"token": f"<c{i}>", "file": rel}
    (root / "manifest.json").write_text(json.dumps(
        {"format": "online_aug.finetune/1", "num_classes": num_classes, "classes": classes, "lora": lora}))
    if lora:
        (root / "pytorch_lora_weights.safetensors").write_bytes(b"")
    return root


def _aug(model: Path | str, **kw) -> AugConfig:
    return AugConfig(alpha=0.5, model=str(model), **kw)


def _fails(aug: AugConfig, key: str, num_classes: int = 3, match: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        check_generator_inputs(aug, num_classes)
    msg = str(info.value)
    assert msg.startswith(key) and "\n" not in msg, msg
    assert match in msg, msg
    return msg


# ---------------------------------------------------------------- aug.model


def test_a_complete_local_folder_and_a_hub_id_pass(tmp_path: Path) -> None:
    check_generator_inputs(_aug(_sd_folder(tmp_path / "sd")), 3)
    check_generator_inputs(_aug("runwayml/stable-diffusion-v1-5"), 3)  # a hub id is left to the loader
    check_generator_inputs(_aug("tiny-sd"), 3)


def test_nothing_is_checked_without_augmentation(tmp_path: Path) -> None:
    check_generator_inputs(AugConfig(alpha=0.0, model=str(tmp_path / "nope"), class_names=["a"],
                                     textual_inversion=str(tmp_path / "nope")), 3)


def test_missing_model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fails(_aug(tmp_path / "nope"), "aug.model=", match="no such folder")
    _fails(_aug("./nope"), "aug.model='./nope'", match="no such folder")
    # "models/nope" reads as owner/name, but models/ is a folder here: a path, not a hub id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    _fails(_aug("models/nope"), "aug.model='models/nope'", match="no such folder")


def test_incomplete_model_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _fails(_aug(tmp_path / "empty"), "aug.model=", match="vae/, unet/")
    sd = _sd_folder(tmp_path / "sd")
    (sd / "unet" / "config.json").unlink()
    _fails(_aug(sd), "aug.model=", match="unet/config.json is missing")
    (sd / "unet" / "config.json").write_text("{not json")
    _fails(_aug(sd), "aug.model=", match="cannot be read as JSON")


def test_resolution_must_fit_the_model(tmp_path: Path) -> None:
    tiny = _sd_folder(tmp_path / "tiny")  # VAE scale 2, 2 down blocks: multiples of 4, native 16
    for ok in (0, 16, 24, 64):
        check_generator_inputs(_aug(tiny, resolution=ok), 3)
    _fails(_aug(tiny, resolution=18), "aug.resolution=18", match="multiple of 4")
    sd15 = _sd_folder(tmp_path / "sd15", sample_size=64, down_blocks=4, vae_blocks=4)  # SD 1.x: 8 x 8, native 512
    check_generator_inputs(_aug(sd15, resolution=256), 3)
    _fails(_aug(sd15, resolution=500), "aug.resolution=500", match="multiple of 64")


def test_class_names_must_match_the_dataset(tmp_path: Path) -> None:
    sd = _sd_folder(tmp_path / "sd")
    check_generator_inputs(_aug(sd, class_names=["a", "b", "c"]), 3)
    _fails(_aug(sd, class_names=["a", "b"]), "aug.class_names", match="2 names but the dataset has 3")


# ---------------------------------------------------------------- aug.textual_inversion / aug.lora


def test_finetuned_folders_that_work(tmp_path: Path) -> None:
    sd = _sd_folder(tmp_path / "sd")
    ft = _finetuned(tmp_path / "ft", lora=True)
    check_generator_inputs(_aug(sd, textual_inversion=str(ft), lora=str(ft)), 3)
    plain = tmp_path / "plain-lora"  # a diffusers LoRA folder without our manifest is accepted (apply_finetuned)
    plain.mkdir()
    (plain / "pytorch_lora_weights.safetensors").write_bytes(b"")
    check_generator_inputs(_aug(sd, lora=str(plain)), 3)


def test_textual_inversion_folder_problems(tmp_path: Path) -> None:
    sd = _sd_folder(tmp_path / "sd")
    key = "aug.textual_inversion="
    _fails(_aug(sd, textual_inversion=str(tmp_path / "nope")), key, match="no such folder")
    (tmp_path / "bare").mkdir()
    _fails(_aug(sd, textual_inversion=str(tmp_path / "bare")), key, match="manifest.json is missing")
    ft = _finetuned(tmp_path / "ft")
    _fails(_aug(sd, textual_inversion=str(ft)), key, num_classes=5, match="tokens for 3 classes but the dataset has 5")
    (ft / "learned_embeds" / "class_0001.safetensors").unlink()
    _fails(_aug(sd, textual_inversion=str(ft)), key, match="class_0001.safetensors (the embedding of class 1)")
    (ft / "manifest.json").write_text(json.dumps({"format": "something/else"}))
    _fails(_aug(sd, textual_inversion=str(ft)), key, match="is not a online_aug.finetune/1 manifest")
    (ft / "manifest.json").write_text("{")
    _fails(_aug(sd, textual_inversion=str(ft)), key, match="cannot be read as JSON")


def test_lora_folder_problems(tmp_path: Path) -> None:
    sd = _sd_folder(tmp_path / "sd")
    _fails(_aug(sd, lora=str(tmp_path / "nope")), "aug.lora=", match="no such folder")
    ti_only = _finetuned(tmp_path / "ti")  # tokens without a LoRA
    _fails(_aug(sd, lora=str(ti_only)), "aug.lora=", match="pytorch_lora_weights.safetensors is missing")


# ---------------------------------------------------------------- aug.taesd / aug.filter_model


def test_taesd_and_filter_model_folders(tmp_path: Path) -> None:
    sd = _sd_folder(tmp_path / "sd")
    check_generator_inputs(_aug(sd, taesd="madebyollin/taesd"), 3)
    _fails(_aug(sd, taesd=str(tmp_path / "taesd")), "aug.taesd=", match="no such folder")
    (tmp_path / "taesd").mkdir()
    _fails(_aug(sd, taesd=str(tmp_path / "taesd")), "aug.taesd=", match="no config.json")
    (tmp_path / "taesd" / "config.json").write_text("{}")
    check_generator_inputs(_aug(sd, taesd=str(tmp_path / "taesd")), 3)

    clip = str(tmp_path / "clip")
    check_generator_inputs(_aug(sd, filter_model=clip, filter_fraction=0.0), 3)  # filter off: not loaded
    _fails(_aug(sd, filter_model=clip, filter_fraction=0.2), "aug.filter_model=", match="no such folder")
    check_generator_inputs(_aug(sd, filter_model="openai/clip-vit-base-patch32", filter_fraction=0.2), 3)


def test_committed_models_pass() -> None:
    ft = REPO / "models" / "ft-digits"
    if not (ft / "manifest.json").is_file():
        pytest.skip("models/ft-digits is not present")
    check_generator_inputs(AugConfig(alpha=0.5, model="openai/x", textual_inversion=str(ft), lora=str(ft)), 10)


def test_copied_names_equal_the_loaders() -> None:
    """preflight keeps its own copy of these names so that it does not import diffusers; they must not drift."""
    from online_aug.generator import finetuned, loading, preflight

    assert preflight.SD_SUBFOLDERS == loading.SD_SUBFOLDERS
    assert (preflight.MANIFEST, preflight.MANIFEST_FORMAT, preflight.LORA_FILE) == (
        finetuned.MANIFEST, finetuned.MANIFEST_FORMAT, finetuned.LORA_FILE)


# ---------------------------------------------------------------- the entry point


def test_train_py_missing_model_folder_exits_2_before_any_model(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """``python train.py`` (its ``main``): the error comes from the preflight, before the classifier or DeepSpeed
    engine is built, so no run directory is created."""
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", "configs/baseline.yaml", "aug.alpha=0.5",
         "aug.model=models/nope-missing", "run.device=cpu", f"run.out_dir={out}"],
        cwd=REPO, env=clean_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and errors[0].startswith("config error: aug.model='models/nope-missing': no such folder")
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # the run directory (and its checkpoints) come after the preflight


# ---------------------------------------------------------------- aug.finetune_command

FINETUNED_PRESETS = sorted(p for p in (REPO / "configs" / "real").glob("*.yaml")
                           if p.stem.startswith(("diff-", "da-fusion")))


@pytest.mark.parametrize("path", FINETUNED_PRESETS, ids=lambda p: p.stem)
def test_real_finetuned_presets_print_their_command_when_the_folder_is_missing(
        path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every real Diff-* / DA-Fusion preset names its fine-tuned folder and the command that makes it: the header
    and aug.finetune_command agree, and the missing folder's error is that command, on one line."""
    from online_aug.config import load_config

    cfg = load_config(path)
    aug = cfg.aug
    assert aug.textual_inversion and aug.finetune_command, path.name
    assert f"--out {aug.textual_inversion}" in aug.finetune_command
    assert "--config configs/real/" in aug.finetune_command
    assert ("--recipe diff-mix" if path.stem.startswith("diff-") else "--recipe da-fusion") in aug.finetune_command
    own = [e.path for e in aug.lora_stack()][:1]  # the fine-tuned LoRA comes first; others (an LCM-LoRA) may follow
    assert own == ([aug.textual_inversion] if path.stem.startswith("diff-") else [])
    assert aug.finetune_command in path.read_text().split("\nrun:")[0]  # the header shows the same command
    monkeypatch.chdir(tmp_path)  # no models/ here: the folder is missing
    with pytest.raises(ConfigError) as e:
        check_generator_inputs(aug, 10)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"aug.textual_inversion={aug.textual_inversion!r}: no such folder")
    assert msg.endswith(aug.finetune_command)
    # the command's --config is itself a preset with the same data split, so its folder fits this preset
    src = load_config(REPO / aug.finetune_command.split("--config ")[1].split()[0])
    assert src.data == cfg.data and src.aug.model == aug.model


def test_finetune_command_must_write_the_named_folder(tmp_path: Path) -> None:
    from online_aug.config import load_config

    cmd = "python tools/finetune_sd.py --recipe diff-mix --out models/a"
    load_config(None, [f"aug.finetune_command={cmd}", "aug.textual_inversion=models/a", "aug.lora=models/a"])
    with pytest.raises(ConfigError, match=r"writes --out 'models/a' but aug.textual_inversion / aug.lora name"):
        load_config(None, [f"aug.finetune_command={cmd}", "aug.textual_inversion=models/b"])
    with pytest.raises(ConfigError, match=r"must run tools/finetune_sd.py with one --out"):
        load_config(None, ["aug.finetune_command=python train.py", "aug.textual_inversion=models/a"])
    # an unfinished run (folder without manifest) also prints the command, to be resumed
    (tmp_path / "a").mkdir()
    folder = str(tmp_path / "a")
    aug = AugConfig(alpha=0.5, textual_inversion=folder, finetune_command=cmd.replace("models/a", folder))
    with pytest.raises(ConfigError, match=r"manifest.json is missing; finish the fine-tuning \(add --resume"):
        check_generator_inputs(aug, 3)
