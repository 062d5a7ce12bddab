"""A LoRA linear layer's forward and backward as one autograd function (same numbers as PEFT's, fewer passes).

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate autograd nodes: besides the base
matmul and the two thin adapter matmuls, it multiplies the adapter output by `scaling` (a pass over
[tokens, out]), adds it (another), and in the backward scales the incoming gradient and adds the two input
gradients (two more). On a CPU, for SmolLM2-sized layers, those passes and the thin matmuls made LoRA cost ~40 %
on top of the frozen matmuls. Here the adapter's output is accumulated into the base output by the matmul itself
(`addmm_` with alpha = scaling), and likewise the adapter's input gradient into the base one; the scaling is
applied to the [tokens, r] intermediate, not to a [tokens, out] tensor. Saved for the backward: the input and the
[tokens, r] intermediate, as PEFT's graph saves.

Only the plain case is fused: one active LoRA adapter (no DoRA, no adapter bias, no dropout), on a `torch.nn.Linear`
whose weight is frozen. Anything else (quantised bases, dropout > 0, adapters disabled for a reference pass,
merged weights) runs PEFT's own forward, decided at every call.
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
        return (grad_x, None, None, grad_a if grad_a is None else grad_a.to(a_dtype),
                grad_b if grad_b is None else grad_b.to(b_dtype), None)


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
        return LoraLinearFunction.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                        self.scaling[name])

    patched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and fusable(module) is not None:
            module.forward = types.MethodType(forward, module)
            patched += 1
    return patched
