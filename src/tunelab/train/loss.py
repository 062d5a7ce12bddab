"""Log-probabilities of the labelled tokens under the model's own head, without full-vocabulary logits.

The LM head (49k x 576 for SmolLM2) makes logits the largest tensor in the step, yet only labelled positions
(assistant tokens for sft, completions for dpo/kto) are scored. `label_logps` runs the decoder, keeps the hidden
states at labelled positions, and `LinearTokenLogProbs` computes the LM head + log-softmax for them chunk by chunk.
Every objective is built on it: the sft loss (`masked_lm_loss`) is the negated sum of these log-probs, dpo/kto
(tunelab.train.preference) sum them per sequence, for the policy and for the cached reference alike.

The head reproduces the model's own (tunelab.train.architectures.Head): lm_head bias, logit scaling,
final soft-capping. Models on the fallback (`plan_for`: an unknown family, an attention kind tunelab does not
implement, an adapter on lm_head) take `model_forward_logps`: the model's own forward and logits, on padded rows.
"""

from __future__ import annotations

import torch

from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.architectures import causal_lm, plan_for
from tunelab.train.batching import Batch

# Rows of a chunk's logits whose fp32 work (head, log-softmax, softmax, gradient) is done at once. 32 rows of a 49k
# vocabulary are 6 MiB in fp32, which stay in cache through that work's passes; a whole chunk in fp32 (50 MiB at 256
# rows) is read and written from memory on every pass, and page-faulted in afresh for each chunk. Fewer rows add
# parallel regions (three per block), each a wait at a barrier when other processes hold the cores (16 rows: as fast
# on one thread, 3x slower than the unblocked head with two threads on a loaded 2-core machine; 64 rows: slower on one
# thread).
SOFTMAX_ROWS = 32


def head_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    with_gradient: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-prob of each target [c] fp32, d(-log-prob)/d(hidden @ weight.T) [c, vocab] in hidden's dtype or None) for
    one chunk of rows. The [c, vocab] matmul output is the only chunk-sized tensor: the head's fp32 maths runs
    SOFTMAX_ROWS rows at a time in small fp32 buffers, and each block's gradient overwrites its logits."""
    logits = hidden @ weight.T
    count, vocab = logits.shape
    rows = min(SOFTMAX_ROWS, count)
    z = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    logp = torch.empty_like(z)
    capped = torch.empty_like(z) if softcap is not None else None
    logps = torch.empty(count, dtype=torch.float32, device=logits.device)
    bias = None if bias is None else bias.float()
    for start in range(0, count, rows):
        block = logits[start : start + rows]
        n = block.shape[0]
        zb, lb, target = z[:n], logp[:n], targets[start : start + n]
        zb.copy_(block)
        if bias is not None:
            zb += bias
        if scale != 1.0:
            zb *= scale
        if capped is not None:  # kept: d(softcap * tanh(z / softcap))/dz = 1 - tanh^2
            torch.tanh(zb.div_(softcap), out=capped[:n])
            torch.mul(capped[:n], softcap, out=zb)
        torch.log_softmax(zb, dim=1, out=lb)
        target_logps = lb.gather(1, target[:, None]).squeeze(1)
        logps[start : start + n] = target_logps
        if with_gradient:  # d(-log-prob)/dz = softmax(z) - one-hot(target), written over the block's logits
            torch.exp(lb, out=block)
            block[torch.arange(n, device=block.device), target] = target_logps.exp().sub_(1.0).to(block.dtype)
            if capped is not None:
                block.mul_(capped[:n].square_().neg_().add_(1.0))
            if scale != 1.0:
                block.mul_(scale)
    return logps, logits if with_gradient else None


class LinearTokenLogProbs(torch.autograd.Function):
    """log softmax(head(hidden_i))[target_i] for every row i: [n] fp32, computed chunk by chunk.

    head(h) = softcap * tanh(z / softcap) with z = scale * (h @ weight.T + bias) (no tanh when softcap is None),
    which is what the supported families' forwards compute (tunelab.train.architectures.Head). Each output depends
    on its own hidden row only, so d(out_i)/d(hidden_i) is computed in the same chunked pass and kept ([n, hidden],
    small): no logits are kept, and none are recomputed for the decoder's gradient. The LM head is frozen in LoRA
    training; when it is not (a model trained with its lm_head), d/d(weight) and d/d(bias), which mix every row's
    incoming gradient, are computed in the backward by recomputing each chunk's logits.
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
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        jacobian = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        weight_in_dtype = weight.to(hidden.dtype)  # no-op when the frozen LM head is already in the compute dtype
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            logps, grad = head_chunk(
                h, weight_in_dtype, targets[start : start + chunk], bias, scale, softcap, jacobian is not None
            )
            out[start : start + chunk] = logps
            if jacobian is not None:
                torch.mm(grad, weight_in_dtype, out=jacobian[start : start + chunk]).neg_()
        head_grads = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[4])
        ctx.save_for_backward(jacobian, *((hidden, weight, targets, bias) if head_grads else ()))
        ctx.head = (chunk, scale, softcap)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        jacobian, *head_inputs = ctx.saved_tensors
        grad_hidden = None if jacobian is None else jacobian * grad_output[:, None].to(jacobian.dtype)
        grad_weight = grad_bias = None
        if head_inputs:
            hidden, weight, targets, bias = head_inputs
            chunk, scale, softcap = ctx.head
            weight_in_dtype = weight.to(hidden.dtype)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
            grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk]
                _, grad = head_chunk(
                    h, weight_in_dtype, targets[start : start + chunk], bias, scale, softcap, with_gradient=True
                )
                grad = grad.float().mul_(grad_output[start : start + chunk, None].float().neg())
                grad_weight += grad.T @ h.float()
                if grad_bias is not None:
                    grad_bias += grad.sum(dim=0)
            grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None and ctx.needs_input_grad[4] else None
        return grad_hidden, grad_weight, None, None, grad_bias, None, None


def split_causal_lm(model):
    """(decoder, lm_head) of a HF causal LM, also through DDP and PEFT wrappers."""
    inner = causal_lm(model)
    return inner.model, inner.lm_head


def label_logps(model, batch: Batch, chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of every labelled target [n] fp32, the [rows, T] mask of where they are) for one micro-batch,
    under the model's own head: tunelab's chunked head on the fast path, the model's own forward otherwise."""
    keep = batch.targets != IGNORE_INDEX
    plan = plan_for(model)
    if not plan.fast:
        return model_forward_logps(model, batch, keep), keep
    decoder, lm_head = split_causal_lm(model)
    hidden = decoder(**batch.model_kwargs()).last_hidden_state
    head = plan.head
    logps = LinearTokenLogProbs.apply(
        hidden[keep], lm_head.weight, batch.targets[keep], chunk_tokens, lm_head.bias, head.scale, head.softcap
    )
    return logps, keep


def model_forward_logps(model, batch: Batch, keep: torch.Tensor) -> torch.Tensor:
    """The fallback: log-softmax of the model's own logits at the labelled positions (one padded row per
    conversation). The model's forward materialises its full logits; only the labelled rows go further."""
    if batch.segments is not None:
        raise ValueError("a packed batch for a model on the fallback path (see tunelab.train.architectures)")
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    selected = logits[keep].float()
    return selected.gather(1, batch.targets[keep][:, None]).squeeze(1) - selected.logsumexp(dim=1)


def masked_lm_loss(model, batch: Batch, chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of assistant-token cross-entropies, number of assistant tokens) for one micro-batch."""
    logps, _ = label_logps(model, batch, chunk_tokens)
    return (-logps).sum(), int(logps.numel())


class AssistantLoss(torch.nn.Module):
    """`forward(batch)` = summed assistant-token loss. DDP/FSDP wrap this module, so their forward hooks
    (gradient sync, parameter gathering) run even though we call the decoder and LM head separately."""

    def __init__(self, model, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: Batch) -> torch.Tensor:
        return masked_lm_loss(self.model, batch, self.chunk_tokens)[0]
