"""`train.compile`: fuse each decoder layer's element-wise work with torch.compile (inductor: C++/OpenMP on CPU).

RMSNorm (fp32 upcast, mean of squares, rsqrt, scale), the MLP's SwiGLU and the LoRA scale-and-add are chains of
small element-wise kernels that each read and write whole activations; inductor fuses them into a few loops. What
is compiled: every decoder layer's two norms and its MLP (with its LoRA adapters) — modules whose shapes depend only
on the packed row's token count. Attention stays eager: the packed attention loops over the row's conversations,
whose number and lengths change every step.

Recompilation: the first call compiles for its static shape; the first call with another token count makes
dynamo mark that dimension dynamic (`automatic_dynamic_shapes`) and compile once more; after that every packed
row, whatever its length, reuses the dynamic graph. Module instances of the same class share the compiled code
(dynamo treats their parameters as inputs), so 30 layers cost the same two compilations as one.
"""

from __future__ import annotations

COMPILED_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp")


def decoder_layers(model):
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # PeftModel
        inner = inner.get_base_model()
    return list(inner.model.layers)


def compile_decoder_layers(model) -> int:
    """Compile the norms and MLP of every decoder layer in place; returns how many modules were wrapped."""
    import torch._dynamo

    # Every layer's modules are separate callables; allow one cache entry per (layer, part) plus the dynamic one.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    count = 0
    for layer in decoder_layers(model):
        for name in COMPILED_PARTS:
            module = getattr(layer, name, None)
            if module is not None:
                module.compile()
                count += 1
    return count
