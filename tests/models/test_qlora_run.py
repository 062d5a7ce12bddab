"""A real QLoRA run on a CPU, end to end, on the embedded SmolLM2-135M: 4-bit NF4 base (double quantisation),
adamw_8bit, gradient checkpointing; `tunelab train` is killed (SIGKILL) after a step and re-run, and ends with the
adapter and 8-bit optimizer state of an uninterrupted run; then `tunelab eval`, `tunelab export` (GGUF, both
QLoRA merges measured in parity.json) and one answer served from the exported GGUF.

References: an uninterrupted run of the same config, plain PEFT + bitsandbytes for the trained model's loss, plain
transformers for the merged folder. Steps and sequences are tiny: the chain, not the learning, is under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    Workspace,
    adapter_file,
    max_adapter_difference,
    tunelab_train,
    tunelab_train_here,
    write_chat_jsonl,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
STEPS = 3


@pytest.fixture(scope="module")
def qlora_ws(tmp_path_factory) -> Workspace:
    from tunelab.io import cache_dir

    root = tmp_path_factory.mktemp("qlora-run")
    data_file = root / "chats.jsonl"
    write_chat_jsonl(data_file, n=24)
    # The embedded model's dequantised folder is shared with the other tests (the default cache); data is not.
    return Workspace(root, Path("embedded:smollm2-135m"), data_file, cache_dir())


def qlora_config(ws: Workspace, run_dir: Path) -> Path:
    return ws.config(
        run_dir,
        data={"output_dir": str(ws.root / "prepared")},
        model={"name": "embedded:smollm2-135m", "load_in_4bit": True},
        lora={"r": 8, "alpha": 16},  # r=8: SmolLM2's q/o/gate/up adapters hold >= 4096 values, so 8-bit states
        train={
            "max_steps": STEPS,
            "save_steps": 2,
            "eval_steps": 2,
            "grad_accum": 1,
            "max_seq_len": 64,
            "optimizer": "adamw_8bit",
            "gradient_checkpointing": True,
        },
        eval={
            "batch_size": 4,
            "max_val_rows": 4,
            "prompts": ["What is the capital of Australia?"],
            "max_new_tokens": 6,
        },
    )


@pytest.fixture(scope="module")
def qlora_run(qlora_ws):
    """(killed-and-resumed run, uninterrupted run, stdout of the resumed session). Only the killed run needs a
    process of its own; the other two run in this one."""
    ws = qlora_ws
    reference = ws.root / "reference" / "run"
    result = tunelab_train_here(ws, qlora_config(ws, reference))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = ws.root / "killed" / "run"
    config = qlora_config(ws, run_dir)
    killed = tunelab_train(ws, config, fault="step:3")  # SIGKILL after step 3's update, before it is recorded
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = tunelab_train_here(ws, config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run_dir, reference, resumed.stdout


def test_killed_4bit_run_resumes_to_the_uninterrupted_adapter_and_8bit_state(qlora_run):
    run_dir, reference, stdout = qlora_run
    assert f"resuming from {run_dir / 'checkpoints' / 'step-000002'}" in stdout
    line = next(text for text in stdout.splitlines() if text.startswith("architecture:"))
    assert "fast path (packed attention" in line and "4-bit nf4 base" in line and "double quant" in line
    assert max_adapter_difference(adapter_file(run_dir), adapter_file(reference)) == 0.0
    final = f"checkpoints/step-{STEPS:06d}/optimizer.pt"
    ours, theirs = (torch.load(d / final, weights_only=True)["state"] for d in (run_dir, reference))
    assert same_state(ours, theirs)
    # adamw_8bit really kept 8-bit states (bitsandbytes saves them under its own key)
    saved = [state.get("__bnb_optimizer_quant_state__", state) for state in theirs.values()]
    assert any(state.get("state1") is not None and state["state1"].dtype == torch.uint8 for state in saved)


def same_state(a, b) -> bool:
    """Bit-for-bit equality of two optimizer states (nested dicts/lists of tensors and numbers)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_eval_export_and_serve_a_4bit_run(qlora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.eval.evaluate import evaluate_run
    from tunelab.export.pipeline import export_run
    from tunelab.models.inference import GenerationParams, load_backend
    from tunelab.models.runs import load_run_model

    run_dir, _, _ = qlora_run
    summary = json.loads((run_dir / "summary.json").read_text())

    # eval scores the model as trained (4-bit base + adapter): the trainer's own final val loss
    report = evaluate_run(run_dir, samples=True)
    assert report["precision"] == "fp32" and report["val_rows"] > 0
    assert report["tuned"]["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert report["tuned"]["val_loss"] != report["base"]["val_loss"]

    # the trained model, reloaded, is plain PEFT over a bitsandbytes base
    trained, tokenizer = load_run_model(run_dir, base="quantized", dtype=torch.float32)
    assert "Linear4bit" in {type(m).__name__ for m in trained.modules()}

    export = export_run(run_dir, ["f16"], threads=1)  # raises if the f16 GGUF disagrees with the merged model
    assert export["merged_into"] == "dequantized"
    parity = json.loads((run_dir / "export" / "parity.json").read_text())
    merges = parity["qlora_merges"]
    assert merges["default"] == merges["exported"] == "dequantized"
    nf4, original = merges["merges"]["dequantized"], merges["merges"]["original"]
    assert merges["val_rows"] == export["val_loss"]["val_rows"] > 0
    assert nf4["val_loss"] == pytest.approx(export["val_loss"]["tuned"], rel=1e-6)  # the exported model, same rows
    assert nf4["greedy_exact"] == merges["prompts"] and abs(nf4["val_loss_delta"]) < 1e-4
    assert abs(original["val_loss_delta"]) > 10 * abs(nf4["val_loss_delta"])  # the quantisation error returns

    # the merged folder is plain transformers: the trained model's logits without bitsandbytes or PEFT
    merged_dir = run_dir / "export" / "merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Plan a day in Lisbon."}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
    assert isinstance(trained, PeftModel)

    gguf = run_dir / "export" / "model-f16.gguf"
    answer = "".join(
        load_backend(gguf, threads=1).stream_chat(
            [{"role": "user", "content": "What is the capital of Australia?"}],
            GenerationParams(temperature=0, max_new_tokens=8),
        )
    )
    assert answer.strip()
