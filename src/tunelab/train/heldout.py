"""Held-out loss: the one function behind the trainer's val loss, `tunelab eval` and the exported model card.

The same assistant-only loss the trainer optimises (the loss module `AssistantLoss`, which it also calls), summed over
every assistant token of `rows` and divided by their count, so the figure does not depend on how the rows are batched.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from tunelab.train.batching import make_batch
from tunelab.train.loss import AssistantLoss
from tunelab.train.precision import Precision

Example = tuple[list[int], list[int]]  # (input_ids, labels)


@torch.no_grad()
def heldout_loss(
    model,
    rows: list[Example],
    batch_size: int = 8,
    packing: bool = False,
    pad_id: int = 0,
    precision: Precision | None = None,
    device: torch.device | None = None,
    chunk_tokens: int = 1024,
    loss_module: torch.nn.Module | None = None,
) -> float:
    """Mean cross-entropy per assistant token over `rows`, in a fixed order. `precision` None = no autocast.

    `loss_module` computes a batch's summed loss: by default `AssistantLoss(model, chunk_tokens)`; under FSDP the
    wrapped one, whose forward gathers the sharded base weights (train/distributed.py)."""
    if not rows:
        raise ValueError("validation split is empty")
    device = device or next(model.parameters()).device
    loss_module = loss_module if loss_module is not None else AssistantLoss(model, chunk_tokens)
    loss_module.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = make_batch(rows[start : start + batch_size], packing, pad_id).to(device)
        with precision.autocast(device.type) if precision is not None else nullcontext():
            total += float(loss_module(batch))
        count += batch.num_targets
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
