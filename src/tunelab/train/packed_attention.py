"""Attention for packed rows: causal attention inside each conversation, none across them.

Registered with transformers' AttentionInterface as "tunelab_packed". The model forwards the
`packed_segments` keyword (a tuple of (start, end)) down to this function. Running SDPA once per
segment costs only the attention each conversation needs; a block-diagonal mask over the whole row
would compute (and then discard) all the cross-conversation scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tunelab_packed"


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    segments = kwargs.pop("packed_segments", None)
    if segments is None:
        # Not a packed call (e.g. generation): fall back to transformers' own SDPA path.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a single packed row")
    groups = query.shape[1] // key.shape[1]
    outputs = []
    for q, k, v in zip(*(split_segments(t, segments) for t in (query, key, value))):
        outputs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1))
    attn = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return attn.transpose(1, 2).contiguous(), None


def split_segments(t: torch.Tensor, segments) -> tuple[torch.Tensor, ...]:
    """Per-conversation views along the sequence axis. `split`, not slicing: the backward of a slice builds a
    zero tensor of the whole row per segment and adds them up; the backward of a split is one `cat`."""
    lengths = [end - start for start, end in segments]
    if segments[0][0] == 0 and all(a[1] == b[0] for a, b in zip(segments, segments[1:])) and segments[-1][1] == t.shape[2]:
        return t.split(lengths, dim=2)
    return tuple(t[:, :, start:end] for start, end in segments)  # segments not tiling the row (not made by pack)


def register() -> str:
    """Register the packed attention; padded batches and generation get transformers' usual SDPA masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
