"""The precision decision table, with the hardware given as inputs (independent of the CPU running the test)."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.precision import Precision, choose_precision

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}

# (requested, CPU flags, CUDA capability) -> chosen precision name. Every requested value on every CPU kind and
# every GPU generation; on CUDA the GPU decides, whatever the host CPU has.
TABLE = [
    ("auto", AVX2, None, "fp32"),
    ("auto", AVX512, None, "fp32"),
    ("auto", AVX512_BF16, None, "bf16"),
    ("auto", AMX, None, "bf16"),
    ("fp32", AVX2, None, "fp32"),
    ("fp32", AVX512, None, "fp32"),
    ("fp32", AVX512_BF16, None, "fp32"),
    ("fp32", AMX, None, "fp32"),
    ("bf16", AVX2, None, "bf16"),  # honoured, with a warning
    ("bf16", AVX512, None, "bf16"),
    ("bf16", AVX512_BF16, None, "bf16"),
    ("bf16", AMX, None, "bf16"),
    ("fp16", AVX2, None, "fp16"),
    ("fp16", AVX512, None, "fp16"),
    ("fp16", AVX512_BF16, None, "fp16"),
    ("fp16", AMX, None, "fp16"),
    ("auto", AVX2, (7, 5), "fp16"),  # T4: no native bf16 -> fp16 + loss scaling
    ("auto", AVX2, (8, 0), "bf16"),  # A100
    ("auto", AVX2, (9, 0), "bf16"),  # H100
    ("auto", AMX, (7, 5), "fp16"),
    ("fp32", AVX2, (7, 5), "fp32"),
    ("fp32", AVX2, (8, 0), "fp32"),
    ("fp32", AVX2, (9, 0), "fp32"),
    ("bf16", AVX2, (7, 5), "bf16"),  # honoured, with a warning
    ("bf16", AVX2, (8, 0), "bf16"),
    ("bf16", AVX2, (9, 0), "bf16"),
    ("fp16", AVX2, (7, 5), "fp16"),
    ("fp16", AVX2, (8, 0), "fp16"),
    ("fp16", AVX2, (9, 0), "fp16"),
]


@pytest.mark.parametrize("requested,flags,capability,expected", TABLE)
def test_decision_table(requested, flags, capability, expected):
    chosen = choose_precision(requested, flags, capability)
    assert chosen.name == expected
    assert chosen.reason  # the run always says why
    assert chosen.needs_loss_scaling == (expected == "fp16")
    assert chosen.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[expected]


def test_reasons_name_the_hardware_and_warn_when_not_native():
    t4 = choose_precision("auto", AVX2, (7, 5), "Tesla T4")
    assert "Tesla T4" in t4.reason and "7.5" in t4.reason and "loss scaling" in t4.reason
    assert "avx512_bf16" in choose_precision("auto", AVX512_BF16, None).reason
    assert "amx_bf16" in choose_precision("auto", AMX, None).reason
    assert "warning" in choose_precision("bf16", AVX512, None).reason
    assert "warning" in choose_precision("bf16", AVX2, (7, 5)).reason
    assert "warning" not in choose_precision("bf16", AVX2, (8, 0)).reason
    assert "warning" not in choose_precision("bf16", AMX, None).reason


def test_grad_scaler_only_scales_for_fp16():
    loss = torch.tensor(2.0)
    assert Precision("fp16", "t").grad_scaler("cpu").scale(loss).item() > 2.0
    for name in ("fp32", "bf16"):
        assert Precision(name, "t").grad_scaler("cpu").scale(loss).item() == 2.0


def test_precision_field_accepts_fp16():
    from tunelab.config import load_config

    assert load_config(None, ["train.precision=fp16"]).train.precision == "fp16"


def _fp16_run(run_dir, max_steps=6, save_steps=6, resume=False):
    """The real loop in fp16 (GradScaler on; CPU autocast supports fp16) on a one-layer Llama with LoRA, small
    enough that a CPU without native fp16 kernels (~0.6 GFLOP/s) runs a step in a fraction of a second."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.config import EvalConfig, TrainConfig
    from tunelab.data.masking import IGNORE_INDEX as IGNORE
    from tunelab.train.loop import train_lora
    from tunelab.train.packed_attention import register
    from tunelab.train.recipe import layer_surgery

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).to(torch.float16)  # frozen base stored in the compute dtype, as the recipe does
    model.config._attn_implementation = register()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(10):
        prompt = torch.randint(3, 32, (6,), generator=g).tolist()
        answer = [(t * 7) % 30 + 33 for t in prompt]
        rows.append((prompt + answer, [IGNORE] * 6 + answer))
    cfg = TrainConfig(
        output_dir=str(run_dir),
        max_steps=max_steps,
        batch_size=4,
        lr=2e-2,
        warmup_steps=0,
        save_steps=save_steps,
        eval_steps=max_steps,
    )
    layer_surgery(model, cfg)  # as the recipe prepares the model
    result = train_lora(
        model,
        rows[:8],
        rows[8:],
        cfg,
        EvalConfig(batch_size=4),
        run_dir,
        Precision("fp16", "test"),
        0,
        Accelerator(cpu=True),
        resume=resume,
        log=lambda *_: None,
    )
    return result, model


def test_fp16_training_loop_scales_the_loss_and_learns(tmp_path):
    """fp16 through the real loop: finite, learning, fp32 adapter."""
    result, model = _fp16_run(tmp_path)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    adapter = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in adapter)


def test_fp16_resume_continues_the_loss_scale(tmp_path):
    """A resumed fp16 run goes on with the checkpoint's loss scale and growth count (a T4 session that died and
    resumed), so it ends exactly where the uninterrupted run does."""
    import json
    import shutil

    from tunelab.train.checkpoint import list_checkpoints

    def final_state(run_dir):
        return json.loads((list_checkpoints(run_dir)[0] / "state.json").read_text())

    _, straight = _fp16_run(tmp_path / "straight", max_steps=4, save_steps=2)
    _fp16_run(tmp_path / "resumed", max_steps=4, save_steps=2)
    shutil.rmtree(list_checkpoints(tmp_path / "resumed")[0])  # killed after step 2: step 4 was never written
    result, resumed = _fp16_run(tmp_path / "resumed", max_steps=4, save_steps=2, resume=True)
    assert result.resumed_from == 2
    scale = final_state(tmp_path / "straight")["grad_scaler"]
    assert scale["scale"] > 1 and scale["_growth_tracker"] > 0  # a real fp16 scaler state, not the disabled {}
    assert final_state(tmp_path / "resumed")["grad_scaler"] == scale
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        if "lora_" in name:
            assert torch.equal(a, b), name
