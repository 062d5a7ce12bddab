"""Held-out loss: the same assistant-only loss the trainer optimises, averaged over assistant tokens."""

from __future__ import annotations

import math

import torch

from tunelab.train.batching import make_batch
from tunelab.train.loss import masked_lm_loss


@torch.no_grad()
def validation_loss(model, rows, batch_size, packing, pad_id, precision, device, chunk_tokens=1024) -> float:
    """Mean cross-entropy per assistant token over `rows` ((input_ids, labels) pairs), in a fixed order."""
    if not rows:
        raise ValueError("validation split is empty")
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = make_batch(rows[start : start + batch_size], packing, pad_id).to(device)
        with precision.autocast(device.type):
            loss_sum, n = masked_lm_loss(model, batch, chunk_tokens)
        total += float(loss_sum)
        count += n
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
