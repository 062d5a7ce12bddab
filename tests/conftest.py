"""Shared fixtures: a tiny random-init Llama (fast tests) and the embedded tokenizer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Nothing a test run writes lands in the system temp folder: pytest's tmp_path, Gradio's file cache, torch
# elastic's and inductor's folders, browsers' profiles and every subprocess's temp files go to the repository's
# own `.test-tmp/` (git-ignored; `make test` empties it first).
TEST_TMP = Path(__file__).resolve().parent.parent / ".test-tmp"
TEST_TMP.mkdir(exist_ok=True)
os.environ["TMPDIR"] = str(TEST_TMP)
os.environ.setdefault("GRADIO_TEMP_DIR", str(TEST_TMP / "gradio"))
tempfile.tempdir = None  # recomputed from TMPDIR on next use

import pytest  # noqa: E402  (after TMPDIR is set: imports may create temp folders)
import torch  # noqa: E402

from tests.helpers import build_tiny_llama  # noqa: E402

TESTS = Path(__file__).resolve().parent
# `make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`). Each worker then gets one of the two
# cores: one intra-op thread, inherited by the processes it starts (tests that need more threads set them). The
# folders whose conftest builds session fixtures (trained or exported runs) stay on one worker, so each fixture is
# built once; every other test module is its own group.
ONE_WORKER_FOLDERS = {"export", "reliability", "doctor"}
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.relative_to(TESTS).parts
        group = parts[0] if parts[0] in ONE_WORKER_FOLDERS else "/".join(parts)
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps a process-wide singleton; tests that pick CPU vs GPU each need their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
