"""Memory bandwidth, measured with a plain copy, for the decode-speed bound of `tunelab bench infer`.

Decoding one token reads every weight once (the KV cache of a short chat is tiny next to them), so
tokens/s <= bandwidth / model bytes. The bandwidth is the best of a few copies of a buffer much larger than the
CPU's caches (torch's `copy_`, which uses the given threads, as llama.cpp's decode does), counting the bytes read
and the bytes written.
"""

from __future__ import annotations

import time

import torch


def copy_bandwidth_gb_s(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Best GB/s (10^9 bytes) of `dst.copy_(src)` over `repeats` copies of `mib` MiB (read + write counted)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch: page faults are not bandwidth
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * src.numel() * 4 / best / 1e9


def decode_bound_tok_s(model_bytes: int, bandwidth_gb_s: float) -> float:
    """Upper bound on decode tokens/s when every token reads all `model_bytes` once."""
    return bandwidth_gb_s * 1e9 / max(model_bytes, 1)
