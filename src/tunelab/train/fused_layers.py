"""Hand-written autograd functions for the decoder's layers: PEFT's and transformers' numbers, fewer passes.

On a CPU the element-wise work around the matmuls is a large part of a LoRA step, and autograd runs it as many
small nodes that each read and write a whole activation and keep one for the backward. Each function here computes
what the module computes, keeps less, and writes its backward by hand; `fuse_decoder_layers` routes a model's
modules through them. Training uses them when `train.fused_layers` is on (the default) and `train.compile` is off
(inductor fuses on its own): the recipe decides (`recipe.layer_surgery`). Every function is tested equal to the
module it replaces (tests/train/test_fused_layers.py). What they buy on SmolLM2-135M, 2-core AVX-512 CPU
(docs/benchmarks.md, round four): ~12 % (fp32) / ~10 % (bf16) lower peak RSS; speed within +-2-3 % of the unfused
step: in isolation each is 20-50 % faster than the modules' own, but the step is the matmuls'.

- LoRA linear (`LoraLinearFunction`). PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate
  nodes: besides the base matmul and the two thin adapter matmuls it multiplies the adapter output by `scaling`
  (a pass over [tokens, out]), adds it (another), and in the backward scales the incoming gradient and adds the two
  input gradients (two more); in isolation that made LoRA cost ~40 % on top of SmolLM2's frozen matmuls. Here the
  adapter's output is accumulated into the base output by the matmul itself (`addmm_` with alpha = scaling), and
  likewise its input gradient; the scaling is applied to the [tokens, r] intermediate. Saved: the input and the
  [tokens, r] intermediate, as PEFT's graph saves. Only the plain case is fused: one active adapter (no DoRA, no
  adapter bias, no dropout) on a `torch.nn.Linear` whose weight is frozen. Anything else (quantised bases,
  dropout > 0, adapters disabled for a reference pass, merged weights) runs PEFT's own forward, decided per call.
- RMSNorm (`RMSNormFunction`), Llama's: fp32 statistics, `weight * normalised.to(input dtype)`. Autograd keeps an
  fp32 copy of the input and the normalised activation and runs ~8 backward nodes; this keeps the input and one
  number per token.
- SwiGLU (`SwiGLU`): `silu(gate) * up` keeping only gate and up (autograd would also keep silu(gate)): one
  [tokens, intermediate] activation per layer less; recomputing silu is cheap.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class LoraLinearFunction(torch.autograd.Function):
    """y = x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T, with weight and bias frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float):
        # Autocast would cast each operand again inside; cast once to the dtype it would compute in, then run plain.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            weight, lora_a, lora_b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            y = F.linear(x2, weight, None if bias is None else bias.to(dtype))
            xa = x2 @ lora_a.T
            y.addmm_(xa, lora_b.T, alpha=scale)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scale = scale
        ctx.x_meta = (x.shape, x.dtype)
        ctx.param_dtypes = (ctx.needs_input_grad[3] and lora_a.dtype, ctx.needs_input_grad[4] and lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        grad_xa = (g @ lora_b).mul_(ctx.scale)  # [tokens, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_a = grad_xa.T @ x2
        if ctx.needs_input_grad[4]:
            grad_b = (g.T @ xa).mul_(ctx.scale)
        if ctx.needs_input_grad[0]:
            shape, dtype = ctx.x_meta
            grad_x = (g @ weight).addmm_(grad_xa, lora_a).view(shape).to(dtype)
        a_dtype, b_dtype = ctx.param_dtypes
        return (
            grad_x,
            None,
            None,
            grad_a if grad_a is None else grad_a.to(a_dtype),
            grad_b if grad_b is None else grad_b.to(b_dtype),
            None,
        )


def fusable(layer) -> str | None:
    """The name of the adapter `layer` (a PEFT LoRA layer) can run fused right now, or None (PEFT's forward)."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    base = layer.base_layer
    if (
        name not in layer.lora_A
        or type(base) is not torch.nn.Linear  # quantised (bnb) bases and others keep PEFT's path
        or base.weight.requires_grad
        or (base.bias is not None and base.bias.requires_grad)
        or getattr(layer, "fan_in_fan_out", False)
        or layer.use_dora.get(name, False)
        or not isinstance(layer.lora_dropout[name], torch.nn.Identity)
        or layer.lora_B[name].bias is not None
    ):
        return None
    return name


def fuse_lora_linears(model) -> int:
    """Route every plain PEFT LoRA Linear of `model` through LoraLinearFunction; returns how many were patched."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    def forward(self, x, *args, **kwargs):
        name = fusable(self) if not args and not kwargs else None  # extra arguments (mixed adapter batches): PEFT's
        if name is None:
            return type(self).forward(self, x, *args, **kwargs)
        base = self.base_layer
        return LoraLinearFunction.apply(
            x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        )

    patched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and fusable(module) is not None:
            module.forward = types.MethodType(forward, module)
            patched += 1
    return patched


class RMSNormFunction(torch.autograd.Function):
    """Llama's RMSNorm: weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype), statistics in fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = (grad * weight).to(rstd.dtype)
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)) along the hidden axis
        grad_x = grad_normed.sub_(xhat * (grad_normed * xhat).mean(-1, keepdim=True)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


# transformers' RMSNorm classes whose forward is exactly Llama's (Gemma's `1 + weight` is not among them).
LLAMA_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def fuse_rmsnorms(model) -> int:
    def forward(self, hidden_states):
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)

    patched = 0
    for module in model.modules():
        if type(module).__name__ in LLAMA_RMSNORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(forward, module)
            patched += 1
    return patched


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward (autograd would also keep silu(gate))."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # silu_backward is d silu(gate)/d gate = sig * (1 + gate * (1 - sig)) times its first argument, in one pass
        # (as autograd's own SiLU backward runs it): four passes over [tokens, intermediate] where the formula
        # written out takes ten
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def lean_swiglu(model) -> int:
    """Llama-style MLPs (`down(silu(gate(x)) * up(x))`) through SwiGLU: one [tokens, intermediate] activation per
    decoder layer less (about 320 MB for a 1765-token fp32 step of SmolLM2-135M)."""

    def forward(self, x):
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))

    patched = 0
    for module in model.modules():
        act = type(getattr(module, "act_fn", None)).__name__
        if act in ("SiLU", "SiLUActivation") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(forward, module)
            patched += 1
    return patched


def fuse_decoder_layers(model) -> dict[str, int]:
    """Route `model`'s LoRA linears, RMSNorms and SwiGLU MLPs through the functions above; how many of each."""
    return {
        "lora_linears": fuse_lora_linears(model),
        "rmsnorms": fuse_rmsnorms(model),
        "swiglu_mlps": lean_swiglu(model),
    }
