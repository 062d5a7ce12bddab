"""Allocator settings of the training loop (no change to the numbers), and the peak-RSS figure it reports.

The hand-written lean autograd functions (SwiGLU, RMSNorm, LoRA) are in tunelab.train.fused_layers."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import sys
from pathlib import Path


def process_status_mib(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's own peak RSS: the kernel's high-water mark (VmHWM) on Linux, not getrusage's ru_maxrss, which
    a process started by vfork + exec (as Python's subprocess starts workers) inherits from its parent's peak
    (measured: 811 MiB in a child of an 811 MiB parent whose own peak was 10 MiB). Elsewhere ru_maxrss."""
    own = process_status_mib("VmHWM")
    return own if own is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def _libc_function(name: str):
    """A glibc allocator function, looked up once (the heap release runs after every step), or None where the C
    library does not have it (not Linux, or not glibc, e.g. musl): then there is nothing to tune."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name, None)
    except OSError:
        return None


MMAP_THRESHOLD = 1 << 20


def return_freed_tensors_to_the_os(threshold_bytes: int = MMAP_THRESHOLD) -> None:
    """`train.release_memory` (glibc only): serve allocations >= 1 MiB with mmap, so freed activations go back to
    the OS. The price is speed: every step maps, faults in and zeroes its activations again (~450k page faults per
    fp32 step of SmolLM2-135M on 4 x 256 tokens, ~20 % of the CPU time in the kernel); glibc's defaults keep freed
    blocks and reuse them (~25k faults per step), which is why the default run does not do this.

    glibc raises its mmap threshold to the size of any mmapped block that is freed (up to 32 MiB), after which
    activations and temporaries of a few MiB come from the heap, fragment it and are never returned: measured
    5.07 -> 3.40 GB peak RSS for one 1765-token fp32 step of SmolLM2-135M. Fixing the threshold stops that.
    """
    if (mallopt := _libc_function("mallopt")) is not None:
        mallopt(-3, threshold_bytes)  # -3 = M_MMAP_THRESHOLD


def release_free_heap() -> None:
    """`train.release_memory` (glibc only), before the first step and after each optimizer step: hand the heap's free
    pages back to the OS.

    Below the mmap threshold a step's many small tensors (LoRA intermediates, per-conversation attention slices,
    k/v projections) come from the heap; what they leave free is fragmented, kept, and grows from step to step:
    measured RSS after a step 1758-1946 MiB without this, 1048 MiB with it (fp32, SmolLM2-135M, 4 x 256 tokens),
    and the 10-step peak 2355 -> 2145 MiB.
    """
    if (malloc_trim := _libc_function("malloc_trim")) is not None:
        malloc_trim(0)


ONEDNN_PRIMITIVE_CACHE = 64  # entries; one step of a 30-layer model uses a few dozen (shapes x forward/backward)


def bound_onednn_primitive_cache(capacity: int = ONEDNN_PRIMITIVE_CACHE) -> None:
    """Peak-RSS trick for bf16 on CPU: keep oneDNN's primitive cache to about one step's worth of entries.

    bf16 linears run through oneDNN, which caches a primitive (with its buffers) per shape — and packing gives every
    step a new token count, so the default 1024-entry cache grew by ~30 MiB per step (RSS after step 12 of a
    checkpointed bf16 run 1142 MiB; 1009 MiB with 64 entries, same speed; 0 entries: 3x slower). oneDNN reads the
    variable when it first builds a primitive, so this runs before training; a value the user set is kept.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def configure_allocator(release_memory: bool) -> None:
    """The training loop's allocator settings, made before its first step: oneDNN's primitive cache bounded and,
    with `train.release_memory`, freed tensors handed back to the OS, starting with what loading left free (a 4-bit
    load's quantisation temporaries: ~290 MiB on the Llama-3.2-1B shape)."""
    if release_memory:
        return_freed_tensors_to_the_os()
        release_free_heap()
    bound_onednn_primitive_cache()
