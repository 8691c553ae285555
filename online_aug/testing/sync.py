"""The host-device sync detector: which syncs happen, where in this package they come from (tests, ``make gpu-check``).

One recorder, two ways to see a sync:

- by name (the default, any device): a ``TorchFunctionMode`` entered in this thread sees every call that syncs
  (``.item()``, ``bool()``, ``int()``, ``float()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``nonzero``,
  ``torch.tensor(..., device=...)``, blocking host-to-device copies). With tensors on the ``meta`` device a CPU test
  sees the syncs the CUDA path would make;
- from the CUDA runtime (``cuda=True``, a GPU): torch's sync-debug mode warns on every sync the runtime makes, in
  every thread, including the ones inside torch's own kernels that no name gives away (boolean-mask indexing, ...).

Each sync is filed two ways. ``found`` / ``external``: (what, ``'file:line'``) of its nearest caller outside torch,
in this package or in another library (DeepSpeed, timm). ``by_thread`` / ``by_site`` / ``ours_in_main``: counters
by thread and by the innermost frame of this package on the stack (``'file:line function'``, else ``'outside
online_aug'``), so a DeepSpeed sync reached from the trainer's step counts against the trainer's line.
"""

from __future__ import annotations

import threading
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = Path(__file__).resolve().parents[1]
_TESTING = Path(__file__).resolve().parent
_TORCH = Path(torch.__file__).resolve().parent
_WARNINGS = Path(warnings.__file__).resolve()
OUTSIDE = "outside online_aug"
# torch hands the mode the C methods (TensorBase.item, ...): match by name
_SYNCING = {"item": ".item()", "tolist": ".tolist()", "cpu": ".cpu()", "numpy": ".numpy()", "__bool__": "bool()",
            "__int__": "int()", "__float__": "float()", "__index__": "index()", "nonzero": "nonzero",
            "unique": "unique"}
_FACTORIES = {"tensor": "torch.tensor(..., device=)", "as_tensor": "torch.as_tensor(..., device=)"}


class SyncLint:
    """Records host-device syncs (see the module docstring). Use as a context manager.

    By name: a copy counts when it is host-to-device without ``non_blocking=True``; a tensor factory when it is given
    a non-CPU ``device`` (the data travels from the host with a sync). ``cuda=True``: every warning of torch's CUDA
    sync-debug mode (``torch.cuda.set_sync_debug_mode("warn")`` while entered); other warnings pass through."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.found: list[tuple[str, str]] = []
        self.external: list[tuple[str, str]] = []
        self.by_thread: Counter = Counter()
        self.by_site: Counter = Counter()
        self.ours_in_main = 0  # syncs with a site in this package, in the main (the trainer's) thread
        self.lock = threading.Lock()
        self._mode: _ByName | None = None

    def __enter__(self) -> SyncLint:
        if self.cuda:
            self._showwarning = warnings.showwarning
            warnings.showwarning = self._on_warning
            warnings.filterwarnings("always", message=".*synchroniz.*")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._mode = _ByName(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._showwarning
        else:
            self._mode.__exit__(*exc)
            self._mode = None

    def _on_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return self._showwarning(message, category, filename, lineno, file, line)
        self.record(str(message).splitlines()[0] if str(message) else "CUDA sync")

    def record(self, what: str) -> None:
        """File one sync made by the caller's stack."""
        nearest, site = None, OUTSIDE
        for frame in reversed(traceback.extract_stack()[:-1]):
            path = Path(frame.filename).resolve()
            if path.is_relative_to(_TESTING):
                continue
            ours = path.is_relative_to(PACKAGE)
            if nearest is None and not path.is_relative_to(_TORCH) and path != _WARNINGS:
                nearest = (what, f"{path.name}:{frame.lineno}"), ours
            if ours:
                site = f"{path.name}:{frame.lineno} {frame.name}"
                break
        thread = threading.current_thread()
        with self.lock:
            if nearest is not None:
                (self.found if nearest[1] else self.external).append(nearest[0])
            self.by_thread[thread.name] += 1
            self.by_site[site] += 1
            if thread is threading.main_thread() and site != OUTSIDE:
                self.ours_in_main += 1


class _ByName(TorchFunctionMode):
    def __init__(self, lint: SyncLint) -> None:
        super().__init__()
        self.lint = lint

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _what(func, args, kwargs)
        if what:
            self.lint.record(what)
        return func(*args, **kwargs)


def _what(func, args, kwargs) -> str | None:
    name = getattr(func, "__name__", "")
    if name in _SYNCING:
        return _SYNCING[name]
    if name in _FACTORIES and not args or name in _FACTORIES and not isinstance(args[0], torch.Tensor):
        dev = kwargs.get("device")
        return _FACTORIES[name] if dev is not None and torch.device(dev).type != "cpu" else None
    if name in ("to", "cuda", "copy_") and args and isinstance(args[0], torch.Tensor):
        copy = name == "copy_"
        src = args[1] if copy and len(args) > 1 else args[0]
        dst = args[0].device if copy else _target_device(name, args, kwargs)
        blocking = not kwargs.get("non_blocking", False) and not (copy and len(args) > 2 and args[2]) and not (
            name == "to" and any(a is True for a in args[1:]))
        if (isinstance(src, torch.Tensor) and dst is not None and src.device.type == "cpu"
                and dst.type != "cpu" and blocking):
            return "blocking host-to-device copy"
    return None


def _target_device(name: str, args, kwargs) -> torch.device | None:
    if name == "cuda":
        return torch.device("cuda")
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, (torch.device, str)):
            try:
                return torch.device(a)
            except RuntimeError:
                return None
        if isinstance(a, torch.Tensor):
            return a.device
    return None
