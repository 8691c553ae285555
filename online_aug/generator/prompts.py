"""Class names and prompts: one rule for the online generator, the tiny-SD builder, fine-tuning and the tools.

A prompt template holds ``{name}`` (the class name) and/or ``{token}`` (the class's learned token, see
:mod:`online_aug.generator.finetuned`); :func:`render_prompt` says how the two combine.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import TYPE_CHECKING

from online_aug.config import ConfigError

if TYPE_CHECKING:
    from online_aug.config import AugConfig


def resolve_class_names(class_names: list[str], dataset_names: list[str], key: str = "aug.class_names") -> list[str]:
    """The names prompts use: ``class_names`` (the ``key`` setting) when given, else the dataset's own names.

    Given names must be one per class of the dataset: prompts are indexed by class id.
    """
    if not class_names:
        return list(dataset_names)
    if len(class_names) != len(dataset_names):
        raise ConfigError(f"{key} has {len(class_names)} names but the dataset has {len(dataset_names)} classes; "
                          f"give one name per class or leave it empty")
    return list(class_names)


def token_strings(names: list[str]) -> list[str]:
    """One placeholder token per class, ``<name>`` in lower case (CLIP lower-cases prompts), made unique."""
    out: list[str] = []
    for i, n in enumerate(names):
        slug = re.sub(r"[^a-z0-9]+", "-", n.lower()).strip("-") or f"class-{i}"
        tok = f"<{slug}>"
        if tok in out:  # two names that slug alike ("a b" and "a-b") still get distinct tokens
            tok = f"<{slug}-{i}>"
        out.append(tok)
    return out


def check_prompt_template(template: str, key: str, with_tokens: bool) -> None:
    """Fail early on placeholders other than ``{name}`` / ``{token}``, or ``{token}`` without learned tokens."""
    try:
        template.format(name="x", token="y")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{key}={template!r}: only the {{name}} and {{token}} placeholders are allowed ({e})") from e
    if "{token}" in template and not with_tokens:
        raise ConfigError(f"{key}={template!r} uses {{token}} but no learned tokens are loaded; set "
                          f"aug.textual_inversion to a folder written by tools/finetune_sd.py, or use {{name}}")


def names_class(template: str) -> bool:
    """Does the template put the class into the prompt (a ``{name}`` or ``{token}`` field, in any format spec)?"""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError:
        return False
    return bool({f.split(".")[0].split("[")[0] for f in fields} & {"name", "token"})


def check_prompts_name_classes(aug: AugConfig) -> None:
    """ConfigError naming the key of a prompt template that names no class when nothing else tells the classes apart.

    Without learned tokens (``aug.textual_inversion``) such a template gives every class the same prompt, so an edit
    toward class t is not steered to t while its label says t. Intra-class edits below strength 1 are the exception:
    their label is the source's, and the source image, not the prompt, carries the class (a class-agnostic SDEdit).
    With the guard on (``aug.guard=on``) a non-empty one is left to the audit, which measures exactly this (are the
    edits toward each class drawn as that class?) and keeps edits away from the classes they are not: a
    prompt-ignoring generator is one of the guard's own test cases (configs/suites/guard.yaml). An empty template is
    a slip (an unset shell variable), never an experiment: refused either way.
    """
    if aug.textual_inversion:
        return  # a template without {name}/{token} gets the class's token appended (render_prompt)
    top = aug.strength_range[1] if aug.strength_range else max(aug.strengths, default=0.0)
    if aug.target_mode == "intra" and top < 1:
        return
    for key, template in prompt_templates(aug):
        if not names_class(template) and (aug.guard != "on" or not template.strip()):
            raise ConfigError(f"{key}={template!r} names no class and no learned tokens tell the classes apart: "
                              f"every class would get the same prompt. Put {{name}} where the class name goes "
                              f"(e.g. 'a photo of a {{name}}'), or set aug.textual_inversion to learned tokens")


def render_prompt(template: str, name: str, token: str | None) -> str:
    """The prompt of one class, the same rule for fine-tuning and for the online generator.

    Without a learned token: ``template.format(name=name)``. With one: ``{token}`` is the token and ``{name}`` the
    class name (Diff-Mix: "a photo of a {token} {name}" or "... {token} digit"); a template with only ``{name}`` has
    the token in the name's place (DA-Fusion: "a photo of a <w_i>"); a class-agnostic template without either
    ("a photo") gets the token appended ("a photo <w_i>"), since a prompt without it would ignore what was learned.
    """
    if token is None:
        return template.format(name=name, token=name)
    if "{token}" in template:
        return template.format(name=name, token=token)
    if "{name}" in template:
        return template.format(name=token)
    return f"{template} {token}"


def class_prompts(template: str, names: list[str], tokens: list[str] | None = None, key: str = "aug.prompt"
                  ) -> list[str]:
    """One prompt per class (:func:`render_prompt`), after checking the template (errors name ``key``)."""
    check_prompt_template(template, key, tokens is not None)
    if tokens is not None and len(tokens) != len(names):
        raise ConfigError(f"{len(tokens)} learned tokens for {len(names)} classes")
    return [render_prompt(template, n, None if tokens is None else tokens[i]) for i, n in enumerate(names)]


def prompt_templates(aug: AugConfig) -> list[tuple[str, str]]:
    """Prompt diversity: ``(key, template)`` for ``aug.prompt``, then ``aug.prompts``, then each non-empty line of
    ``aug.prompt_file`` (``#`` starts a comment line); each edit draws one (the key names it in errors)."""
    out = [("aug.prompt", aug.prompt)]
    out += [(f"aug.prompts[{i}]", t) for i, t in enumerate(aug.prompts)]
    if aug.prompt_file:
        path = Path(aug.prompt_file)
        if not path.is_file():
            raise ConfigError(f"aug.prompt_file={aug.prompt_file!r} is not a file; give a text file with one prompt "
                              f"template per line, or leave it empty")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        file_templates = [ln for ln in lines if ln and not ln.startswith("#")]
        if not file_templates:
            raise ConfigError(f"aug.prompt_file={aug.prompt_file!r} holds no template; write one per line")
        out += [(f"aug.prompt_file line {lines.index(t) + 1}", t) for t in file_templates]
    return out
