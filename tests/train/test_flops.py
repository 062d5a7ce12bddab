"""The hand-written FLOP count (tunelab.train.flops) against a count by hand and against torch's FlopCounterMode."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from tunelab.train.flops import mfu, model_shape, training_flops


def tiny_config(**overrides) -> LlamaConfig:
    sizes = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**sizes, **overrides})


def test_count_matches_a_hand_count_for_a_tiny_llama():
    shape = model_shape(tiny_config(), lora_rank=2, lora_targets="all-linear")
    # Per layer (in, out): q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8 -> 576 weights.
    # Base, per token: layer 1: 2*576 forward + 2*576 input gradient = 2304; layer 0: q/k/v (128 weights) forward
    # only = 256, the other 448 weights forward + backward = 1792 -> 2048. Total 4352.
    # LoRA r=2, per token: sum of (in + out) over the 7 linears = 128. Layer 1: forward 4*128 = 512, backward
    # 8*128 = 1024. Layer 0: forward 512; backward without dx for q (8*8 + 4*8 = 96), k (8*4 + 4*8 = 64),
    # v (64), with dx for o/gate/up/down (8*(16+24+24+24) = 704) -> 928. Total 1536 + 1440 = 2976.
    # 5 tokens x (4352 + 2976) = 36640.
    # Attention, causal: pairs 3*4/2 + 2*3/2 = 9; 12 * 9 pairs * head_dim 4 * 2 heads * 2 layers = 1728.
    # LM head on 3 target tokens: 4 * 8 * 10 * 3 = 960.
    assert training_flops(shape, [3, 2], head_tokens=3) == 36640 + 1728 + 960


def test_packed_attention_is_counted_per_conversation():
    shape = model_shape(tiny_config(), lora_rank=2)
    one_row = training_flops(shape, [5], head_tokens=0)
    two_conversations = training_flops(shape, [3, 2], head_tokens=0)
    assert one_row - two_conversations == 12 * (15 - 9) * 4 * 2 * 2  # 15 vs 6 + 3 causal pairs


def test_lora_targets_and_rank_are_what_is_counted():
    config = tiny_config()
    no_lora = training_flops(model_shape(config, lora_rank=0), [4], head_tokens=0)
    q_only = training_flops(model_shape(config, lora_rank=2, lora_targets=["q_proj"]), [4], head_tokens=0)
    # q_proj (8 -> 8), r 2, per token: layer 1: 4*16 forward + 8*16 backward; layer 0: 64 + (8*8 + 4*8) = 160.
    assert q_only - no_lora == 4 * (64 + 128 + 160)


def test_count_agrees_with_torch_flop_counter_on_forward_and_backward():
    """A PEFT-LoRA tiny Llama, eager attention (FlopCounterMode counts its bmm's in full, hence causal=False),
    logits on every position (as HF's forward computes them). The counts agree exactly (measured: 10,788,864 both);
    the tolerance, 1e-6 relative, only absorbs float rounding."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaForCausalLM

    config = tiny_config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    n = 24
    input_ids = torch.randint(0, 128, (1, n))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    measured = counter.get_total_flops()
    counted = training_flops(model_shape(config, lora_rank=4), [n], head_tokens=n, causal=False)
    assert counted == pytest.approx(measured, rel=1e-6)


def test_mfu_is_achieved_rate_over_peak():
    assert mfu(6e9, 2.0, 1e10) == pytest.approx(0.3)
    assert mfu(1.0, 0.0, 1e10) == 0.0


def test_matmul_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    from tunelab.train import matmul_peak as peak

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(peak, "_load_average", lambda: 1.0)
    calls = []
    monkeypatch.setattr(
        peak, "measure", lambda dtype, threads, device: calls.append((dtype, threads)) or {"gflops": 12.5, "shapes": {}}
    )
    first = peak.matmul_peak(torch.float32, threads=1)
    again = peak.matmul_peak(torch.float32, threads=1)
    other_dtype = peak.matmul_peak(torch.bfloat16, threads=1)
    assert first == again == other_dtype == {"gflops": 12.5, "shapes": {}, "load_avg": 1.0}
    assert calls == [(torch.float32, 1), (torch.bfloat16, 1)]  # one measurement per dtype, then the cache
    assert len(json.loads((tmp_path / "matmul_peak.json").read_text())) == 2


def test_matmul_peak_measured_under_load_is_remeasured_when_quieter_and_the_best_is_kept(tmp_path, monkeypatch):
    from tunelab.train import matmul_peak as peak

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    figures = iter([40.0, 120.0, 90.0])
    monkeypatch.setattr(peak, "measure", lambda dtype, threads, device: {"gflops": next(figures), "shapes": {}})
    monkeypatch.setattr(peak, "_load_average", lambda: 15.0)
    assert peak.matmul_peak(torch.float32, threads=2)["gflops"] == 40.0  # busy machine: a depressed figure
    assert peak.matmul_peak(torch.float32, threads=2)["gflops"] == 40.0  # still busy: the cache
    monkeypatch.setattr(peak, "_load_average", lambda: 1.0)
    assert peak.matmul_peak(torch.float32, threads=2)["gflops"] == 120.0  # quieter: measured again
    monkeypatch.setattr(peak, "_load_average", lambda: 0.2)
    assert (
        peak.matmul_peak(torch.float32, threads=2)["gflops"] == 120.0
    )  # a worse new figure never replaces a better one


def test_a_cached_peak_without_its_load_average_is_measured_again(tmp_path, monkeypatch):
    from tunelab.train import matmul_peak as peak

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    key = peak._key(torch.float32, 2, torch.device("cpu"))
    (tmp_path / "matmul_peak.json").write_text(json.dumps({key: {"gflops": 26.0, "shapes": {}}}))  # an older entry
    monkeypatch.setattr(peak, "measure", lambda dtype, threads, device: {"gflops": 150.0, "shapes": {}})
    monkeypatch.setattr(peak, "_load_average", lambda: 3.0)
    assert peak.matmul_peak(torch.float32, threads=2) == {"gflops": 150.0, "shapes": {}, "load_avg": 3.0}
    assert json.loads((tmp_path / "matmul_peak.json").read_text())[key]["load_avg"] == 3.0


def test_matmul_peak_measurement_leaves_out_shapes_that_would_overrun_its_budget():
    """A precision without native kernels (fp16 on a CPU without avx512_fp16 runs at ~0.6 GFLOP/s) must not spend
    minutes on 2048^3 products before training starts: after the probe shape, a shape whose single run would take
    longer than the whole budget at the rate seen so far is not run. With a budget of a microsecond only the probe
    runs (the next shape is 1.4 GFLOP)."""
    from tunelab.train.matmul_peak import SHAPES, measure

    result = measure(torch.float32, threads=1, seconds=1e-6)
    m, k, n = SHAPES[0]
    assert list(result["shapes"]) == [f"{m}x{k}x{n}"] and result["gflops"] == result["shapes"][f"{m}x{k}x{n}"] > 0
