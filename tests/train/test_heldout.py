"""The one held-out loss (train/heldout.py): what the trainer logs, `tunelab eval` reports and the model card quotes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import tunelab
from tests.helpers import build_tiny_llama, fresh_cache
from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.heldout import heldout_loss


def rows(n=6, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = length // 3
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def hf_reference(model, examples) -> float:
    """Plain transformers: model(input_ids, labels=...) per conversation, averaged over assistant tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            n = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            total += float(loss) * n
            count += n
    return total / count


def test_heldout_loss_is_transformers_loss_per_assistant_token_whatever_the_batching():
    model = build_tiny_llama()
    examples = rows()
    reference = hf_reference(model, examples)
    for batch_size in (1, 4, 8):
        assert abs(heldout_loss(model, examples, batch_size=batch_size, pad_id=0) - reference) < 1e-4


# What a held-out loss computation looks like in the source: a loop, run without gradients (no_grad, inference_mode or
# .eval()), that calls a loss and accumulates (`+=`). train/heldout.heldout_loss is the one allowed.
LOSS_CALL = re.compile(r"cross_entropy|nll_loss|log_softmax|loss", re.IGNORECASE)
THE_ONE = "tunelab/train/heldout.py:heldout_loss"
NOT_THE_HELDOUT_LOSS = {
    # Every-token NLL of the merged HF model beside llama.cpp's perplexity of the GGUF (which counts every token):
    # a different figure from the assistant-token held-out loss, measured to compare two runtimes.
    "tunelab/export/parity.py:hf_nll",
}


def _call_names(node):
    for child in ast.walk(node):
        if isinstance(child, ast.Call):
            func = child.func
            yield func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        elif isinstance(child, ast.Attribute) and child.attr == "loss":  # model(...).loss
            yield "loss"


def _runs_without_grad(function) -> bool:
    if any(re.search(r"no_grad|inference_mode", ast.unparse(d)) for d in function.decorator_list):
        return True
    for node in ast.walk(function):
        if isinstance(node, ast.With | ast.AsyncWith):
            if any(re.search(r"no_grad|inference_mode", ast.unparse(i.context_expr)) for i in node.items):
                return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "eval":
            if not node.args:
                return True
    return False


def loss_loops(source: str, where: str) -> set[str]:
    """`where:function` for every function of `source` that computes a loss over rows in a loop without gradients."""
    found = set()
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef) or not _runs_without_grad(function):
            continue
        for loop in ast.walk(function):
            if not isinstance(loop, ast.For | ast.While | ast.comprehension):
                continue
            scope = loop if not isinstance(loop, ast.comprehension) else function
            calls_a_loss = any(LOSS_CALL.search(name or "") for name in _call_names(scope))
            accumulates = any(isinstance(node, ast.AugAssign) for node in ast.walk(scope)) or "sum" in set(
                _call_names(scope)
            )
            if calls_a_loss and accumulates:
                found.add(f"{where}:{function.name}")
    return found


def test_no_module_but_train_heldout_computes_a_held_out_loss():
    """The trainer (plain and FSDP), `tunelab eval`, the model card, the sweep and the promotion gate report one figure:
    no module other than train/heldout.py loops over rows summing a loss without gradients."""
    package = Path(tunelab.__file__).resolve().parent
    found = set()
    for path in sorted(package.rglob("*.py")):
        found |= loss_loops(path.read_text(encoding="utf-8"), path.relative_to(package.parent).as_posix())
    assert THE_ONE in found  # the rule recognises the function it protects
    assert found - {THE_ONE} - NOT_THE_HELDOUT_LOSS == set()


def test_the_rule_recognises_a_held_out_loss_written_again():
    """The shapes a second copy takes: a loss module over batches with .eval(), a cross-entropy under no_grad."""
    through_a_module = """
def wrapped_loss(loss_module, batches):
    loss_module.eval()
    total = 0.0
    for batch in batches:
        total += float(loss_module(batch))
    return total
"""
    per_row = """
@torch.no_grad()
def val_loss(model, rows):
    return sum(model(input_ids=ids, labels=labels).loss for ids, labels in rows) / len(rows)
"""
    assert loss_loops(through_a_module, "m") == {"m:wrapped_loss"}
    assert loss_loops(per_row, "m") == {"m:val_loss"}
    assert (
        loss_loops("def train_step(model, batch):\n    model.train()\n    return model(**batch).loss\n", "m") == set()
    )


MARKER = 1234.5  # no cross-entropy of a real model comes out at this value


@pytest.mark.slow
def test_every_reported_held_out_loss_comes_from_the_one_function(tmp_path, monkeypatch):
    """With heldout_loss's own loss swapped for a marker, the trainer's val loss, `tunelab eval`, the model card's
    losses (export merge), the sweep's fixed held-out sets and the promotion gate's val loss all report the marker:
    none computes the figure any other way."""
    import json

    import yaml

    from tests.helpers import conversations_file, small_llama_folder
    from tunelab.config import PromoteConfig, SourceConfig, load_config
    from tunelab.eval.evaluate import evaluate_run
    from tunelab.experiments.promote import adapter_checks
    from tunelab.experiments.study import heldout_losses
    from tunelab.experiments.sweep_file import HeldoutSpec, SweepSpec
    from tunelab.export.merge import merge_run
    from tunelab.train import heldout
    from tunelab.train.recipe import run_training

    monkeypatch.setenv("TUNELAB_CACHE", str(fresh_cache(tmp_path / "cache")))

    class MarkerLoss(torch.nn.Module):  # heldout_loss's default loss module, answering MARKER per token
        def __init__(self, model, chunk_tokens):
            super().__init__()

        def forward(self, batch):
            return torch.tensor(MARKER * batch.num_targets)

    monkeypatch.setattr(heldout, "AssistantLoss", MarkerLoss)
    data = conversations_file(tmp_path, n=24)
    config = {
        "model": {"name": str(small_llama_folder(tmp_path))},
        "data": {"sources": [{"path": str(data)}], "val_fraction": 0.25, "dedup": {"near": False},
                 "output_dir": str(tmp_path / "prepared")},
        "lora": {"r": 2, "alpha": 4},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "warmup_steps": 0,
                  "max_seq_len": 64, "save_steps": 2, "eval_steps": 2, "precision": "fp32", "threads": 1},
        "eval": {"max_val_rows": 3, "batch_size": 2},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(tmp_path / "c.yaml")
    run = tmp_path / "run"

    summary = run_training(cfg, log=lambda *a, **k: None)
    assert summary["final_val_loss"] == MARKER
    assert [json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line] == [MARKER]  # fmt: skip

    report = evaluate_run(run, samples=False)
    assert report["base"]["val_loss"] == report["tuned"]["val_loss"] == MARKER

    card = merge_run(run, tmp_path / "merged", val_limit=3)
    assert card["base"] == card["tuned"] == MARKER

    spec = SweepSpec(base=str(tmp_path / "c.yaml"), heldout=HeldoutSpec(
        general=[SourceConfig(path=str(data))], travel=[SourceConfig(path=str(data))], max_rows=3))  # fmt: skip
    for figures in heldout_losses(run, cfg, spec, cfg).values():
        assert figures["base"] == figures["tuned"] == MARKER

    checks = {c.name: c for c in adapter_checks(run, run, PromoteConfig(max_val_rows=3), None, log=lambda *a: None)}
    assert checks["val_loss"].current == checks["val_loss"].candidate == MARKER
