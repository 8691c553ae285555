"""Shared fixtures. Keep this small: helpers for running the project's entry points in clean subprocesses."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the interpreter running pytest: the project's venv

# Set by launchers (deepspeed, torchrun, mpirun); a test subprocess must start with a clean process group.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "CROSS_RANK", "CROSS_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def clean_env() -> dict[str, str]:
    """The environment for a subprocess: no distributed variables, the venv first on PATH, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]]) if env.get("PYTHONPATH") else str(REPO)
    env["HF_HUB_OFFLINE"] = "1"
    # DeepSpeed JIT-compiles a small shm op (~1 min) on first use. Other programs sharing the default
    # ~/.cache/torch_extensions build folder can leave it built with another command line, which makes ninja
    # rebuild it in every test run; a folder of our own is compiled once and then reused.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "online_aug-tests" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: more torch threads cost more than they gain."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
