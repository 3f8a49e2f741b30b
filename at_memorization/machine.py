"""The machine a result was measured on, in plain values and without importing torch (``at-mem
reproduce`` records it before any child starts; the benchmarks name their CPU with it)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC ..."), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """The GPUs ``nvidia-smi`` lists (none where it is absent or fails)."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return []
    return [n.strip() for n in names if n.strip()]


def machine_description(devices: tuple[str, ...] = ()) -> dict:
    """Host, CPU, Python and torch's version (from its metadata); the GPUs when ``devices`` name
    CUDA or name nothing (the default device may then be a GPU)."""
    info = {"host": platform.node(), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        from importlib.metadata import version

        info["torch"] = version("torch")
    except Exception:  # noqa: BLE001  (metadata only)
        pass
    if any(d.startswith("cuda") for d in devices) or not devices:
        gpus = gpu_names()
        if gpus:
            info["gpus"] = gpus
    return info
