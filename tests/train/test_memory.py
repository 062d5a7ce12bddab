"""The training loop's allocator settings do free memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

FRAGMENT_THE_HEAP = """
import ctypes, sys
from tunelab.train.memory import release_free_heap, return_freed_tensors_to_the_os

def rss_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

return_freed_tensors_to_the_os()  # the loop's setting: blocks under 1 MiB come from the heap
blocks = [b"x" * (256 * 1024) for _ in range(800)]  # 200 MiB of step-sized temporaries, written
kept = blocks[::16]  # a few survivors pin the heap, as a step's leftovers do
del blocks
before = rss_mib()
release_free_heap()
print(before, rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's heap")
def test_release_free_heap_returns_a_fragmented_heap_to_the_os():
    """A fresh process (the test runner's own heap would blur the figure): ~190 MiB freed below the mmap threshold
    stays resident until the release, and goes back to the OS with it."""
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT_THE_HEAP],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    before, after = map(float, out.stdout.split())
    assert before - after > 150, (before, after)


def test_the_onednn_primitive_cache_is_bounded_unless_the_user_set_it(monkeypatch):
    from tunelab.train.memory import ONEDNN_PRIMITIVE_CACHE, bound_onednn_primitive_cache

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")  # recorded, so the end of the test restores the original
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    bound_onednn_primitive_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_PRIMITIVE_CACHE) == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")  # the user's choice wins
    bound_onednn_primitive_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's (elsewhere ru_maxrss is used)")
def test_peak_rss_is_the_process_own_not_its_parents():
    """A process started by subprocess begins with its parent's ru_maxrss; the loop and the bench workers report
    their own peak. The parent here holds 512 MiB of written pages; the child holds next to nothing."""
    held = bytearray(b"\x01") * (512 << 20)
    child = subprocess.run(
        [sys.executable, "-c", "from tunelab.train.memory import peak_rss_mib; print(peak_rss_mib())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert len(held) == 512 << 20
    assert float(child.stdout) < 128, child.stdout
