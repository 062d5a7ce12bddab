"""Attention for packed rows: causal attention inside each conversation, none across them.

Registered with transformers' AttentionInterface as "tunelab_packed". The model forwards the
`packed_segments` keyword (a tuple of (start, end)) down to this function. Running SDPA once per
segment costs only the attention each conversation needs; a block-diagonal mask over the whole row
would compute (and then discard) all the cross-conversation scores.

The model's own attention settings arrive as keywords and are honoured per conversation:
`sliding_window` (Mistral, Qwen2/3, Phi-3, Gemma-2/3 sliding layers: a query sees itself and the
`sliding_window - 1` keys before it, as transformers' sliding-window mask does) and `softcap`
(Gemma-2: scores -> softcap * tanh(scores / softcap) before the mask, as its eager attention does).
Which model families may use this path at all is decided in tunelab.train.architectures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "tunelab_packed"

# Reduced-precision SDPA on a CPU: PyTorch's flash kernel builds and keeps micro-kernels for every sequence length it
# meets (~3.5 MiB each, never freed), and packing gives every conversation its own length, so a bf16 run's RSS grew
# by ~16 MiB a step (hundreds of MiB over a run; docs/benchmarks.md, round four). Padding each conversation at the
# end to a multiple of this many tokens bounds the set of lengths; it is exact, since attention is causal (no real
# query sees a padded key) and the padded queries' outputs are dropped. Speed unchanged in the loop (tried instead:
# the math backend for short conversations, no per-length kernels but it keeps the score matrix for the backward).
CPU_REDUCED_PRECISION_LENGTH_MULTIPLE = 64


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    segments = kwargs.pop("packed_segments", None)
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if segments is None:
        if softcap is not None:  # transformers' SDPA path would silently drop the soft-capping
            raise ValueError(
                "tunelab_packed: attention soft-capping needs packed_segments "
                "(restore the model's own attention for generation)"
            )
        # Not a packed call (e.g. a padded batch): transformers' own SDPA path, the sliding window is in its mask.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a single packed row")
    groups = query.shape[1] // key.shape[1]
    outputs = []
    for q, k, v in zip(*(split_segments(t, segments) for t in (query, key, value))):
        outputs.append(segment_attention(q, k, v, dropout, scaling, groups, window, softcap))
    attn = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return attn.transpose(1, 2).contiguous(), None


def segment_attention(
    q, k, v, dropout: float, scaling: float | None, groups: int, window: int | None, softcap: float | None
):
    """Causal attention over one conversation ([1, heads, length, head_dim])."""
    length = q.shape[2]
    if softcap is None and (window is None or window >= length):
        reduced_on_cpu = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        padding = -length % CPU_REDUCED_PRECISION_LENGTH_MULTIPLE if reduced_on_cpu else 0
        if padding:
            q, k, v = (F.pad(t, (0, 0, 0, padding)) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1
        )
        return out[:, :, :length] if padding else out
    allowed = causal_window_mask(length, window, q.device)
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1
        )
    # Soft-capping acts on the raw scores, which SDPA never exposes: the eager computation, as Gemma-2 does it.
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(2, 3)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return probs @ v


def causal_window_mask(length: int, window: int | None, device) -> torch.Tensor:
    """[length, length] bool, True where query i may attend key j: j <= i, and i - j < window when windowed."""
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def split_segments(t: torch.Tensor, segments) -> tuple[torch.Tensor, ...]:
    """Per-conversation views along the sequence axis. `split`, not slicing: the backward of a slice builds a
    zero tensor of the whole row per segment and adds them up; the backward of a split is one `cat`."""
    lengths = [end - start for start, end in segments]
    if (
        segments[0][0] == 0
        and all(a[1] == b[0] for a, b in zip(segments, segments[1:]))
        and segments[-1][1] == t.shape[2]
    ):
        return t.split(lengths, dim=2)
    return tuple(t[:, :, start:end] for start, end in segments)  # segments not tiling the row (not made by pack)


def register() -> str:
    """Register the packed attention; padded batches and generation get transformers' usual SDPA masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
