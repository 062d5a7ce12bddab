"""QLoRA on a CPU: a 4-bit NF4 base (bitsandbytes, double quantisation) trains through tunelab's fast path, and
adamw_8bit steps and resumes exactly.

References are independent of tunelab: plain PEFT + bitsandbytes with `labels` on padded rows (the same quantised
model), torch's own AdamW, and an uninterrupted optimizer. The model is a tiny random-init Llama with Llama-3.2's
real tokenizer (128,256 tokens) and head shape; its linears are bitsandbytes `Linear4bit` layers.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import labels_loss_and_lora_grads, llama32_shaped_folder
from tunelab.config import ModelConfig, TrainConfig
from tunelab.data.masking import IGNORE_INDEX as IGNORE
from tunelab.train.architectures import plan_for, use_plan
from tunelab.train.batching import pack
from tunelab.train.loss import masked_lm_loss


@pytest.fixture(scope="module")
def llama32_folder(tmp_path_factory):
    return llama32_shaped_folder(tmp_path_factory.mktemp("qlora") / "llama32-tiny", hidden_size=64)


def qlora_model(folder, **model_keys):
    """tunelab's own QLoRA build: load_model (4-bit NF4, double quant, fp32 compute) + PEFT over it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tunelab.models import load_model

    torch.manual_seed(0)
    cfg = ModelConfig(name=str(folder), load_in_4bit=True, **model_keys)
    base = prepare_model_for_kbit_training(load_model(cfg, dtype=torch.float32), use_gradient_checkpointing=False)
    base.config._attn_implementation = "eager"  # the most literal form of the model's own attention
    # init_lora_weights=False: B is non-zero too, so every LoRA weight has a gradient.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, lora).train()


def examples(seed=0, lengths=(9, 17, 12)):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1000, 120000, (n,), generator=g).tolist()
        rows.append((ids, [IGNORE] * (n // 3) + ids[n // 3 :]))  # the last two thirds are "assistant"
    return rows


def lora_grads(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}
    assert grads and all(g is not None for g in grads.values())
    return grads


def test_packed_fast_path_on_a_4bit_base_equals_peft_and_bitsandbytes_with_labels(llama32_folder):
    from bitsandbytes.nn import Linear4bit

    from tunelab.train.fused_layers import fuse_decoder_layers

    model = qlora_model(llama32_folder)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, Linear4bit) and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quant
    rows = examples()
    ref_loss, ref_grads = labels_loss_and_lora_grads(model, rows)

    lines = []
    assert use_plan(model, packing=True, log=lines.append)  # the fast path, packed
    assert "fast path (packed attention" in lines[0] and "4-bit nf4 base" in lines[0] and "no fused LoRA" in lines[0]
    fused = fuse_decoder_layers(model)  # what the loop does: norms and SwiGLU fused, LoRA on Linear4bit left to PEFT
    assert fused["lora_linears"] == 0 and fused["rmsnorms"] > 0
    model.zero_grad()
    loss_sum, n = masked_lm_loss(model, pack(rows), chunk_tokens=7)
    (loss_sum / n).backward()
    grads = lora_grads(model)

    torch.testing.assert_close(loss_sum.detach() / n, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert ref.norm() > 0, name
        torch.testing.assert_close(grads[name], ref, rtol=0, atol=1e-4 * float(ref.norm()) + 1e-7, msg=name)


def test_an_evaluation_leaves_the_4bit_base_and_its_gradients_as_they_were(llama32_folder):
    """A held-out evaluation (eval mode, no gradients) between training steps changes nothing: bitsandbytes' CPU
    inference repacking (bf16 block scales, a matmul without backward) stays off for tunelab's 4-bit models."""
    from tunelab.train.heldout import heldout_loss

    model = qlora_model(llama32_folder)
    rows = examples()
    before_loss, before_grads = labels_loss_and_lora_grads(model, rows)
    heldout_loss(model, rows, batch_size=3)  # what the trainer does every eval_steps
    model.train()
    after_loss, after_grads = labels_loss_and_lora_grads(model, rows)
    assert torch.equal(after_loss, before_loss)
    for name, grad in before_grads.items():
        assert torch.equal(after_grads[name], grad), name


def test_the_4bit_comparison_can_fail(llama32_folder):
    """The comparison above means something: the same adapter over the unquantised base gives another loss."""
    from peft import LoraConfig, get_peft_model

    from tunelab.models import load_model

    quantised = qlora_model(llama32_folder)
    rows = examples()
    loss_4bit, _ = labels_loss_and_lora_grads(quantised, rows)
    torch.manual_seed(0)
    plain = get_peft_model(
        load_model(ModelConfig(name=str(llama32_folder)), dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    plain.config._attn_implementation = "eager"
    loss_fp32, _ = labels_loss_and_lora_grads(plain, rows)
    assert abs(float(loss_4bit) - float(loss_fp32)) > 1e-4


def test_model_keys_choose_the_4bit_type_and_double_quant(llama32_folder):
    model = qlora_model(llama32_folder, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)
    state = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.quant_state
    assert state.quant_type == "fp4" and not state.nested
    assert "4-bit fp4 base" in (plan_for(model).quantized_base or "")


@pytest.mark.parametrize("precision_name", ["bf16", "fp32"])
def test_a_4bit_run_keeps_the_unquantised_frozen_weights_in_its_compute_dtype(llama32_folder, precision_name):
    """tunelab's QLoRA build (build_lora_model): the embedding, LM head and norms stay frozen in the run's compute
    dtype, exactly as plain transformers loads them in it (a bf16 run's embedding is not upcast to fp32, PEFT's
    prepare_model_for_kbit_training would), the LoRA weights alone train, in fp32; with gradient checkpointing
    on, one packed step gives every LoRA B a gradient."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    from tunelab.config import config_from_dict
    from tunelab.train.precision import Precision
    from tunelab.train.recipe import build_lora_model

    precision = Precision(precision_name, "test")
    cfg = config_from_dict(
        {
            "model": {"name": str(llama32_folder), "load_in_4bit": True},
            "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
            "train": {"gradient_checkpointing": True, "precision": precision_name},
        }
    )
    model = build_lora_model(cfg, precision)
    reference = dict(AutoModelForCausalLM.from_pretrained(llama32_folder, dtype=precision.dtype).named_parameters())
    base = model.base_model.model
    assert sum(isinstance(m, Linear4bit) for m in base.modules()) == 2 * 7
    unquantised = {name: p for name, p in base.named_parameters() if "lora_" not in name and ".base_layer." not in name}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= unquantised.keys()
    for name, param in unquantised.items():
        assert param.dtype == reference[name].dtype == precision.dtype, name
        assert torch.equal(param, reference[name]) and not param.requires_grad, name
    trainable = {name: p for name, p in base.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and p.dtype == torch.float32 for name, p in trainable.items())

    with precision.autocast("cpu"):
        loss_sum, n = masked_lm_loss(model, pack(examples()), chunk_tokens=7)
    (loss_sum / n).backward()
    lora_b = {name: p.grad for name, p in trainable.items() if "lora_B" in name}
    assert lora_b and all(g is not None and bool(torch.isfinite(g).all()) and g.norm() > 0 for g in lora_b.values())


# ------------------------------------------------------------------------------------------------ adamw_8bit
def adapter_like_params(seed=0):
    """Two LoRA-shaped weights with >= 4096 values each (bitsandbytes keeps smaller tensors' states in 32 bits)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(16, 512, generator=g)),
        torch.nn.Parameter(torch.randn(512, 16, generator=g)),
    ]


def gradients(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def run_steps(optimizer, scheduler, params, steps):
    for step in steps:
        for p, grad in zip(params, gradients(step, params)):
            p.grad = grad
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def test_adamw_8bit_steps_like_adamw_with_uint8_states_and_resumes_exactly(tmp_path):
    from types import SimpleNamespace

    from tunelab.train.checkpoint import save_checkpoint
    from tunelab.train.loop import build_optimizer, build_scheduler

    cfg = TrainConfig(optimizer="adamw_8bit", lr=1e-2, weight_decay=0.01, warmup_steps=1, max_steps=8)
    as_model = lambda params: SimpleNamespace(parameters=lambda: iter(params))  # noqa: E731

    # Three steps against torch's AdamW (same hyper-parameters): the 8-bit states round, they do not change the maths.
    params, reference, start = adapter_like_params(), adapter_like_params(), adapter_like_params()
    optimizer = build_optimizer(as_model(params), cfg)
    torch_adamw = torch.optim.AdamW(reference, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(3):
        for p, q, grad in zip(params, reference, gradients(step, params)):
            p.grad, q.grad = grad, grad.clone()
        optimizer.step()
        torch_adamw.step()
    states = optimizer.state[params[0]]
    assert states["state1"].dtype == torch.uint8 and states["state2"].dtype == torch.uint8
    with torch.no_grad():
        for p, q, p0 in zip(params, reference, start):
            assert float((p - q).norm() / (q - p0).norm()) < 0.03  # within 3 % of AdamW's own update (measured 1 %)

    # Resume: 4 steps, checkpoint (tunelab's own files), reload into a fresh optimizer, 4 more == 8 straight.
    straight = adapter_like_params()
    straight_opt = build_optimizer(as_model(straight), cfg)
    run_steps(straight_opt, build_scheduler(straight_opt, cfg), straight, range(8))

    first = adapter_like_params()
    opt = build_optimizer(as_model(first), cfg)
    sched = build_scheduler(opt, cfg)
    run_steps(opt, sched, first, range(4))
    saver = SimpleNamespace(save_pretrained=lambda folder: folder.mkdir())  # the adapter is not what is tested here
    folder = save_checkpoint(tmp_path, 4, saver, opt, sched, {}, keep=1)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed_opt = build_optimizer(as_model(resumed), cfg)
    resumed_sched = build_scheduler(resumed_opt, cfg)
    resumed_opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    resumed_sched.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    assert resumed_opt.state[resumed[0]]["state1"].dtype == torch.uint8
    run_steps(resumed_opt, resumed_sched, resumed, range(4, 8))
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
        for key in ("step", "state1", "state2", "absmax1", "absmax2"):
            got, expected = resumed_opt.state[p][key], straight_opt.state[q][key]
            assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected)), key
