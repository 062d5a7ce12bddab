"""Test run folders shaped like `tunelab train` output (models/runs.py), without training.

The adapter is initialised with non-zero LoRA weights so that it really changes the model's outputs:
a merge that forgot the adapter would then be caught by comparing against the base.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_run_dir, make_tiny_model

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(name="make_tiny_model", scope="session")
def make_tiny_model_fixture():
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_model(root / "base")
    return make_run_dir(root / "run", model_name=str(base))


@pytest.fixture(scope="session")
def smol_run(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("smol") / "run")
