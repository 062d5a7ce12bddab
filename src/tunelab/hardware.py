"""What this machine can do: CPU flags and name, CUDA compute capability.

The lowest layer (like errors and config): it imports nothing from tunelab's stages, so every stage (training
precision, benchmark reports) reads the hardware the same way.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str | None:
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (avx2, avx512_bf16, amx_bf16, ...); empty where unknown."""
    flags = _cpuinfo_field("flags")
    return frozenset(flags.split()) if flags else frozenset()


def cpu_model() -> str:
    """The CPU's marketing name, for benchmark reports (timings mean little without it)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, a container's cpuset), not the machine's count.

    Thread counts follow this so that two jobs pinned to a core each do not both spawn a thread per machine core.
    """
    return max(1, len(os.sched_getaffinity(0)))


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) compute capability of the current CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def cuda_device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None
