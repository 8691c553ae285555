"""The fine-tuned folder format: learned textual-inversion tokens and a UNet LoRA, read and written here.

- Textual inversion (Gal et al., 2022), as DA-Fusion §4.1 uses it (Trabucco et al., 2023): one new word embedding
  ``w_i`` per class, initialised from the class name and learned on the training images, prompted as
  "a photo of a <w_i>".
- TI + LoRA, Diff-Mix §3.3 and Table 7's "TI+DB" (Wang et al., 2024): the tokens are learned jointly with a low-rank
  update of the UNet's attention projections (rank 10 there), prompted as "a photo of a [v_i] [metaclass]".

One folder holds both, in formats diffusers reads (the learning is :mod:`online_aug.sdtrain.finetune`, run by
``tools/finetune_sd.py``; this module is only the format, as diffusers' ``loaders/textual_inversion.py`` is):

- ``learned_embeds/class_<i>.safetensors``: one file per class, a dict ``{token string: [D] embedding}``, or
  ``[n, D]`` for a token of n vectors (DA-Fusion's later setting: 4), the format ``pipeline.load_textual_inversion``
  reads (it adds the words ``<t>``, ``<t>_1``, ...; :func:`token_words`), written by :func:`save_learned_embeddings`;
- ``pytorch_lora_weights.safetensors`` (with a LoRA): written by :func:`save_lora` with ``save_lora_weights`` from
  the PEFT state dict, read by ``pipeline.load_lora_weights``;
- ``manifest.json`` (:func:`write_manifest` / :func:`read_manifest`): class index -> token string and file,
  ``num_classes``, the base model and its signature (:func:`base_identity`: UNet config + parameter shapes,
  text-encoder shapes, and a probe of a few weights), the prompt template, the training settings.

:func:`apply_finetuned` loads such a folder into :class:`SDComponents` for the online generator (the config keys
``aug.textual_inversion`` and ``aug.lora``). A missing file, a token file for another number of classes, or
weights for another base model is a :class:`ConfigError` that names the file: never a silent no-op.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from online_aug.config import ConfigError, LoraEntry
from online_aug.generator.preflight import local_folder

# The prompt rules used to live here; tests/test_presets.py still imports render_prompt from this module.
from online_aug.generator.prompts import render_prompt as render_prompt

if TYPE_CHECKING:
    from online_aug.config import AugConfig
    from online_aug.generator.loading import SDComponents

MANIFEST = "manifest.json"
EMBEDS_DIR = "learned_embeds"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: load_lora_weights finds it
MANIFEST_FORMAT = "online_aug.finetune/1"
# Attention projections of the UNet, the modules Diff-Mix (after diffusers' LoRA scripts) adapts.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_PROBE_N = 32  # weights compared per module to tell "same architecture" from "same base model"


# ---------------------------------------------------------------- tokens


def add_tokens(tokenizer: Any, text_encoder: torch.nn.Module, tokens: list[str], embeds: Tensor,
               source: str = "") -> list[int]:
    """Add ``tokens`` to the tokenizer, grow the text encoder's input embeddings and set their rows to ``embeds``.

    Returns the new token ids. A token that already exists (loaded twice, or a word of the vocabulary) is an error:
    its old embedding would otherwise be silently overwritten or ignored.
    """
    vocab = tokenizer.get_vocab()
    clash = [t for t in tokens if t in vocab]
    if clash:
        raise ConfigError(f"{source or 'learned tokens'}: {clash} already in the tokenizer's vocabulary (tokens "
                          f"loaded twice, or a name that is a word of the base model); re-run tools/finetune_sd.py")
    table = text_encoder.get_input_embeddings().weight
    if embeds.shape != (len(tokens), table.shape[1]):
        raise ConfigError(f"{source or 'learned tokens'}: embeddings of shape {tuple(embeds.shape)} do not fit "
                          f"{len(tokens)} tokens of the text encoder's width {table.shape[1]}")
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise ConfigError(f"{source or 'learned tokens'}: the tokenizer added {added} of {len(tokens)} tokens")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set right below
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = embeds.to(table.device, table.dtype)
    return list(ids)


# ---------------------------------------------------------------- base-model identity


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unet_signature(unet: torch.nn.Module) -> str:
    """Hash of the UNet's config (without bookkeeping keys) and of every parameter's name and shape."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    shapes = sorted((n, list(p.shape)) for n, p in unet.named_parameters() if "lora_" not in n)
    return _sha([cfg, shapes])


def text_encoder_signature(text_encoder: torch.nn.Module, vocab_size: int) -> str:
    """Hash of the text encoder's parameter shapes, with the embedding table counted at the base vocabulary."""
    shapes = []
    for n, p in text_encoder.named_parameters():
        shape = list(p.shape)
        if p is text_encoder.get_input_embeddings().weight:
            shape[0] = vocab_size
        shapes.append((n, shape))
    return _sha(sorted(shapes))


def _probe(t: Tensor) -> list[float]:
    return [round(float(v), 6) for v in t.detach().flatten()[:_PROBE_N].float().cpu()]


def base_identity(components: SDComponents) -> dict[str, Any]:
    """What ties fine-tuned weights to their base model: signatures plus a few actual weights.

    Must be taken before tokens or a LoRA are added. The probe (the first weights of the UNet's ``conv_in`` and of
    the text encoder's token table) tells two models of the same architecture apart; it is compared with a tolerance
    so that a model loaded in fp16 / bf16 still matches.
    """
    te, vocab = components.text_encoder, len(components.tokenizer)
    return {
        "unet_signature": unet_signature(components.unet),
        "text_encoder_signature": text_encoder_signature(te, vocab),
        "vocab_size": vocab,
        "embedding_dim": int(te.get_input_embeddings().weight.shape[1]),
        "probe": {"unet.conv_in.weight": _probe(components.unet.conv_in.weight),
                  "text_encoder.token_embedding": _probe(te.get_input_embeddings().weight[:vocab])},
    }


def identity_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`base_identity` records (empty: same base model)."""
    diffs = [k for k in ("unet_signature", "text_encoder_signature", "vocab_size", "embedding_dim")
             if saved.get(k) != current.get(k)]
    for k, cur in current["probe"].items():
        old = saved.get("probe", {}).get(k)
        if old is None or len(old) != len(cur) or not np.allclose(old, cur, rtol=2e-2, atol=1e-3):
            diffs.append(f"weights ({k})")
    return diffs


# ---------------------------------------------------------------- manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    """``folder/manifest.json``, tagged with :data:`MANIFEST_FORMAT` (what :func:`read_manifest` checks)."""
    record = {"format": MANIFEST_FORMAT, **manifest}
    (Path(folder) / MANIFEST).write_text(json.dumps(record, indent=2, default=str) + "\n")


def read_manifest(folder: str | Path, key: str) -> dict[str, Any]:
    """``folder/manifest.json`` as a dict; a missing folder or file, or unreadable JSON, is a ConfigError."""
    path = Path(folder).expanduser() / MANIFEST
    if not Path(folder).expanduser().is_dir():
        raise ConfigError(f"{key}={str(folder)!r}: no such folder; point it at a folder written by "
                          f"tools/finetune_sd.py (or leave it empty)")
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is missing; the folder was not written by tools/finetune_sd.py "
                          f"(or the run did not finish)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {path} cannot be read as JSON ({e}); re-run tools/finetune_sd.py") from e
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{key}: {path} is not a {MANIFEST_FORMAT} manifest; re-run tools/finetune_sd.py")
    return data


def check_base(manifest: dict[str, Any], components: SDComponents, path: Path, key: str,
               identity: dict[str, Any] | None = None) -> None:
    """ConfigError when ``manifest`` was learned on a different base model than ``components``."""
    diffs = identity_mismatch(manifest.get("base", {}), identity or base_identity(components))
    if diffs:
        raise ConfigError(f"{key}: {path} was learned on a different base model ({manifest.get('base_model')!r}); "
                          f"differs in {', '.join(diffs)}. Point aug.model at that model or re-run "
                          f"tools/finetune_sd.py on this one.")


def token_words(token: str, vectors: int) -> list[str]:
    """The tokenizer words of a class token learned with ``vectors`` embedding vectors.

    diffusers' ``load_textual_inversion`` naming: a ``[n, D]`` embedding of ``<t>`` becomes the words ``<t>``,
    ``<t>_1``, ..., ``<t>_{n-1}``, and a prompt holds all of them (:func:`token_phrase`).
    """
    return [token] + [f"{token}_{k}" for k in range(1, vectors)]


def token_phrase(token: str, vectors: int) -> str:
    """What stands for the class in a prompt: ``<t>`` for one vector, ``<t> <t>_1 <t>_2 <t>_3`` for four."""
    return " ".join(token_words(token, vectors))


def load_learned_embeddings(folder: str | Path, num_classes: int, key: str = "aug.textual_inversion",
                            manifest: dict[str, Any] | None = None) -> tuple[list[str], list[str], Tensor]:
    """From a folder written by tools/finetune_sd.py: each class's prompt phrase (class order), the tokenizer words
    to add and their embeddings ``[W, D]`` (one row per word; a class learned with n vectors has n words)."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    manifest = manifest or read_manifest(folder, key)
    mpath = folder / MANIFEST
    n = manifest.get("num_classes")
    if n != num_classes:
        raise ConfigError(f"{key}: {mpath} holds tokens for {n} classes but the dataset has {num_classes}; "
                          f"fine-tune on this dataset's classes with tools/finetune_sd.py")
    phrases, words, rows = [], [], []
    for i in range(num_classes):
        entry = manifest.get("classes", {}).get(str(i))
        if not entry:
            raise ConfigError(f"{key}: {mpath} has no entry for class {i}")
        file = folder / entry["file"]
        if not file.is_file():
            raise ConfigError(f"{key}: {file} (the embedding of class {i}, {entry['token']!r}) is missing")
        sd = load_file(str(file))
        if list(sd) != [entry["token"]]:
            raise ConfigError(f"{key}: {file} holds {list(sd)}, expected exactly the token {entry['token']!r}")
        emb = sd[entry["token"]].float()
        emb = emb.reshape(1, -1) if emb.ndim == 1 else emb  # [D] (one vector) or [n, D]
        phrases.append(token_phrase(entry["token"], len(emb)))
        words.extend(token_words(entry["token"], len(emb)))
        rows.append(emb)
    dims = {r.shape[1] for r in rows}
    if len(dims) != 1:
        raise ConfigError(f"{key}: the embeddings in {folder / EMBEDS_DIR} have different widths {sorted(dims)}")
    return phrases, words, torch.cat(rows)


def save_learned_embeddings(folder: Path, tokens: list[str], embeds: Tensor) -> dict[str, dict[str, Any]]:
    """One safetensors file per class, ``{token: [D]}`` (one vector) or ``{token: [n, D]}`` (``embeds`` of shape
    ``[C, n, D]``, n > 1), the layouts ``load_textual_inversion`` reads; returns the manifest's ``classes``."""
    from safetensors.torch import save_file

    (folder / EMBEDS_DIR).mkdir(parents=True, exist_ok=True)
    classes = {}
    embeds = embeds.reshape(len(tokens), -1, embeds.shape[-1])
    for i, (tok, rows) in enumerate(zip(tokens, embeds)):
        rel = f"{EMBEDS_DIR}/class_{i:04d}.safetensors"
        value = rows[0] if len(rows) == 1 else rows
        save_file({tok: value.detach().float().cpu().contiguous()}, str(folder / rel))
        classes[str(i)] = {"token": tok, "file": rel, "vectors": len(rows)}
    return classes


# ---------------------------------------------------------------- LoRA


def save_lora(folder: str | Path, unet: torch.nn.Module, lora_config: Any) -> dict[str, Any]:
    """Write the PEFT LoRA of ``unet`` as ``folder/pytorch_lora_weights.safetensors``; returns its manifest entry.

    The diffusers training-script recipe: ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))``
    saved by ``save_lora_weights``, with the adapter config as metadata so that the rank and alpha are restored.
    """
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionImg2ImgPipeline.save_lora_weights(folder, unet_lora_layers=sd, weight_name=LORA_FILE,
                                                     unet_lora_adapter_metadata=lora_config.to_dict())
    return {"file": LORA_FILE, "rank": lora_config.r, "alpha": lora_config.lora_alpha,
            "target_modules": list(LORA_TARGETS)}


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora\.down|lora\.up|lora_A|lora_B)\.weight$")


def check_lora_state_dict(state_dict: dict[str, Tensor], unet: torch.nn.Module, path: Path, key: str) -> int:
    """Every LoRA tensor must name a module of ``unet`` and fit its shape; returns the rank.

    This is what makes a LoRA for another UNet an error here: diffusers would warn about unexpected keys (and
    load nothing) or fail deep inside PEFT with a size mismatch.
    """
    modules = dict(unet.named_modules())
    ranks = set()
    other = [k for k in state_dict if not k.startswith("unet.")]
    if other:
        raise ConfigError(f"{key}: {path} has weights outside the UNet ({other[:3]}...); the online generator "
                          f"applies UNet LoRAs only (tools/finetune_sd.py --lora-rank writes one)")
    for k, v in state_dict.items():
        name = k.removeprefix("unet.")
        if name.endswith(".alpha"):
            continue
        m = _LORA_KEY.match(name)
        if m is None:
            raise ConfigError(f"{key}: {path} has a tensor {k!r} that is not a LoRA weight")
        mod = modules.get(m["module"])
        if mod is None or not hasattr(mod, "weight"):
            raise ConfigError(f"{key}: {path} adapts {m['module']!r}, which this UNet does not have: the LoRA was "
                              f"trained for a different UNet. Point aug.model at its base model or re-run "
                              f"tools/finetune_sd.py --lora-rank on this one.")
        w = mod.weight
        down = m["kind"] in ("lora.down", "lora_A")
        fits = v.ndim == w.ndim and ((v.shape[1] == w.shape[1]) if down else (v.shape[0] == w.shape[0]))
        if not fits:
            raise ConfigError(f"{key}: {path}: {k} has shape {tuple(v.shape)}, which does not fit {m['module']} "
                              f"(weight {tuple(w.shape)}): the LoRA was trained for a different UNet")
        ranks.add(int(v.shape[0] if down else v.shape[1]))
    if not ranks:
        raise ConfigError(f"{key}: {path} holds no UNet LoRA weights")
    return max(ranks)


def read_lora(name: str, unet: torch.nn.Module, key: str = "aug.lora") -> tuple[dict[str, Tensor], Any, Any, int]:
    """``pytorch_lora_weights.safetensors`` of a folder or hub id, as ``pipe.load_lora_weights`` reads it, checked
    against ``unet`` (:func:`check_lora_state_dict`): (state dict, network alphas, metadata, rank)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from online_aug.generator.hub import pretrained_source

    folder, src = Path(name).expanduser(), None
    if folder.is_dir():
        path, source, kw = folder / LORA_FILE, str(folder), {"local_files_only": True}
        if not path.is_file():
            raise ConfigError(f"{key}: {path} is missing; run tools/finetune_sd.py --lora-rank R with this --out, "
                              f"or leave {key} empty")
    else:  # a hub id (a path-like name that is no folder is a ConfigError here)
        src = pretrained_source(key, name, "point it at a folder holding pytorch_lora_weights.safetensors or a hub "
                                           "id such as latent-consistency/lcm-lora-sdv1-5")
        path, source, kw = Path(src.path) / LORA_FILE, src.path, src.kwargs
    try:
        state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            source, weight_name=LORA_FILE, return_lora_metadata=True, **kw)
    except Exception as e:  # chained: a corrupt file keeps its original traceback
        if src is not None:
            raise src.error("LoRA", e) from e
        raise ConfigError(f"{key}: {path} cannot be read as a diffusers LoRA ({type(e).__name__}: {e})") from e
    rank = check_lora_state_dict(state_dict, unet, path, key)
    return state_dict, alphas, metadata, rank


def apply_lora(unet: torch.nn.Module, folder: str | Path, key: str = "aug.lora", fuse: bool = True,
               scale: float = 1.0) -> int:
    """Load ``folder/pytorch_lora_weights.safetensors`` (or a hub id's) into ``unet`` the way
    ``pipe.load_lora_weights`` does.

    With ``fuse`` the update, times ``scale`` (diffusers' ``lora_scale``), is merged into the base weights and the
    PEFT layers are removed: the online loop then runs a plain UNet (no per-step LoRA matmuls, nothing in the way of
    ``torch.compile``). Returns the rank.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    state_dict, alphas, metadata, rank = read_lora(str(folder), unet, key)
    params = list(unet.parameters())
    frozen = not any(p.requires_grad for p in params)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet, adapter_name="online_aug",
                                                       metadata=metadata)
    if fuse:
        unet.fuse_lora(lora_scale=scale, adapter_names=["online_aug"])
        unet.unload_lora()  # keeps the merged weights; removes the PEFT wrappers
        if frozen:
            unet.requires_grad_(False)
    return rank


def apply_lora_stack(unet: torch.nn.Module, entries: list[LoraEntry]) -> list[int]:
    """Merge every LoRA of ``entries`` (``aug.lora``) into ``unet`` at its weight; returns their ranks.

    One entry is :func:`apply_lora` at its weight. Several are diffusers' adapters: each loaded under its own name
    (``load_lora_weights(..., adapter_name=...)``), weighted with ``set_adapters(names, adapter_weights)`` and fused
    together, the sum of the weighted updates merged into the base weights (what the unfused pipeline computes, up
    to float rounding). Every LoRA is read and checked against the UNet before any is loaded.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    if len(entries) == 1:  # exactly the one-LoRA path (today's numbers, bit for bit)
        return [apply_lora(unet, entries[0].path, key=entries[0].key, scale=entries[0].weight)]
    loaded = [read_lora(e.path, unet, e.key) for e in entries]
    frozen = not any(p.requires_grad for p in unet.parameters())
    names = [f"online_aug_{i}" for i in range(len(entries))]
    with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: here that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for name, (state_dict, alphas, metadata, _) in zip(names, loaded, strict=True):
            StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet, adapter_name=name,
                                                               metadata=metadata)
    unet.set_adapters(names, [e.weight for e in entries])
    unet.fuse_lora(lora_scale=1.0, adapter_names=names)
    unet.unload_lora()
    if frozen:
        unet.requires_grad_(False)
    return [rank for *_, rank in loaded]


# ---------------------------------------------------------------- the generator's entry point


def apply_finetuned(components: SDComponents, aug: AugConfig, num_classes: int) -> list[str] | None:
    """Apply ``aug.textual_inversion`` and ``aug.lora`` (one LoRA or a stack, :meth:`AugConfig.lora_stack`) to
    ``components`` in place.

    Every folder is checked against the base model before anything is changed (the tokens' and each LoRA's
    manifest, where it has one; every LoRA's tensors against the UNet's modules). Returns the learned token of each
    class as prompts hold it (:func:`token_phrase`: several words for a multi-vector token), or None when
    ``aug.textual_inversion`` is empty.
    """
    loras = aug.lora_stack()
    if not aug.textual_inversion and not loras:
        return None
    identity = base_identity(components)
    ti_manifest = None
    if aug.textual_inversion:
        ti_manifest = read_manifest(aug.textual_inversion, "aug.textual_inversion")
        check_base(ti_manifest, components, Path(aug.textual_inversion) / MANIFEST, "aug.textual_inversion", identity)
    for e in loras:
        folder = Path(e.path).expanduser()
        if (folder / MANIFEST).is_file():  # a plain diffusers LoRA folder has none: the key/shape check still applies
            check_base(read_manifest(e.path, e.key), components, folder / MANIFEST, e.key, identity)
        elif not folder.is_dir() and local_folder(e.path) is not None:
            raise ConfigError(f"{e.key}={e.path!r}: no such folder; point it at a folder written by "
                              f"tools/finetune_sd.py --lora-rank R, a diffusers LoRA folder or hub id (or leave "
                              f"aug.lora empty)")
    tokens = None
    if ti_manifest is not None:
        tokens, words, embeds = load_learned_embeddings(aug.textual_inversion, num_classes, manifest=ti_manifest)
        add_tokens(components.tokenizer, components.text_encoder, words, embeds,
                   source=f"aug.textual_inversion={aug.textual_inversion!r}")
        ti_folder = Path(aug.textual_inversion).expanduser()
        if ti_manifest.get("lora") and not any(Path(e.path).expanduser() == ti_folder for e in loras):
            warnings.warn(f"the tokens in {aug.textual_inversion} were learned jointly with a LoRA, but aug.lora does "
                          f"not load it: add {aug.textual_inversion} to aug.lora to use them as trained", stacklevel=2)
        trained = ti_manifest.get("template")
        if trained is not None and trained != aug.prompt:
            warnings.warn(f"aug.prompt={aug.prompt!r} differs from the template the tokens were learned with "
                          f"({trained!r}, in {Path(aug.textual_inversion) / MANIFEST})", stacklevel=2)
    if loras:
        apply_lora_stack(components.unet, loras)
    return tokens
