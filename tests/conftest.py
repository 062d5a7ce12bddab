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

from tests.helpers import build_tiny_llama  # noqa: E402


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps a process-wide singleton; tests that pick CPU vs GPU each need their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
