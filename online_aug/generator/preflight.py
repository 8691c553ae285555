"""The generator's inputs checked without loading anything: the ``aug.*`` folders and files, before heavy work.

The trainer calls :func:`check_generator_inputs` once the data splits are built (the class count is known) and
before the classifier, the DeepSpeed engine or the diffusion model exists, so a mistyped folder costs seconds, not a
minute. Every failure is a one-line :class:`~online_aug.config.ConfigError` that starts with the key.

Standard library only (plus the config and the path-or-hub-id rule): what needs the weights or the network (a hub
id that cannot be downloaded, tokens or a LoRA learned on another base model) stays with the loaders.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from online_aug.config import AugConfig, ConfigError
from online_aug.generator.hub import looks_like_path
from online_aug.generator.prompts import check_prompt_template, check_prompts_name_classes, prompt_templates

# Deliberate copies of names owned by the loaders, which import diffusers: SD_SUBFOLDERS of generator/loading.py and
# MANIFEST, MANIFEST_FORMAT, LORA_FILE of generator/finetuned.py. tests/test_preflight.py keeps them equal.
SD_SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "online_aug.finetune/1"
LORA_FILE = "pytorch_lora_weights.safetensors"


def check_generator_inputs(aug: AugConfig, num_classes: int) -> None:
    """ConfigError naming the key for each ``aug.*`` input that cannot work; nothing to check when ``aug.alpha`` is 0.

    Checks ``aug.class_names`` against ``num_classes``; the prompt templates (placeholders, and a class named in
    each where no learned token tells the classes apart); a local ``aug.model`` folder (its subfolders, and
    ``aug.resolution`` against its UNet and VAE configs); the ``aug.textual_inversion`` and ``aug.lora`` folders
    (every LoRA of a stack that names a folder) written by tools/finetune_sd.py (a missing one prints
    ``aug.finetune_command``, the command that makes it); and ``aug.taesd`` / ``aug.filter_model`` (with
    ``aug.filter_fraction`` > 0) when they name a local folder. A hub id is left to the loader.
    """
    if aug.alpha <= 0:
        return
    if aug.class_names and len(aug.class_names) != num_classes:
        raise ConfigError(f"aug.class_names has {len(aug.class_names)} names but the dataset has {num_classes} "
                          f"classes; give one name per class or leave it empty")
    for key, template in prompt_templates(aug):
        check_prompt_template(template, key, with_tokens=bool(aug.textual_inversion))
    check_prompts_name_classes(aug)
    model_dir = local_folder(aug.model)
    if model_dir is not None:
        configs = _check_sd_folder(aug.model, model_dir)
        check_unet_class(configs[0], aug.model)
        _check_resolution(aug, configs)
    if aug.textual_inversion:
        _check_textual_inversion(aug.textual_inversion, num_classes, aug.finetune_command)
    for entry in aug.lora_stack():
        _check_lora(entry.path, entry.key, aug.finetune_command)
    if aug.taesd:
        _check_model_folder("aug.taesd", aug.taesd, "an AutoencoderTiny folder or hub id (e.g. madebyollin/taesd), "
                                                    "or leave it empty to use the SD VAE")
    if aug.filter_fraction > 0:
        _check_model_folder("aug.filter_model", aug.filter_model, "a CLIP folder or a hub id such as "
                                                                  "openai/clip-vit-base-patch32, or set "
                                                                  "aug.filter_fraction=0")


def local_folder(name: str) -> Path | None:
    """The folder ``name`` means, or None for a Hugging Face hub id.

    A folder is a name that exists as one, that can only be a path (``hub.looks_like_path``: ``./x``, ``a/b/c``),
    or an ``owner/name`` whose ``owner`` is a folder here (``models/nope`` when ``models/`` exists): hub ids look like
    ``owner/name`` too, but a local folder named after a hub owner next to the run is not a case worth guessing for.
    """
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_dir() or looks_like_path(name):
        return path
    if "/" in name and Path(name.split("/", 1)[0]).expanduser().is_dir():
        return path
    return None


def _read_json(path: Path, key: str, value: str, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{key}={value!r}: {path} is missing; {fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={value!r}: {path} cannot be read as JSON ({e}); {fix}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{key}={value!r}: {path} is not a JSON object; {fix}")
    return data


def _check_sd_folder(name: str, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A diffusers Stable Diffusion folder (what generator.loading.load_sd reads); returns (unet, vae) configs."""
    if not folder.is_dir():
        raise ConfigError(f"aug.model={name!r}: no such folder ({folder.resolve()}); point aug.model at a local "
                          f"diffusers folder or a Hugging Face hub id (tools/build_tiny_sd.py builds the demo's "
                          f"models/tiny-sd-digits)")
    missing = [s for s in SD_SUBFOLDERS if not (folder / s).is_dir()]
    if missing:
        raise ConfigError(f"aug.model={name!r}: the folder has no {', '.join(m + '/' for m in missing)}; a diffusers "
                          f"Stable Diffusion folder holds {', '.join(s + '/' for s in SD_SUBFOLDERS)} (as "
                          f"pipeline.save_pretrained writes it)")
    fix = "re-save the model with pipeline.save_pretrained or point aug.model at a complete folder"
    return (_read_json(folder / "unet" / "config.json", "aug.model", name, fix),
            _read_json(folder / "vae" / "config.json", "aug.model", name, fix))


def check_unet_class(unet: dict[str, Any], model: str) -> None:
    """An SDXL-class UNet (or Kandinsky-style, with extra conditioning) needs ``added_cond_kwargs`` (pooled text
    embeddings, size/crop time ids), which the generator does not pass; refuse it before any weight is loaded."""
    extra = {k: unet.get(k) for k in ("addition_embed_type", "encoder_hid_dim_type") if unet.get(k) is not None}
    if extra or unet.get("cross_attention_dim") == 2048:
        what = ", ".join(f"{k}={v!r}" for k, v in extra.items()) or "cross_attention_dim=2048"
        raise ConfigError(f"aug.model={model!r} is an SDXL-class UNet ({what}): it needs added_cond_kwargs, which "
                          f"this generator does not pass; use a Stable Diffusion 1.x/2.x model")


def _check_resolution(aug: AugConfig, configs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """The rule SDEditGenerator applies once loaded: the latent side must survive every UNet down block but the last.

    That is a multiple of VAE scale x 2^(down blocks - 1): 64 for SD 1.x (8 x 8), 4 for the demo's 2-block tiny SD.
    """
    unet, vae = configs
    try:
        scale = 2 ** (len(vae.get("block_out_channels", [64])) - 1)  # diffusers' defaults when a key is absent
        multiple = scale * 2 ** (len(unet.get("down_block_types", [""] * 4)) - 1)
        native = int(unet.get("sample_size", 64)) * scale
    except (TypeError, ValueError) as e:
        raise ConfigError(f"aug.model={aug.model!r}: unet/config.json or vae/config.json is not a diffusers config "
                          f"({e}); re-save the model with pipeline.save_pretrained") from e
    if aug.resolution % multiple:
        raise ConfigError(f"aug.resolution={aug.resolution} must be a multiple of {multiple} for aug.model="
                          f"{aug.model!r} (VAE scale {scale} x 2^(UNet down blocks - 1)); 0 uses the native {native}")


def _finetuned_folder(key: str, name: str, command: str = "") -> Path:
    folder = Path(name).expanduser()
    if not folder.is_dir():
        if command:  # the preset says how the folder is made (aug.finetune_command)
            raise ConfigError(f"{key}={name!r}: no such folder; fine-tune the generator first: {command}")
        raise ConfigError(f"{key}={name!r}: no such folder; point it at a folder written by tools/finetune_sd.py "
                          f"(or leave it empty)")
    return folder


def _read_manifest(key: str, name: str, folder: Path, command: str = "") -> dict[str, Any]:
    """The same checks as generator.finetuned.read_manifest, without importing torch and diffusers."""
    fix = (f"finish the fine-tuning (add --resume to continue it): {command}" if command else
           "re-run tools/finetune_sd.py with this --out (or point the key at a finished run)")
    data = _read_json(folder / MANIFEST, key, name, fix)
    if data.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{key}={name!r}: {folder / MANIFEST} is not a {MANIFEST_FORMAT} manifest; {fix}")
    return data


def _check_textual_inversion(name: str, num_classes: int, command: str = "") -> None:
    key = "aug.textual_inversion"
    folder = _finetuned_folder(key, name, command)
    manifest = _read_manifest(key, name, folder, command)
    n = manifest.get("num_classes")
    if n != num_classes:
        raise ConfigError(f"{key}={name!r}: {folder / MANIFEST} holds tokens for {n} classes but the dataset has "
                          f"{num_classes}; fine-tune on this dataset's classes with tools/finetune_sd.py")
    classes = manifest.get("classes")
    for i in range(num_classes):
        entry = classes.get(str(i)) if isinstance(classes, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ConfigError(f"{key}={name!r}: {folder / MANIFEST} has no entry for class {i}; re-run "
                              f"tools/finetune_sd.py")
        if not (folder / entry["file"]).is_file():
            raise ConfigError(f"{key}={name!r}: {folder / entry['file']} (the embedding of class {i}) is missing; "
                              f"re-run tools/finetune_sd.py")


def _check_lora(name: str, key: str = "aug.lora", command: str = "") -> None:
    """A folder with the LoRA weights; its manifest is optional (a plain diffusers LoRA folder has none). A hub id
    (e.g. latent-consistency/lcm-lora-sdv1-5) is left to the loader; ``command`` is printed for the folder it makes
    only."""
    try:
        makes = any(Path(w.removeprefix("--out=")) == Path(name) for w in shlex.split(command))
    except ValueError:  # config.validate words an unparsable aug.finetune_command
        makes = False
    if local_folder(name) is None and not makes:
        return
    command = command if makes else ""
    folder = _finetuned_folder(key, name, command)
    if (folder / MANIFEST).is_file():
        _read_manifest(key, name, folder, command)
    if not (folder / LORA_FILE).is_file():
        raise ConfigError(f"{key}={name!r}: {folder / LORA_FILE} is missing; run tools/finetune_sd.py --lora-rank R "
                          f"with this --out, or leave {key} empty")


def _check_model_folder(key: str, name: str, what: str) -> None:
    """A transformers/diffusers model named by a local folder must exist and hold its config.json."""
    folder = local_folder(name)
    if folder is None:
        return
    if not folder.is_dir():
        raise ConfigError(f"{key}={name!r}: no such folder ({folder.resolve()}); point it at {what}")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}={name!r}: the folder has no config.json (save the model there with "
                          f"save_pretrained); point it at {what}")
