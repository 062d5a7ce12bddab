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

Sequence log-probabilities are the per-token log-probs of tunelab.train.loss.label_logps (the same kernel and
the same model head as the sft loss: bias, logit scaling, soft-capping, the model's own forward on the fallback)
summed over each sequence's label positions, so full-vocabulary logits never exist for the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.train.batching import Batch
from tunelab.train.loss import label_logps

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


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
    logps, keep = label_logps(model, batch, chunk_tokens)
    owner = sequence_ids(batch).expand_as(keep)[keep]
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=logps.device).index_add(0, owner, logps)
    counts = torch.zeros(num_sequences, dtype=torch.long, device=logps.device).index_add(
        0, owner, torch.ones_like(owner)
    )
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
