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

from tunelab.hardware import cpu_flags, cpu_model, usable_cores
from tunelab.train.precision import NATIVE_BF16_CPU_FLAGS


def command_line() -> str:
    """The command as the user typed it (`tunelab bench ...`)."""
    return " ".join(["tunelab", *(shlex.quote(a) for a in sys.argv[1:])])


def machine_info() -> dict:
    """CPU model, logical CPUs (the machine's and those this run may use), native bf16 flags, OS and library versions.

    `usable_cores` is the affinity mask: a benchmark pinned with `taskset -c 0` on a 2-core machine ran on one core.
    """
    versions = {}
    for dist in ("torch", "transformers", "peft", "llama-cpp-python"):
        try:
            versions[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "native_bf16": sorted(cpu_flags() & set(NATIVE_BF16_CPU_FLAGS)),
        "python": platform.python_version(),
        "os": platform.platform(),
        **versions,
    }


def machine_line(info: dict, threads: int | None = None) -> str:
    """One line for a table caption: `CPU, N logical CPUs [, M usable] (flags), T threads, torch X`."""
    flags = ",".join(info["native_bf16"]) or "no native bf16"
    usable = info.get("usable_cores", info["cores"])  # results written before the field existed lack it
    pinned = f", {usable} usable" if usable != info["cores"] else ""
    used = f", {threads} threads" if threads else ""
    return f"{info['cpu']}, {info['cores']} logical CPUs{pinned} ({flags}){used}, torch {info['torch']}"


def run_header(command: str | None = None, threads: int | None = None) -> dict:
    """{"command", "date", "machine" (one line), "machine_info" (the details)} for a benchmark's JSON."""
    info = machine_info()
    return {
        "command": command or command_line(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_line(info, threads),
        "machine_info": info,
    }
