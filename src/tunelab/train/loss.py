"""Assistant-only loss without full-vocabulary logits.

The LM head (49k x 576 for SmolLM2) makes logits the largest tensor in the step, yet only assistant
positions carry labels. `masked_lm_loss` runs the decoder, keeps the hidden states at labelled positions,
and `LinearCrossEntropy` computes the LM head + cross-entropy for them chunk by chunk. The LM head is
frozen in LoRA training, so the backward pass needs only d(loss)/d(hidden): it is computed in the same
chunked forward pass and stored ([n, hidden], tiny), so no logits are kept and none are recomputed.
"""

from __future__ import annotations

import torch

from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.batching import Batch


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), chunked; gradient only w.r.t. hidden."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        weight = weight.to(hidden.dtype)  # no-op when the frozen LM head is already in the compute dtype
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            # One fp32 [chunk, vocab] buffer, reused in place: logits -> exp -> softmax -> d(loss)/d(logits).
            logits = (h @ weight.T).float()
            target_logit = logits.gather(1, t[:, None])
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()
            norm = probs.sum(dim=1, keepdim=True)
            total += (norm.log() + top - target_logit).sum()
            if grad_hidden is not None:
                probs.div_(norm)
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad_hidden[start : start + chunk] = probs.to(h.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None


def split_causal_lm(model):
    """(decoder, lm_head) of a HF causal LM, also through DDP and PEFT wrappers."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # PeftModel
        inner = inner.get_base_model()
    return inner.model, inner.lm_head


def masked_lm_loss(model, batch: Batch, chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of assistant-token cross-entropies, number of assistant tokens) for one micro-batch."""
    decoder, lm_head = split_causal_lm(model)
    hidden = decoder(**batch.model_kwargs()).last_hidden_state
    keep = batch.targets != IGNORE_INDEX
    selected = hidden[keep]
    targets = batch.targets[keep]
    if targets.numel() == 0:
        return hidden.sum() * 0.0, 0
    return LinearCrossEntropy.apply(selected, lm_head.weight, targets, chunk_tokens), int(targets.numel())


class AssistantLoss(torch.nn.Module):
    """`forward(batch)` = summed assistant-token loss. DDP/FSDP wrap this module, so their forward hooks
    (gradient sync, parameter gathering) run even though we call the decoder and LM head separately."""

    def __init__(self, model, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: Batch) -> torch.Tensor:
        return masked_lm_loss(self.model, batch, self.chunk_tokens)[0]

