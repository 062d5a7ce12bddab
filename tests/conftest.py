"""Shared fixtures: a tiny random-init Llama (fast tests) and the embedded tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from tests.helpers import build_tiny_llama


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps a process-wide singleton; tests that pick CPU vs GPU each need their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
