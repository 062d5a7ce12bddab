"""The fused decoder layers give the numbers of the modules they replace: outputs and gradients equal to PEFT's and
transformers' own (LoRA linears, RMSNorm, SwiGLU), alone and in a whole model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.helpers import build_tiny_llama
from tunelab.train.fused_layers import (
    LoraLinearFunction,
    RMSNormFunction,
    SwiGLU,
    fuse_decoder_layers,
    fuse_lora_linears,
    fuse_rmsnorms,
    lean_swiglu,
)


def lora_model(dropout: float = 0.0, seed: int = 0):
    model = get_peft_model(
        build_tiny_llama(seed=seed),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide every mistake in the adapter's path
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def loss_and_adapter_grads(model, ids, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_function_gradients_match_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraLinearFunction.apply(x, weight, bias, a, b, 1.5), (x, a, b))
    reference = x @ weight.T + bias + 1.5 * (x @ a.T) @ b.T
    assert torch.allclose(LoraLinearFunction.apply(x, weight, bias, a, b, 1.5), reference)


def test_fused_model_matches_peft_in_fp32():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    reference, fused = lora_model(), lora_model()
    assert fuse_lora_linears(fused) == 2 * 7  # every adapted linear of both decoder layers
    ref_loss, ref_grads = loss_and_adapter_grads(reference, ids)
    loss, grads = loss_and_adapter_grads(fused, ids)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * 7
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7), name


def test_fused_model_under_bf16_autocast_is_as_close_to_fp32_as_peft():
    """Under autocast both compute in bf16 (the fused path rounds once where PEFT rounds three times), so each is
    compared with the fp32 result and the fused one must be no further from it than PEFT's own."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    exact_loss, exact = loss_and_adapter_grads(lora_model(), ids)
    peft_loss, peft = loss_and_adapter_grads(lora_model(), ids, torch.bfloat16)
    fused_model = lora_model()
    fuse_lora_linears(fused_model)
    fused_loss, fused = loss_and_adapter_grads(fused_model, ids, torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in fused.values())  # gradients land in the adapters' own dtype
    assert abs(fused_loss - exact_loss) <= 2 * abs(peft_loss - exact_loss) + 1e-3

    def error(grads):
        return sum((grads[n].float() - exact[n]).norm() for n in exact) / sum(g.norm() for g in exact.values())

    assert error(fused) <= 1.5 * error(peft) + 1e-3
    assert error(fused) < 0.05


def test_unfusable_layers_and_disabled_adapters_keep_peft_forward():
    assert fuse_lora_linears(lora_model(dropout=0.1)) == 0  # dropout on the adapter input: PEFT's path
    model = lora_model()
    fuse_lora_linears(model)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    base = build_tiny_llama()
    with torch.no_grad():
        with model.disable_adapter():  # a reference pass (DPO) must see the base model, not the adapter
            disabled = model(input_ids=ids).logits
        enabled = model(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    assert torch.allclose(disabled, expected, atol=1e-6)
    assert not torch.allclose(enabled, expected, atol=1e-3)


def test_frozen_input_gets_no_gradient_work():
    """The first layer reads the frozen embedding: no input gradient is asked for, and none is computed. The backward
    does the adapter's three thin matmuls and nothing with the [out, in] base weight: counted by torch's FLOP
    counter against the hand count (2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens, d_in, d_out, r = 4, 5, 3, 2
    x = torch.randn(tokens, d_in)
    a, b = torch.randn(r, d_in, requires_grad=True), torch.randn(d_out, r, requires_grad=True)
    loss = LoraLinearFunction.apply(x, torch.randn(d_out, d_in), None, a, b, 2.0).sum()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    grad_xa, grad_a, grad_b = tokens * d_out * r, r * tokens * d_in, d_out * tokens * r
    assert counter.get_total_flops() == 2 * (grad_xa + grad_a + grad_b)
    assert a.grad is not None and b.grad is not None and x.grad is None


@pytest.mark.parametrize("patched", [False, True])
def test_lora_layers_stay_peft_modules(patched, tmp_path):
    """Saving, merging and loading see PEFT's own modules and parameters either way: after a training step the
    fused model saves the adapter plain PEFT saves, that adapter loads into plain PEFT with the same outputs, and
    merging (in place, and into a plain transformers model) gives plain PEFT's outputs."""
    from peft import PeftModel
    from safetensors.torch import load_file

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    reference, model = lora_model(), lora_model()
    if patched:
        assert fuse_lora_linears(model) == 2 * 7
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == sorted(n for n, p in reference.named_parameters() if p.requires_grad)
    for m in (reference, model):  # one step, so what is saved is what the (fused) backward trained
        loss_and_adapter_grads(m, ids)
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5).step()
        m.eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert not torch.allclose(expected, build_tiny_llama()(input_ids=ids).logits, atol=1e-3)

        reference.save_pretrained(tmp_path / "plain")
        model.save_pretrained(tmp_path / "fused")
        plain, fused = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "fused"))
        assert plain.keys() == fused.keys() and len(plain) == 2 * 2 * 7
        for key in plain:
            torch.testing.assert_close(fused[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)

        loaded = PeftModel.from_pretrained(build_tiny_llama(), tmp_path / "fused")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_swiglu_matches_autograd():
    torch.manual_seed(0)
    gate, up = (
        torch.randn(5, 7, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 7, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))


def test_lean_swiglu_keeps_model_outputs_and_gradients():
    ids = torch.randint(0, 256, (1, 12))
    grads = []
    for patch in (False, True):
        model = build_tiny_llama()
        if patch:
            assert lean_swiglu(model) == 2
        assert all(("forward" in vars(m)) == patch for m in model.modules() if type(m).__name__ == "LlamaMLP")
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_rmsnorm_function_matches_finite_differences_and_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x, weight))
    norm = LlamaRMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(weight)
    assert torch.allclose(RMSNormFunction.apply(x, weight, 1e-5), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_llama_module_in_its_dtype(dtype):
    """In bf16 both take fp32 statistics and round the normalised input once: the same bits forward, and input
    gradients within bf16 rounding of each other."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 10, 64, dtype=dtype)
    grad = torch.randn(3, 10, 64, dtype=dtype)
    outputs, grads = [], []
    for fused in (False, True):
        xi = x.clone().requires_grad_()
        y = RMSNormFunction.apply(xi, norm.weight, norm.variance_epsilon) if fused else norm(xi)
        y.backward(grad)
        outputs.append(y)
        grads.append(xi.grad)
    assert outputs[1].dtype == outputs[0].dtype and torch.equal(outputs[1], outputs[0])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(grads[1].float(), grads[0].float(), rtol=tolerance, atol=tolerance)


def test_whole_fused_model_matches_unfused_and_skips_other_norms():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    reference, fused = lora_model(), lora_model()
    counts = fuse_decoder_layers(fused)
    assert counts == {"lora_linears": 14, "rmsnorms": 2 * 2 + 1, "swiglu_mlps": 2}
    ref_loss, ref_grads = loss_and_adapter_grads(reference, ids)
    loss, grads = loss_and_adapter_grads(fused, ids)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7), name

    class GemmaLikeNorm(torch.nn.Module):  # another formula (1 + weight): must keep its own forward
        variance_epsilon = 1e-6

    assert fuse_rmsnorms(torch.nn.Sequential(GemmaLikeNorm())) == 0
