"""Preference losses (DPO, KTO) and the sequence log-probabilities they are computed from.

Numbers follow TRL 1.x (`DPOTrainer._compute_loss`, `KTOTrainer._compute_loss`), checked in
tests/train/test_preference.py on the same inputs:
- DPO: delta = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)) per pair;
  sigmoid: -log sigmoid(beta * delta); hinge: relu(1 - beta * delta);
  ipo: (delta_per_token - 1 / (2 beta))^2 where each log-ratio is divided by its completion's token count.
  Rewards: beta * log-ratio of the chosen and the rejected completion.
- KTO (TRL's `loss_type="kto"`): a desirable completion loses 1 - sigmoid(beta * (logratio - kl)),
  an undesirable one 1 - sigmoid(beta * (kl - logratio)), weighted by desirable/undesirable weights;
  kl = max(0, mean over the batch of log pi(y'|x) - log ref(y'|x)) on *mismatched* pairs (each prompt with
  another row's completion), without gradient.

Sequence log-probabilities are summed over label positions only: the decoder runs once, its hidden states
are kept at the labelled positions and the LM head + log-softmax run over them chunk by chunk (as
train/loss.py does for SFT), so full-vocabulary logits never exist for the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.batching import Batch
from tunelab.train.loss import split_causal_lm

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


class LinearTokenLogProbs(torch.autograd.Function):
    """log softmax(hidden_i @ weight.T)[target_i] for every row i, chunked; gradient only w.r.t. hidden.

    Each output depends on its own hidden row only, so d(out_i)/d(hidden_i) = weight[target_i] - softmax_i @ weight
    is computed in the same chunked pass and kept ([n, hidden], small): no logits are stored or recomputed.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        jacobian = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        weight = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.T).float()
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()
            norm = probs.sum(dim=1, keepdim=True)
            out[start : start + chunk] = target_logit - top.squeeze(1) - norm.log().squeeze(1)
            if jacobian is not None:
                probs.div_(norm).neg_()
                probs[torch.arange(t.shape[0], device=t.device), t] += 1.0
                jacobian[start : start + chunk] = probs.to(h.dtype) @ weight
        ctx.save_for_backward(jacobian)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (jacobian,) = ctx.saved_tensors
        return jacobian * grad_output[:, None].to(jacobian.dtype), None, None, None


def sequence_ids(batch: Batch) -> torch.Tensor:
    """[rows, T] index of the sequence each position belongs to, in the order the examples were given."""
    rows, width = batch.input_ids.shape
    if batch.segments is None:  # padded: one sequence per row
        return torch.arange(rows, device=batch.input_ids.device)[:, None].expand(rows, width)
    ids = torch.empty(width, dtype=torch.long)
    for n, (start, end) in enumerate(batch.segments):
        ids[start:end] = n
    return ids.to(batch.input_ids.device)[None, :]


def sequence_logps(
    model, batch: Batch, num_sequences: int, chunk_tokens: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of label-token log-probs, number of label tokens) per sequence of `batch`, each [num_sequences]."""
    decoder, lm_head = split_causal_lm(model)
    hidden = decoder(**batch.model_kwargs()).last_hidden_state
    keep = batch.targets != IGNORE_INDEX
    owner = sequence_ids(batch).expand_as(keep)[keep]
    token_logps = LinearTokenLogProbs.apply(hidden[keep], lm_head.weight, batch.targets[keep], chunk_tokens)
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=hidden.device).index_add(0, owner, token_logps)
    counts = torch.zeros(num_sequences, dtype=torch.long, device=hidden.device).index_add(
        0, owner, torch.ones_like(owner)
    )
    if token_logps.numel() == 0:
        sums = sums + hidden.sum() * 0.0  # keeps the graph connected so backward still runs
    return sums, counts


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    variant: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards); `*_tokens` (completion lengths) are needed for ipo."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if variant == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif variant == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif variant == "ipo":
        # TRL normalises IPO's log-ratios by completion length (confirmed with the IPO authors, per TRL's comment)
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo loss {variant!r} (choose {', '.join(DPO_LOSSES)})")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: mean log-ratio on mismatched pairs, clamped at 0, without gradient."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss per row, reward per row); `desirable` is the bool thumbs-up label of each row."""
    ratio = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach()
