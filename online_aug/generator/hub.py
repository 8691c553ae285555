"""Where a pretrained part comes from: a local folder or a Hugging Face hub id, offline-aware, errors as ConfigError.

Every ``aug.*`` key that names a model (``aug.model``, ``aug.taesd``, ``aug.filter_model``, ``aug.safety_checker``)
is read through :func:`pretrained_source`, so a name means the same thing and fails with the same kind of message
whichever loader reads it. Standard library only: :mod:`online_aug.generator.preflight` shares the path-or-hub-id
rule without importing diffusers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from online_aug.config import ConfigError


def looks_like_path(name: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else ("./x", "/abs", "a/b/c", "~/x") can only be a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) read now, not at import, so a test or launcher can set it late."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


@dataclass(frozen=True)
class PretrainedSource:
    """A resolved model name: pass ``path`` and ``kwargs`` to ``from_pretrained``; ``error`` words its failures."""

    key: str  # the config key, e.g. aug.model
    value: str  # the key's value as the config gave it
    path: str  # the folder (user-expanded), or the hub id
    local: bool
    fix: str  # how to fix the key, ending every message
    offline: bool

    @property
    def kwargs(self) -> dict[str, Any]:
        # huggingface_hub reads HF_HUB_OFFLINE at import; asking for the local cache only honours a late setting
        return {"local_files_only": True} if self.offline and not self.local else {}

    def error(self, what: str, e: Exception, subfolder: str = "") -> ConfigError:
        """One line naming the key, what could not be loaded from where, and the fix (chain it: ``from e``)."""
        first = str(e).strip().splitlines()
        detail = f"{type(e).__name__}: {first[0]}" if first else type(e).__name__
        if self.local:
            where = f"{self.path}/{subfolder}" if subfolder else self.path
            return ConfigError(f"{self.key}={self.value!r}: no {what} could be loaded from {where} ({detail}); "
                               f"re-save it with save_pretrained, or {self.fix}")
        how = ("HF_HUB_OFFLINE=1, so only the local Hugging Face cache was searched" if self.offline
               else "the hub could not be reached or has no such model")
        sub = f", subfolder {subfolder}/" if subfolder else ""
        return ConfigError(f"{self.key}={self.value!r}: no {what} could be loaded from the Hugging Face hub id "
                           f"{self.path!r}{sub} ({how}; {detail}); download it first (`huggingface-cli download "
                           f"{self.path}`) on a machine with network access, or {self.fix}")


def pretrained_source(key: str, value: str, fix: str, *, name: str | None = None) -> PretrainedSource:
    """``name`` (default: ``value``, the value of config key ``key``) as a local folder or a Hugging Face hub id.

    A name that exists as a folder is that folder; one that can only be a path (:func:`looks_like_path`) but is no
    folder is a ConfigError naming ``key`` and ending in ``fix``; anything else is a hub id, searched in the local
    cache only when HF_HUB_OFFLINE=1 (read now).
    """
    name = value if name is None else name
    local = Path(name).expanduser()
    if not local.is_dir() and looks_like_path(name):
        raise ConfigError(f"{key}={value!r}: no such folder ({local.resolve()}); {fix}")
    is_dir = local.is_dir()
    return PretrainedSource(key, value, str(local) if is_dir else name, is_dir, fix, hub_offline())
