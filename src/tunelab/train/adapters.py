"""What the LoRA adapters of a PEFT model cover, and whether a backward step reaches each of them.

`adapter_modules` / `linear_layers_without_adapter` say where PEFT put adapters and which linear layers (plain
`torch.nn.Linear` or a bitsandbytes `Linear4bit`/`Linear8bitLt`, matched by class name so bitsandbytes need not
be installed) it left alone. `adapter_gradients` reads each adapter weight's gradient after a backward pass;
`adapters_without_gradient` names the adapters (module paths) whose every weight got a zero or no gradient: a
target the loss never reaches, or weights frozen (requires_grad False) e.g. by a dtype cast.
"""

from __future__ import annotations

import torch

from tunelab.train.architectures import causal_lm

QUANTISED_LINEAR_CLASSES = {"Linear4bit", "Linear8bitLt"}


def is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in QUANTISED_LINEAR_CLASSES


def adapter_modules(model) -> list[str]:
    """Module paths (inside the base causal LM) that carry a LoRA adapter."""
    inner = causal_lm(model)
    return [name for name, module in inner.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)]


def linear_layers_without_adapter(model) -> list[str]:
    """Linear layers of the base model that PEFT did not wrap (an adapter's own lora_A/lora_B excluded)."""
    inner = causal_lm(model)
    wrapped = set(adapter_modules(model))
    found = []
    for name, module in inner.named_modules():
        if not is_linear(module) or ".lora_" in f".{name}" or any(name.startswith(w + ".") for w in wrapped):
            continue
        if name not in wrapped:
            found.append(name)
    return found


def adapter_gradients(model) -> dict[str, torch.Tensor | None]:
    """{parameter name: its gradient (None when it has none)} of every LoRA weight, after a backward pass."""
    return {
        name: (None if p.grad is None else p.grad.detach().clone())
        for name, p in model.named_parameters()
        if "lora_" in name
    }


def adapters_without_gradient(model) -> list[str]:
    """Adapter module paths none of whose weights has a non-zero gradient (after a backward pass).

    Per adapter, not per weight: with PEFT's default init lora_B starts at zero, so lora_A's first gradient is
    zero by construction; an adapter the loss reaches still gives lora_B a non-zero gradient."""
    reached: dict[str, bool] = {}
    for name, grad in adapter_gradients(model).items():
        module = name.split(".lora_")[0]
        reached[module] = reached.get(module, False) or (grad is not None and bool(grad.abs().max() > 0))
    return [module for module, ok in reached.items() if not ok]


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
