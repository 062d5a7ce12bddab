"""Per-conversation attention of packed rows: the reduced-precision CPU path pads each conversation to a bounded set
of lengths, and its outputs and gradients are still those of plain causal attention over the real tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.train import packed_attention
from tunelab.train.packed_attention import CPU_REDUCED_PRECISION_LENGTH_MULTIPLE, packed_attention_forward


def _reference_attention(q, k, v, groups):
    """Causal attention written out in fp64: softmax(q k^T / sqrt(d) + causal mask) v, grouped k/v repeated."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    length = q.shape[2]
    scores = q @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def _packed_inputs(lengths, dtype, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, kv_heads, total, dim, generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, kv_heads, total, dim, generator=g).to(dtype).requires_grad_()
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return q, k, v, tuple(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_and_its_gradients_match_causal_attention_per_conversation(dtype):
    lengths = (70, 5, 64, 129)  # around and on the padding multiple
    q, k, v, segments = _packed_inputs(lengths, dtype)
    out, _ = packed_attention_forward(None, q, k, v, None, packed_segments=segments)  # [1, tokens, heads, dim]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)

    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for start, end in segments:
        qs, ks, vs = (t.detach()[:, :, start:end].double().requires_grad_() for t in (q, k, v))
        expected = _reference_attention(qs, ks, vs, groups=2)
        expected_grads = torch.autograd.grad(expected, (qs, ks, vs), grad_out[:, start:end].transpose(1, 2).double())
        torch.testing.assert_close(out[:, start:end].transpose(1, 2).double(), expected, atol=tolerance, rtol=tolerance)
        for got, want in zip((dq, dk, dv), expected_grads):
            torch.testing.assert_close(got[:, :, start:end].double(), want, atol=tolerance * 4, rtol=tolerance * 4)


def test_reduced_precision_on_cpu_calls_sdpa_with_a_bounded_set_of_lengths(monkeypatch):
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append((q.dtype, q.shape[2]))
        return real_sdpa(q, *args, **kwargs)

    monkeypatch.setattr(packed_attention.F, "scaled_dot_product_attention", spy)
    lengths = (3, 64, 65, 100, 130)
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, segments = _packed_inputs(lengths, dtype)
        packed_attention_forward(None, q, k, v, None, packed_segments=segments)
    multiple = CPU_REDUCED_PRECISION_LENGTH_MULTIPLE
    assert [n for dtype, n in seen if dtype == torch.bfloat16] == [-(-n // multiple) * multiple for n in lengths]
    assert [n for dtype, n in seen if dtype == torch.float32] == list(lengths)  # fp32 kernels keep nothing per length
