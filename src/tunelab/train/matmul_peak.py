"""The machine's matmul peak (FLOP/s), measured once per machine, dtype and thread count, then cached.

MFU needs a ceiling that this CPU actually reaches, not a datasheet figure: the best sustained rate of a few
matmul shapes (a small probe, SmolLM2-135M's own and a large square) with torch, in the training precision. The
measurement takes a few seconds, also where the precision has no native kernels (fp16 without avx512_fp16 runs at
~0.6 GFLOP/s, where one 2048^3 product alone takes half a minute): shapes run cheapest first, and one whose single
run, at the best rate seen so far, would take longer than the whole budget is left out. The figure is stored in
~/.cache/tunelab/matmul_peak.json keyed by CPU model, thread count, dtype and torch version, so a training run pays
for it once per machine. On a shared machine other work depresses the figure, so the 1-minute load average is
stored with it, and a later run on a quieter machine measures again and keeps the better figure.
"""

from __future__ import annotations

import os
import time

import torch

from tunelab.io import read_json_cache, write_json_cache

SHAPES = ((256, 576, 576), (2048, 576, 576), (2048, 576, 1536), (2048, 1536, 576), (2048, 2048, 2048))  # cheapest first


CACHE = "matmul_peak.json"


def measure(dtype: torch.dtype, threads: int, seconds: float = 1.5, device: str | torch.device = "cpu") -> dict:
    """{"gflops": best GFLOP/s, "shapes": per-shape GFLOP/s}, measured now in this process in about `seconds`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    per_shape = {}
    try:
        for m, k, n in SHAPES:
            flops = 2 * m * k * n
            if per_shape and flops / (max(per_shape.values()) * 1e9) > seconds:
                break  # the larger shapes would each overrun the whole budget: no native kernels for this dtype
            a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
            for _ in range(3):
                a @ b
            sync()
            runs, start, elapsed = 0, time.perf_counter(), 0.0
            while runs == 0 or elapsed < seconds / len(SHAPES):
                a @ b
                sync()
                runs, elapsed = runs + 1, time.perf_counter() - start
            per_shape[f"{m}x{k}x{n}"] = flops * runs / elapsed / 1e9
    finally:
        torch.set_num_threads(previous)
    return {"gflops": max(per_shape.values()), "shapes": per_shape}


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _key(dtype: torch.dtype, threads: int, device: torch.device) -> str:
    from tunelab.hardware import cpu_model

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}|{threads} threads"
    return f"{where}|{str(dtype).removeprefix('torch.')}|torch {torch.__version__}"


def matmul_peak(
    dtype: torch.dtype, threads: int | None = None, refresh: bool = False, device: str | torch.device = "cpu"
) -> dict:
    """The cached measurement for this machine (measured and stored on first use, or when `refresh`)."""
    threads = threads or torch.get_num_threads()
    device = torch.device(device)
    key = _key(dtype, threads, device)
    cached = read_json_cache(CACHE)
    previous = cached.get(key) if isinstance(cached.get(key), dict) and cached[key].get("gflops") else None
    load = _load_average()
    # An entry without its load average predates recording it: its load is unknown, so it is measured again.
    if previous is not None and not refresh and load + 0.5 >= previous.get("load_avg", float("inf")):
        return previous
    # First measurement, or the machine is quieter than when the cached one was taken (a shared machine's load
    # depresses the figure): measure, and keep the best figure ever seen — a peak is what the CPU *can* do.
    result = {**measure(dtype, threads, device=device), "load_avg": load}
    if previous is not None and previous["gflops"] > result["gflops"]:
        result = previous
    cached[key] = result
    write_json_cache(CACHE, cached)
    return result
