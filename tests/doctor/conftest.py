"""Run folders for the after-training checks: built without training (tests/helpers.make_run_dir), exported."""

from __future__ import annotations

import pytest

from tests.helpers import llama32_shaped_folder, make_run_dir, make_tiny_model


@pytest.fixture(scope="session")
def peaky(tmp_path_factory):
    """A random tiny Llama (peaky logits: clear greedy winners) with a strong random adapter, exported f16 + q8_0."""
    from tunelab.export.pipeline import export_run

    root = tmp_path_factory.mktemp("doctor-peaky")
    run = make_run_dir(root / "run", model_name=str(make_tiny_model(root / "base")))
    export_run(run, ["f16", "q8_0"], threads=1)
    return root


@pytest.fixture(scope="session")
def stopping(tmp_path_factory):
    """The Llama-3.2-shaped tiny model that ends every turn at once, with a small adapter, exported f16."""
    from tunelab.export.pipeline import export_run

    root = tmp_path_factory.mktemp("doctor-stopping")
    base = llama32_shaped_folder(root / "base", stop_at_once=True)
    run = make_run_dir(root / "run", model_name=str(base), lora_b_std=0.02)
    export_run(run, ["f16"], threads=1)
    return root
