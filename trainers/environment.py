"""What a trial ran on: package versions, the git commit and the hardware, stored with each trial."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["environment_record", "native_bf16"]

_PACKAGES = (
    "ragsweep",
    "torch",
    "transformers",
    "sentence-transformers",
    "peft",
    "datasets",
    "numpy",
    "faiss-gpu",
    "faiss-cpu",
)


def environment_record() -> dict[str, object]:
    """Versions, commit and hardware; ``reproduce`` compares these to report drift."""
    return {
        "python": platform.python_version(),
        "packages": _versions(),
        "git": _git_state(),
        "hardware": _hardware(),
    }


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA, or a CPU with AVX512-BF16 / AMX): where
    it does, ``training.precision: auto`` trains in bf16 autocast, with about half the activation
    memory and a third of the time of fp32 on CPU."""
    import torch  # here: importing this module (search's plan does) loads no torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # The op's result is untyped: a Python bool.
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _git_state() -> dict[str, object] | None:
    # The source tree this code runs from; None when installed without a checkout.
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", source, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", source, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _hardware() -> dict[str, object]:
    import torch

    hardware: dict[str, object] = {
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return hardware


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
