"""Training FLOPs of one LoRA step, counted by hand, for model FLOP utilisation (MFU).

What one optimizer step costs, in multiply-add pairs x 2 (matmuls only; element-wise work is not counted, and
recomputation under gradient checkpointing is not either: MFU counts the model's work, not the hardware's):

    per token t, per decoder layer, for each linear W (in -> out) of q/k/v/o/gate/up/down:
        forward                      2 * in * out
        backward to the input        2 * in * out      (frozen W: no weight gradient)
    per token, per LoRA-adapted linear (A: in x r, B: r x out):
        forward                      2 * r * (in + out)
        backward                     2 * r * out (dB) + 2 * r * out (d(xA)) + 2 * r * in (dA) + 2 * r * in (dx)
    per conversation of n tokens, per layer (H query heads of width d), with P query-key pairs
    (P = n(n+1)/2 causal, n^2 when counted in full):
        forward                      4 * P * d * H     (scores QK^T and probabilities x V)
        backward                     8 * P * d * H     (dQ, dK, dV, d(probabilities))
    per token whose logits are computed (tunelab: assistant targets only), LM head (hidden -> vocab):
        forward                      2 * hidden * vocab
        backward to the hidden state 2 * hidden * vocab (the LM head is frozen)

Exceptions that follow from what needs a gradient: the first layer's q/k/v read the (frozen) embedding output, so
neither their base weights nor their LoRA A matrices propagate a gradient to their input (no `dx` terms).
Embedding lookups cost no FLOPs (no embedding parameters are counted). Attention is counted per conversation, so a
packed row of four conversations costs the sum of four small triangles, not one big one.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FIRST_LAYER_INPUT_LINEARS = ("q_proj", "k_proj", "v_proj")  # fed by the frozen embedding output


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a Llama-style decoder's FLOPs, plus which linears carry a LoRA adapter of rank r."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear in one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, f = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }


def model_shape(config, lora_rank: int = 0, lora_targets="all-linear") -> ModelShape:
    """ModelShape of a HF Llama-style config; `lora_targets` is a list of module names or "all-linear"."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if lora_targets == "all-linear":
        targets = LLAMA_LINEARS
    else:
        targets = tuple(name for name in LLAMA_LINEARS if name in set(lora_targets))
    return ModelShape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        lora_rank=lora_rank,
        lora_targets=targets if lora_rank else (),
    )


def linear_flops_per_token(shape: ModelShape) -> float:
    """Forward + backward FLOPs of all decoder linears (base + LoRA) for one token, all layers."""
    total = 0.0
    r = shape.lora_rank
    for name, (n_in, n_out) in shape.linears().items():
        adapted = name in shape.lora_targets
        for layer in range(shape.layers):
            input_grad = not (layer == 0 and name in FIRST_LAYER_INPUT_LINEARS)
            total += 2 * n_in * n_out * (2 if input_grad else 1)
            if adapted:
                total += 2 * r * (n_in + n_out)  # forward
                total += 2 * r * n_out * 2 + 2 * r * n_in  # dB, d(xA), dA
                total += 2 * r * n_in if input_grad else 0  # dx through A
    return total


def attention_flops(shape: ModelShape, conversation_lengths: list[int], causal: bool = True) -> float:
    """Forward + backward FLOPs of attention scores and weighted sums, conversation by conversation, all layers."""
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in conversation_lengths)
    return 12 * pairs * shape.head_dim * shape.heads * shape.layers


def head_flops(shape: ModelShape, head_tokens: int) -> float:
    """LM head forward + backward to the hidden state for the tokens whose logits are computed."""
    return 4 * shape.hidden * shape.vocab * head_tokens


def training_flops(shape: ModelShape, conversation_lengths: list[int], head_tokens: int, causal: bool = True) -> float:
    """FLOPs of one training step over these conversations (see the module docstring for the formula)."""
    tokens = sum(conversation_lengths)
    return (
        linear_flops_per_token(shape) * tokens
        + attention_flops(shape, conversation_lengths, causal)
        + head_flops(shape, head_tokens)
    )


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s as a fraction of the measured matmul peak."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        return 0.0
    return flops / seconds / peak_flops_per_s


def shape_of(model) -> ModelShape:
    """ModelShape of a (PEFT-wrapped) HF causal LM, with the rank and targets of its LoRA adapter, if any."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    peft_config = getattr(inner, "peft_config", {}).get("default")
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if peft_config is None:
        return model_shape(base.config)
    return model_shape(base.config, peft_config.r, list(peft_config.target_modules or []))
