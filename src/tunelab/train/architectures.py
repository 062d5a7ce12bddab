"""Which model families take tunelab's fast path, and what the others get instead.

The fast path is two pieces of tunelab's own maths: packed per-conversation attention
(tunelab.train.packed_attention) and the LM head + loss computed only at assistant positions
(tunelab.train.loss). Both re-implement part of the model's forward, so they may only run where they
reproduce it exactly. For the families below they do: the attention modules pass their sliding window
and soft-capping to the packed attention, and `Head` carries what the model's own head does to the
logits after `lm_head` (Gemma-2/3 final soft-capping, Cohere/Granite logit scaling; an `lm_head` bias is
read from the module itself). Everything else — an unknown `model_type`, an attention kind tunelab does
not implement, an `lm_head` wrapped by PEFT (a LoRA adapter or modules_to_save on it) or quantised — takes the
fallback: the model's own forward and logits, one padded row per conversation (no packing).

A 4/8-bit base (bitsandbytes, tunelab.models.quantization) keeps the fast path: its quantised linears sit inside
the decoder, whose forward the packed attention leaves to the model, and transformers keeps `lm_head` unquantised.
What steps aside for it is the fused LoRA linear (tunelab.train.fused_layers: it multiplies by a plain weight), and
the plan's line says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

# model_type -> the family name used in messages. Each one is tested in tests/train/test_architectures.py.
FAST_FAMILIES = {
    "llama": "Llama-3.x",
    "qwen2": "Qwen2/2.5",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "phi3": "Phi-3",
    "gemma2": "Gemma-2",
    "gemma3_text": "Gemma-3",
    "cohere": "Cohere",
    "granite": "Granite",
}
KNOWN_LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class Head:
    """logits = softcap(scale * (hidden @ lm_head.weight.T + lm_head.bias)), as the model's forward computes them."""

    scale: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class Plan:
    fast: bool
    family: str
    reason: str
    head: Head = field(default_factory=Head)
    quantized_base: str | None = None  # e.g. "4-bit nf4 base (...)" (tunelab.models.quantization), None: unquantised

    def describe(self, packing: bool = True) -> str:
        """The one line a run prints about it."""
        base = ""
        if self.quantized_base:
            base = f"; {self.quantized_base}: its LoRA layers run PEFT's bitsandbytes forward (no fused LoRA linear)"
        if self.fast:
            attention = "packed attention" if packing else "padded rows (train.packing: false)"
            return (
                f"architecture: {self.family} — tunelab's fast path ({attention}, assistant-only LM head): "
                f"{self.reason}{base}"
            )
        return (
            f"architecture: {self.family} — fallback to the model's own forward and loss, one padded row per "
            f"conversation (no packing): {self.reason}{base}"
        )


def causal_lm(model):
    """The HF causal LM inside DDP and PEFT wrappers."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # PeftModel
        inner = inner.get_base_model()
    return inner


def plan_for(model) -> Plan:
    """Fast path or fallback for this (possibly PEFT-wrapped) model, and why."""
    from tunelab.models.quantization import describe_quantization

    plan = _plan(causal_lm(model))
    return replace(plan, quantized_base=describe_quantization(model))


def _plan(inner) -> Plan:
    config = inner.config
    model_type = getattr(config, "model_type", None) or type(inner).__name__
    family = FAST_FAMILIES.get(model_type)
    if family is None:
        return Plan(False, model_type, f"model_type `{model_type}` is not one whose maths tunelab reproduces")
    if not type(inner).__module__.startswith("transformers.models."):
        return Plan(
            False, family, f"{type(inner).__name__} is remote code, not transformers' own {family} implementation"
        )
    if not (hasattr(inner, "model") and hasattr(inner, "lm_head")):
        return Plan(False, family, f"{type(inner).__name__} is not a decoder + lm_head causal LM")
    unknown_layers = set(getattr(config, "layer_types", None) or []) - KNOWN_LAYER_TYPES
    if unknown_layers:
        return Plan(
            False, family, f"attention layer types {sorted(unknown_layers)} are not implemented by the packed attention"
        )
    if getattr(config, "use_bidirectional_attention", False):
        return Plan(False, family, "bidirectional attention is not causal")
    lm_head = inner.lm_head
    if type(lm_head).__module__.startswith("bitsandbytes."):
        return Plan(
            False,
            family,
            f"lm_head is quantised ({type(lm_head).__name__}), which the assistant-only head does not read",
        )
    if type(lm_head) is not torch.nn.Linear:
        return Plan(
            False,
            family,
            f"lm_head is wrapped ({type(lm_head).__name__}: an adapter or modules_to_save on it), "
            "which the assistant-only head does not reproduce",
        )
    head = head_of(model_type, config)
    return Plan(True, family, _settings(config, head, lm_head), head)


def head_of(model_type: str, config) -> Head:
    """What the family's forward does to `lm_head`'s output before the loss (read from its modeling code)."""
    if model_type == "cohere":
        return Head(scale=float(config.logit_scale))
    if model_type == "granite":
        return Head(scale=1.0 / float(config.logits_scaling))
    if model_type in ("gemma2", "gemma3_text"):
        return Head(softcap=getattr(config, "final_logit_softcapping", None))
    return Head()


def _settings(config, head: Head, lm_head) -> str:
    parts = []
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if window and (not layer_types or "sliding_attention" in layer_types):
        where = f"{layer_types.count('sliding_attention')}/{len(layer_types)} layers" if layer_types else "all layers"
        parts.append(f"sliding window {window} on {where}")
    if getattr(config, "model_type", None) == "gemma2" and config.attn_logit_softcapping:  # Gemma-3 does not pass it on
        parts.append(f"attention soft-cap {config.attn_logit_softcapping}")
    if head.softcap:
        parts.append(f"final logit soft-cap {head.softcap}")
    if head.scale != 1.0:
        parts.append(f"logit scale {head.scale:g}")
    if lm_head.bias is not None:
        parts.append("lm_head bias")
    if getattr(config, "tie_word_embeddings", False):
        parts.append("tied embeddings")
    return ", ".join(parts) or "plain causal attention and head"


def use_plan(model, packing: bool, log=print) -> bool:
    """Decide, say so in one line, and switch the model to the packed attention when it packs. Returns whether
    batches may be packed (False on the fallback, whatever `train.packing` says)."""
    plan = plan_for(model)
    log(plan.describe(packing))
    if plan.fast and packing:
        from tunelab.train.packed_attention import register

        causal_lm(model).config._attn_implementation = register()
    return plan.fast and packing


@torch.no_grad()
def batch_logits_gaps(model, rows: list[tuple[list[int], list[int]]], packing: bool, pad_id: int) -> list[float]:
    """Per row: the largest |logit| difference, relative to the largest |logit|, between the row inside a
    micro-batch as training builds it (one packed row through tunelab's attention, or right-padded rows) and the
    row run alone through the model's own eager attention. In a packed row the first conversation cannot see
    another one (attention is causal), so its gap is the rounding of the path alone; a later conversation that
    sees the ones before it differs by far more."""
    from tunelab.train.batching import make_batch

    inner = causal_lm(model)
    decoder, lm_head = inner.model, inner.lm_head
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batch = make_batch(rows, packing, pad_id).to(device)
    hidden = decoder(**batch.model_kwargs()).last_hidden_state
    if packing:
        in_batch = [hidden[0, start:end] for start, end in batch.segments]
    else:
        in_batch = [hidden[r, : len(ids)] for r, (ids, _) in enumerate(rows)]
    own = inner.config._attn_implementation
    inner.config._attn_implementation = "eager"  # the most literal form of the model's own attention
    try:
        alone = [decoder(input_ids=torch.tensor([ids], device=device)).last_hidden_state[0] for ids, _ in rows]
    finally:
        inner.config._attn_implementation = own
        model.train(was_training)
    gaps = []
    for got, want in zip(in_batch, alone):
        got, want = lm_head(got).float(), lm_head(want).float()
        gaps.append(float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12))
    return gaps
