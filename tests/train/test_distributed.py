"""Data-parallel training with accelerate (2 CPU processes, gloo) gives the single-process adapter."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import conversations_file, small_llama_folder

pytestmark = pytest.mark.slow


def config_file(tmp_path, model_dir, data, run_dir):
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(f"""
model: {{name: {model_dir}}}
data:
  sources: [{{path: {data}}}]
  output_dir: {tmp_path / 'prepared'}
  dedup: {{near: false}}
  val_fraction: 0.1
train:
  output_dir: {run_dir}
  max_steps: 3
  batch_size: 2
  grad_accum: 2
  lr: 1.0e-3
  max_seq_len: 64
  precision: fp32
  save_steps: 3
  eval_steps: 3
  threads: 1
""")
    return path


@pytest.mark.skipif(shutil.which("accelerate", path=str(__import__("pathlib").Path(sys.executable).parent)) is None, reason="accelerate CLI missing")
def test_two_process_ddp_matches_single_process(tmp_path):
    model_dir, data = small_llama_folder(tmp_path), conversations_file(tmp_path, n=40)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    bin_dir = __import__("pathlib").Path(sys.executable).parent
    one = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(config_file(tmp_path, model_dir, data, single))],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [str(bin_dir / "accelerate"), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tunelab.cli", "train",
         str(config_file(tmp_path, model_dir, data, ddp))],
        capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
