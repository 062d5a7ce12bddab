"""The training loop on a tiny random Llama: it learns, checkpoints atomically, and resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from tests.helpers import build_tiny_llama, fresh_cache
from tunelab.config import EvalConfig, TrainConfig
from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.checkpoint import latest_valid_checkpoint, list_checkpoints
from tunelab.train.loop import train_lora
from tunelab.train.packed_attention import register
from tunelab.train.precision import Precision
from tunelab.train.recipe import layer_surgery

FP32 = Precision("fp32", "test")


def make_rows(n=24, seed=0):
    """Conversations whose assistant half is a fixed function of the user half: learnable."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        prompt = torch.randint(3, 128, (length,), generator=g).tolist()
        answer = [(t * 7) % 120 + 130 for t in prompt]
        rows.append((prompt + answer, [IGNORE_INDEX] * length + answer))
    return rows


def tiny_lora_model(packing=True):
    model = build_tiny_llama()
    if packing:
        model.config._attn_implementation = register()
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def run(tmp_path, max_steps, resume=True, packing=True, model=None, **overrides):
    """The loop on a model prepared as the recipe prepares it (`layer_surgery`: fused layers by default)."""
    settings = dict(batch_size=2, grad_accum=2, lr=5e-3, warmup_steps=1, save_steps=2, save_total_limit=2, eval_steps=4)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=max_steps, packing=packing, **{**settings, **overrides})
    rows = make_rows()
    model = model if model is not None else tiny_lora_model(packing)
    layer_surgery(model, cfg)
    return train_lora(
        model,
        rows[:20],
        rows[20:],
        cfg,
        EvalConfig(batch_size=4),
        tmp_path,
        FP32,
        0,
        Accelerator(cpu=True),
        resume=resume,
        log=lambda *_: None,
    ), cfg


def adapter_weights(run_dir):
    from safetensors.torch import load_file

    newest = list_checkpoints(run_dir)[0]
    return load_file(str(newest / "adapter" / "adapter_model.safetensors"))


def test_loss_goes_down(tmp_path):
    result, _ = run(tmp_path, max_steps=12)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0]
    assert result.final_val_loss is not None and result.tokens > 0


def test_resume_is_exact_and_metrics_have_each_step_once(tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    run(straight_dir, max_steps=8)
    run(resumed_dir, max_steps=8, save_total_limit=4)
    # As if killed right after step 5: the checkpoints of steps 6 and 8 were never written.
    for folder in list_checkpoints(resumed_dir)[:2]:
        shutil.rmtree(folder)
    result, _ = run(resumed_dir, max_steps=8)
    assert result.resumed_from == 4
    a, b = adapter_weights(straight_dir), adapter_weights(resumed_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.max(torch.abs(a[key] - b[key])).item() <= 1e-6, key
    steps = [
        json.loads(line)["step"]
        for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, 9))


def test_keeps_only_the_newest_checkpoints(tmp_path):
    run(tmp_path, max_steps=8)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000008", "step-000006"]


def test_corrupt_newest_checkpoint_is_skipped(tmp_path):
    run(tmp_path, max_steps=6)
    newest = list_checkpoints(tmp_path)[0]
    (newest / "optimizer.pt").write_bytes(b"garbage")
    warnings = []
    found = latest_valid_checkpoint(tmp_path, warn=warnings.append)
    assert found.name == "step-000004"
    assert "step-000006" in warnings[0] and "optimizer.pt" in warnings[0]


def test_same_seed_gives_identical_adapter_bytes(tmp_path):
    run(tmp_path / "a", max_steps=4)
    run(tmp_path / "b", max_steps=4)
    file = lambda d: (list_checkpoints(d)[0] / "adapter" / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert file(tmp_path / "a") == file(tmp_path / "b")


@pytest.mark.parametrize("packing", [True, False])
def test_grad_accumulation_matches_one_big_batch(tmp_path, packing):
    """batch 2 x accum 2 gives the same adapter as batch 4 x accum 1 (loss normalised per step)."""
    run(tmp_path / "accum", max_steps=2, packing=packing)
    cfg_big = dict(batch_size=4, grad_accum=1)
    rows = make_rows()
    cfg = TrainConfig(
        output_dir=str(tmp_path / "big"),
        max_steps=2,
        lr=5e-3,
        warmup_steps=1,
        save_steps=2,
        eval_steps=4,
        packing=packing,
        **cfg_big,
    )
    train_lora(
        tiny_lora_model(packing),
        rows[:20],
        rows[20:],
        cfg,
        EvalConfig(batch_size=4),
        tmp_path / "big",
        FP32,
        0,
        Accelerator(cpu=True),
        log=lambda *_: None,
    )
    a, b = adapter_weights(tmp_path / "accum"), adapter_weights(tmp_path / "big")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_every_step_logs_mfu_from_the_hand_count_of_its_conversations(tmp_path, monkeypatch):
    from tunelab.train import matmul_peak
    from tunelab.train.batching import step_indices
    from tunelab.train.flops import shape_of, training_flops

    monkeypatch.setenv("TUNELAB_CACHE", str(fresh_cache(tmp_path / "cache")))
    monkeypatch.setattr(matmul_peak, "measure", lambda dtype, threads, device: {"gflops": 2.0, "shapes": {}})
    result, cfg = run(tmp_path / "run", max_steps=3)
    rows = make_rows()[:20]
    shape = shape_of(tiny_lora_model())
    expected = 0.0
    for step in range(3):
        indices = step_indices(step, 4, len(rows), seed=cfg.seed)
        targets = sum(sum(1 for x in rows[i][1][1:] if x != IGNORE_INDEX) for i in indices)
        expected += training_flops(shape, [len(rows[i][0]) for i in indices], targets)
    assert result.flops_this_session == pytest.approx(expected)
    assert result.matmul_peak_gflops == 2.0
    assert result.mfu == pytest.approx(expected / result.seconds_this_session / 2e9)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "mfu" in r] == [1, 2, 3] and all(r["mfu"] > 0 for r in logged if "mfu" in r)


def test_releasing_memory_changes_no_numbers(tmp_path):
    """`train.release_memory` only changes where freed memory goes: the adapter is the same to the byte."""
    run(tmp_path / "kept", max_steps=4)
    run(tmp_path / "released", max_steps=4, release_memory=True)
    file = lambda d: (list_checkpoints(d)[0] / "adapter" / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert file(tmp_path / "kept") == file(tmp_path / "released")


def lora_forwards_patched(model) -> list[bool]:
    """For each PEFT LoRA Linear: whether its forward was replaced on the instance (fused_layers.fuse_lora_linears)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [("forward" in vars(m)) for m in model.modules() if isinstance(m, LoraLinear)]


def test_fused_layers_off_keeps_peft_modules_and_trains_to_the_same_losses(tmp_path):
    """`train.fused_layers: false` leaves PEFT's LoRA modules (and transformers' norms and MLPs) as built, and four
    optimizer steps end where the fused layers (LoRA, RMSNorm, SwiGLU) end: the same losses and adapter."""
    fused_model, plain_model = tiny_lora_model(), tiny_lora_model()
    fused, _ = run(tmp_path / "fused", max_steps=4, model=fused_model)
    plain, _ = run(tmp_path / "peft", max_steps=4, model=plain_model, fused_layers=False)
    assert set(lora_forwards_patched(fused_model)) == {True} and len(lora_forwards_patched(fused_model)) == 14
    assert set(lora_forwards_patched(plain_model)) == {False}
    norms_and_mlps = [m for m in plain_model.modules() if type(m).__name__ in ("LlamaRMSNorm", "LlamaMLP")]
    assert norms_and_mlps and not any("forward" in vars(m) for m in norms_and_mlps)
    losses = lambda result: [h["loss"] for h in result.history if "loss" in h]  # noqa: E731
    assert len(losses(fused)) == 4
    torch.testing.assert_close(losses(fused), losses(plain), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.final_val_loss, plain.final_val_loss, rtol=1e-5, atol=1e-6)
    a, b = adapter_weights(tmp_path / "fused"), adapter_weights(tmp_path / "peft")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_compile_takes_precedence_over_fused_layers():
    """`train.compile` leaves the fused functions out: inductor fuses the compiled layers itself."""
    model = tiny_lora_model()
    assert layer_surgery(model, TrainConfig(compile=True, fused_layers=True)) == "compiled"
    assert set(lora_forwards_patched(model)) == {False}
