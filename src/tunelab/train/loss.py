"""Assistant-only loss without full-vocabulary logits.

The LM head (49k x 576 for SmolLM2) makes logits the largest tensor in the step, yet only assistant
positions carry labels. `masked_lm_loss` runs the decoder, keeps the hidden states at labelled positions,
and `LinearCrossEntropy` computes the LM head + cross-entropy for them chunk by chunk. The LM head is
frozen in LoRA training, so the backward pass needs only d(loss)/d(hidden): it is computed in the same
chunked forward pass and stored ([n, hidden], tiny), so no logits are kept and none are recomputed.

The head reproduces the model's own (tunelab.train.architectures.Head): lm_head bias, logit scaling,
final soft-capping. Models tunelab does not reproduce take `model_forward_loss`: the model's own forward
and loss with `labels`, on padded rows.
"""

from __future__ import annotations

import torch

from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.architectures import Head, causal_lm, plan_for
from tunelab.train.batching import Batch


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(head(hidden_i), target_i), chunked; gradients computed in the forward pass.

    head(h) = softcap * tanh(z / softcap) with z = scale * (h @ weight.T + bias) (no tanh when softcap is None),
    which is what the supported families' forwards compute (tunelab.train.architectures.Head). The LM head is
    frozen in LoRA training, so usually only d(loss)/d(hidden) is needed; d/d(weight) and d/d(bias) are
    accumulated only when they require grad (a model trained with its lm_head).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        bias: torch.Tensor | None = None,
        scale: float = 1.0,
        softcap: float | None = None,
    ):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[4] else None
        )
        wants_grad = any(g is not None for g in (grad_hidden, grad_weight, grad_bias))
        weight_in_dtype = weight.to(hidden.dtype)  # no-op when the frozen LM head is already in the compute dtype
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            # One fp32 [chunk, vocab] buffer, reused in place: logits -> exp -> softmax -> d(loss)/d(logits).
            logits = (h @ weight_in_dtype.T).float()
            if bias is not None:
                logits += bias.float()
            if scale != 1.0:
                logits *= scale
            if softcap is not None:
                capped = logits.div_(softcap).tanh_()  # kept: d(softcap * tanh(z / softcap))/dz = 1 - tanh^2
                logits = capped * softcap
            target_logit = logits.gather(1, t[:, None])
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()
            norm = probs.sum(dim=1, keepdim=True)
            total += (norm.log() + top - target_logit).sum()
            if wants_grad:
                probs.div_(norm)
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if softcap is not None:
                    probs.mul_(1.0 - capped.square_())
                if scale != 1.0:
                    probs.mul_(scale)  # now d(loss)/d(h @ weight.T + bias)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = probs.to(h.dtype) @ weight_in_dtype
                if grad_weight is not None:
                    grad_weight += probs.T @ h.float()
                if grad_bias is not None:
                    grad_bias += probs.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = lambda g, dtype: None if g is None else (g * grad_output.to(g.dtype)).to(dtype)  # noqa: E731
        return (
            scaled(grad_hidden, None if grad_hidden is None else grad_hidden.dtype),
            scaled(grad_weight, ctx.dtypes[0]),
            None,
            None,
            scaled(grad_bias, ctx.dtypes[1]),
            None,
            None,
        )


def split_causal_lm(model):
    """(decoder, lm_head) of a HF causal LM, also through DDP and PEFT wrappers."""
    inner = causal_lm(model)
    return inner.model, inner.lm_head


def masked_lm_loss(model, batch: Batch, chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of assistant-token cross-entropies, number of assistant tokens) for one micro-batch."""
    plan = plan_for(model)
    if not plan.fast:
        return model_forward_loss(model, batch)
    decoder, lm_head = split_causal_lm(model)
    hidden = decoder(**batch.model_kwargs()).last_hidden_state
    keep = batch.targets != IGNORE_INDEX
    selected = hidden[keep]
    targets = batch.targets[keep]
    if targets.numel() == 0:
        return hidden.sum() * 0.0, 0
    head: Head = plan.head
    loss = LinearCrossEntropy.apply(
        selected, lm_head.weight, targets, chunk_tokens, lm_head.bias, head.scale, head.softcap
    )
    return loss, int(targets.numel())


def model_forward_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """The fallback: the model's own forward and loss with `labels` (one padded row per conversation)."""
    if batch.segments is not None:
        raise ValueError("a packed batch for a model on the fallback path (see tunelab.train.architectures)")
    n = batch.num_targets
    # HF shifts labels left by one inside its loss; our targets are already shifted (and end in IGNORE_INDEX).
    labels = torch.cat([torch.full_like(batch.targets[:, :1], IGNORE_INDEX), batch.targets[:, :-1]], dim=1)
    if n == 0:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits.sum() * 0.0, 0
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    return out.loss.float() * n, n  # the model's loss is the mean over labelled tokens


class AssistantLoss(torch.nn.Module):
    """`forward(batch)` = summed assistant-token loss. DDP/FSDP wrap this module, so their forward hooks
    (gradient sync, parameter gathering) run even though we call the decoder and LM head separately."""

    def __init__(self, model, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: Batch) -> torch.Tensor:
        return masked_lm_loss(self.model, batch, self.chunk_tokens)[0]
