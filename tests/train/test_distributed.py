"""Training on 2 CPU processes (gloo) through the shipped accelerate configs gives the single-process adapter:
DDP (configs/accelerate/ddp.yaml) with grad_accum 1 and 2 and an uneven split of the batch, and FSDP
(configs/accelerate/fsdp.yaml: base sharded, LoRA trained), whose checkpoints are written once and resume.

`accelerate launch --cpu` starts ONE process whatever --num_processes says (accelerate's simple launcher), so
the launches here leave `--cpu` out: accelerate then starts the processes with torchrun and each one, finding no
GPU, runs on the CPU with gloo. Every test checks that 2 processes really ran (summary.json, first log line).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import conversations_file, small_llama_folder, tunelab_here
from tunelab.train.checkpoint import latest_valid_checkpoint, list_checkpoints

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
FSDP_WORKER = str(Path(__file__).with_name("fsdp_cpu_worker.py"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    return folder, small_llama_folder(folder), conversations_file(folder, n=40)


def config_file(inputs, run_dir: Path, model: str = "", **train) -> Path:
    """`model`: more keys of the model section, as YAML flow items (e.g. `load_in_4bit: true`)."""
    folder, model_dir, data = inputs
    settings = {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "save_steps": 3, "eval_steps": 3, **train}
    path = run_dir.with_suffix(".yaml")
    path.write_text(f"""
model: {{name: {model_dir}{", " + model if model else ""}}}
data:
  sources: [{{path: {data}}}]
  output_dir: {folder / "prepared"}
  dedup: {{near: false}}
  val_fraction: 0.1
train:
  output_dir: {run_dir}
  lr: 1.0e-3
  max_seq_len: 64
  precision: fp32
  threads: 1
{"".join(f"  {k}: {v}{chr(10)}" for k, v in settings.items())}""")
    return path


def single(config: Path) -> subprocess.CompletedProcess:
    """The single-process reference, run in this process (no interpreter start-up)."""
    done = tunelab_here("train", str(config))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def launch(accelerate_config: str, config: Path, *train_args: str, fsdp: bool = False) -> subprocess.CompletedProcess:
    target = [FSDP_WORKER] if fsdp else ["-m", "tunelab.cli"]
    return _run(
        [
            ACCELERATE,
            "launch",
            "--config_file",
            str(ROOT / "configs" / "accelerate" / accelerate_config),
            "--num_processes",
            "2",
            *target,
            "train",
            str(config),
            *train_args,
        ],
        tmp=config.parent,
    )


def _run(command, tmp: Path | None = None) -> subprocess.CompletedProcess:
    # torch elastic keeps per-launch folders in TMPDIR: keep them under the test's own folder
    env = {**os.environ, "TMPDIR": str(tmp)} if tmp else None
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def assert_ran_on(run_dir: Path, output: str, processes: int, kind: str, global_batch: int) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["processes"], summary["distributed"], summary["global_batch"]) == (processes, kind, global_batch)
    first = next(line for line in output.splitlines() if line.startswith("processes:"))
    assert first.startswith(f"processes: {processes} ({kind}); global batch: {global_batch} conversations")


@pytest.mark.parametrize("batch_size, grad_accum", [(3, 1), (2, 2)])
def test_two_process_ddp_matches_single_process(inputs, tmp_path, batch_size, grad_accum):
    """grad_accum 1 (the default) and an uneven split (batch 3 = 2 + 1 rows), and accumulation over 2 micro-batches."""
    one, two = tmp_path / "single", tmp_path / "ddp"
    out_one = single(config_file(inputs, one, batch_size=batch_size, grad_accum=grad_accum))
    out_two = launch("ddp.yaml", config_file(inputs, two, batch_size=batch_size, grad_accum=grad_accum))
    assert_ran_on(one, out_one.stdout, 1, "NO", batch_size * grad_accum)
    assert_ran_on(two, out_two.stdout, 2, "MULTI_CPU", batch_size * grad_accum)
    assert_same_adapter(adapter(one), adapter(two))


def test_two_process_ddp_on_a_4bit_base_with_adamw_8bit_matches_single_process(inputs, tmp_path):
    """QLoRA under DDP: every process quantises the same base (NF4 is a function of the weights), and the adapter
    gradients are averaged as for a plain base; adamw_8bit's states stay per-process and equal."""
    one, two = tmp_path / "single", tmp_path / "ddp"
    keys = {"model": "load_in_4bit: true", "optimizer": "adamw_8bit", "batch_size": 2, "grad_accum": 1}
    out_one = single(config_file(inputs, one, **keys))
    out_two = launch("ddp.yaml", config_file(inputs, two, **keys))
    assert_ran_on(two, out_two.stdout, 2, "MULTI_CPU", 2)
    assert "4-bit nf4 base" in out_one.stdout and "4-bit nf4 base" in out_two.stdout
    # The averaged gradient differs from the single-process one by float rounding (reduction order); with 8-bit
    # states that can move a value to the neighbouring code (seen: 1 of 8192 values off by 2e-5, lr 1e-3).
    single_adapter, ddp_adapter = adapter(one), adapter(two)
    assert single_adapter.keys() == ddp_adapter.keys() and single_adapter
    for key in single_adapter:
        torch.testing.assert_close(single_adapter[key], ddp_adapter[key], rtol=0, atol=1e-4)


def test_fsdp_matches_single_process_writes_checkpoints_once_and_resumes(inputs, tmp_path):
    one, two = tmp_path / "single", tmp_path / "fsdp"
    settings = {"max_steps": 4, "batch_size": 3, "grad_accum": 1, "save_steps": 2, "eval_steps": 2}
    single(config_file(inputs, one, **settings))

    first = launch("fsdp.yaml", config_file(inputs, two, **{**settings, "max_steps": 2}), fsdp=True)
    shards = re.findall(r"fsdp-shards: rank (\d) units (\d+) local (\d+) full (\d+)", first.stdout)
    assert sorted(rank for rank, *_ in shards) == ["0", "1"]
    for _, units, local, full in shards:  # each process holds about half of the base
        assert int(units) >= 2 and int(local) * 2 <= int(full) + 2 * int(units)
    assert [c.name for c in list_checkpoints(two)] == ["step-000002"]

    # continued to 4 steps with --extend (max_steps may only grow on request); every step is inside the default
    # 5-step warm-up, so the recomputed schedule gives the same learning rates as the single 4-step run
    second = launch("fsdp.yaml", config_file(inputs, two, **settings), "--extend", fsdp=True)
    assert "resuming from" in second.stdout and "step 2 of 4" in second.stdout
    assert_ran_on(two, second.stdout, 2, "FSDP", 3)

    # Written once, by the main process: each step's checkpoint is one complete folder, no temp folders left.
    root = two / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    assert latest_valid_checkpoint(two).name == "step-000004"
    steps = [
        json.loads(line)["step"]
        for line in (two / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one line per step, none doubled by a second writer

    assert_same_adapter(adapter(one), adapter(two))
    # the held-out loss under FSDP runs through the wrapped loss module (the one heldout_loss), on every process
    val_one, val_two = (json.loads((run / "summary.json").read_text())["final_val_loss"] for run in (one, two))
    assert abs(val_one - val_two) <= 1e-4 * abs(val_one)
    checkpoint = load_file(str(root / "step-000004" / "adapter" / "adapter_model.safetensors"))
    assert_same_adapter(checkpoint, adapter(two))
