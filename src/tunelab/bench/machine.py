"""Where and how a benchmark ran: one header for `tunelab bench data|train|infer` results.

docs/benchmarks.md records every figure with its command, machine (the CPU model from /proc/cpuinfo, cores,
native bf16 flags, library versions) and date; all three benchmarks take them from here.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys

# TODO(hardware.py): cpu_flags/cpu_model move to tunelab.hardware; import them from there once it lands.
from tunelab.train.precision import NATIVE_BF16_CPU_FLAGS, cpu_flags, cpu_model


def command_line() -> str:
    """The command as the user typed it (`tunelab bench ...`)."""
    return "tunelab " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def machine_info() -> dict:
    """CPU model, logical CPUs, native bf16 flags, OS and the versions of the libraries that set the speed."""
    versions = {}
    for dist in ("torch", "transformers", "peft", "llama-cpp-python"):
        try:
            versions[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "native_bf16": sorted(cpu_flags() & set(NATIVE_BF16_CPU_FLAGS)),
        "python": platform.python_version(),
        "os": platform.platform(),
        **versions,
    }


def machine_line(info: dict, threads: int | None = None) -> str:
    """One line for a table caption: `CPU, N logical CPUs (flags), T threads, torch X`."""
    flags = ",".join(info["native_bf16"]) or "no native bf16"
    used = f", {threads} threads" if threads else ""
    return f"{info['cpu']}, {info['cores']} logical CPUs ({flags}){used}, torch {info['torch']}"


def run_header(command: str | None = None, threads: int | None = None) -> dict:
    """{"command", "date", "machine" (one line), "machine_info" (the details)} for a benchmark's JSON."""
    info = machine_info()
    return {
        "command": command or command_line(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_line(info, threads),
        "machine_info": info,
    }
