"""A QLoRA run (config says model.load_in_4bit: true) is usable after training on a machine without CUDA:
`tunelab eval`, `tunelab export` (GGUF) and serving reload the base unquantised (fp32 on CPU), apply the
adapter, and agree with the reference: plain PEFT applying the same adapter to the fp32 base.

The run folder is written by the test (tiny random Llama + a non-zero PEFT adapter): training a real QLoRA
run needs CUDA + bitsandbytes, which CI does not have. CUDA is hidden so the test means the same on a GPU box.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.helpers import conversations_file, small_llama_folder


@pytest.fixture
def qlora_run(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base_dir = small_llama_folder(tmp_path)
    run_dir = tmp_path / "run"
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    # init_lora_weights=False: B is non-zero, so the adapter really changes the loss (a forgotten adapter is caught).
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(run_dir / "adapter")
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(run_dir / "tokenizer")
    cfg = {
        "data": {
            "sources": [{"path": str(conversations_file(tmp_path, n=40))}],
            "output_dir": str(tmp_path / "prepared"),
            "val_fraction": 0.2,
            "dedup": {"near": False},
        },
        "model": {"name": str(base_dir), "load_in_4bit": True},
        "train": {"output_dir": str(run_dir), "precision": "auto", "max_seq_len": 64, "threads": 1},
        "eval": {"batch_size": 4, "max_val_rows": 6, "prompts": ["What is 2 plus 2?"], "max_new_tokens": 4},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir, base_dir


def reference_model(run_dir, base_dir):
    """Plain PEFT: the run's adapter on the fp32 base, nothing from tunelab."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()


@torch.no_grad()
def reference_loss(model, rows) -> float:
    """Mean cross-entropy over assistant tokens (labels != -100), one conversation at a time."""
    total, count = 0.0, 0
    for ids, labels in rows:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(labels[1:])
        keep = target != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def test_qlora_run_evaluates_exports_and_serves_without_cuda(qlora_run):
    from datasets import load_from_disk

    from tunelab.eval.evaluate import evaluate_run
    from tunelab.export.pipeline import export_run
    from tunelab.models.inference import GenerationParams, load_backend

    run_dir, base_dir = qlora_run
    reference = reference_model(run_dir, base_dir)

    report = evaluate_run(run_dir, samples=True)
    val = load_from_disk(str(run_dir.parent / "prepared" / "val"))
    rows = [(val[i]["input_ids"], val[i]["labels"]) for i in range(min(6, len(val)))]
    assert report["precision"] == "fp32" and report["val_rows"] == len(rows) > 0
    expected = reference_loss(reference, rows)
    assert report["tuned"]["val_loss"] == pytest.approx(expected, rel=1e-4)
    with reference.disable_adapter():
        expected_base = reference_loss(reference, rows)
    assert report["base"]["val_loss"] == pytest.approx(expected_base, rel=1e-4)
    assert abs(expected - expected_base) > 1e-3  # the adapter matters, so the equality above means something

    summary = export_run(run_dir, ["f16"], threads=1)  # raises if the GGUF disagrees with the merged model
    merged = run_dir / "export" / "merged"
    merged_config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in merged_config and merged_config.get("dtype", "float32") == "float32"
    assert (run_dir / "export" / "model-f16.gguf").is_file()
    export_rows = [(val[i]["input_ids"], val[i]["labels"]) for i in range(summary["val_loss"]["val_rows"])]
    assert summary["val_loss"]["tuned"] == pytest.approx(reference_loss(reference, export_rows), rel=1e-4)

    backend = load_backend(run_dir, threads=1)  # `tunelab serve RUN`: base + adapter through the inference backend
    assert all(p.dtype == torch.float32 for p in backend.model.parameters())
    ids = torch.tensor([rows[0][0]])
    with torch.no_grad():
        torch.testing.assert_close(
            backend.model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
    greedy = GenerationParams(temperature=0, max_new_tokens=4)
    assert isinstance("".join(backend.stream_chat([{"role": "user", "content": "What is 2 plus 2?"}], greedy)), str)
    gguf_backend = load_backend(run_dir / "export" / "model-f16.gguf", threads=1)  # the exported file serves too
    assert isinstance("".join(gguf_backend.stream_chat([{"role": "user", "content": "Hi"}], greedy)), str)
