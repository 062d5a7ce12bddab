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

# `make test` runs the suite on two pytest-xdist workers (`-n 2`). Each worker is pinned to its own share
# of the cores, and every thread count that defaults to "the cores this process may use" (training, llama.cpp,
# the processes a test starts, which inherit the pinning) follows it. Without the pinning, a test asking for two
# threads shares a core with the other worker, and its threads wait for each other at every parallel region: a
# one-step quickstart took 231 s instead of 43.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    cores = sorted(os.sched_getaffinity(0))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if len(cores) >= workers:
        own = cores[int(WORKER.removeprefix("gw")) % workers :: workers]
        try:
            os.sched_setaffinity(0, own)
        except OSError:  # a sandbox that forbids it: the workers share the cores, one thread each
            own = own[:1]
        os.environ["OMP_NUM_THREADS"] = str(len(own))

import pytest  # noqa: E402  (after TMPDIR is set: imports may create temp folders)

from tests.helpers import build_tiny_llama  # noqa: E402

# Under xdist, the unit of work a worker takes whole is a test module (its module fixtures are built once), or a
# whole folder for the folders whose conftest builds session fixtures (trained or exported runs), so that each of
# those is built once. (xdist's own `--dist loadgroup` cannot do this with pytest 9.2: it renames test ids through
# an attribute pytest no longer reads.)
ONE_WORKER_FOLDERS = {"export", "reliability", "doctor"}


def pytest_configure(config):
    """With workers, the embedded model is converted from its GGUF once, here, before they start: two workers
    converting it at once into the shared cache would replace each other's folder."""
    if WORKER or not getattr(config.option, "numprocesses", None) or config.option.collectonly:
        return
    from tunelab.models.loading import resolve_model_path

    resolve_model_path("embedded:smollm2-135m")


@pytest.hookimpl(optionalhook=True)  # a plain `pytest` without xdist still runs
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrFolderScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            parts = path.split("/")
            return "/".join(parts[:2]) if len(parts) > 2 and parts[1] in ONE_WORKER_FOLDERS else path

    return ModuleOrFolderScheduling(config, log)


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps a process-wide singleton; tests that pick CPU vs GPU each need their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
