"""Packing, per-conversation attention and the masked LM-head loss agree with the plain computation."""

from __future__ import annotations

import torch

from tests.helpers import full_logits_loss
from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.batching import epoch_order, pack, pad, step_indices
from tunelab.train.loss import masked_lm_loss
from tunelab.train.packed_attention import register


def _examples(seed=0, lengths=(7, 12, 5)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]  # second half is "assistant"
        out.append((ids, labels))
    return out


def _use_packed_attention(model):
    model.config._attn_implementation = register()
    return model


def test_pack_restarts_positions_and_shifts_targets_per_conversation():
    batch = pack(_examples(lengths=(4, 3)))
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch.segments == ((0, 4), (4, 7))
    # The last token of each conversation predicts nothing (no cross-conversation target).
    assert batch.targets[0, 3].item() == IGNORE_INDEX and batch.targets[0, 6].item() == IGNORE_INDEX


def test_packed_loss_equals_padded_loss(tiny_llama):
    examples = _examples()
    model = _use_packed_attention(tiny_llama)
    packed_loss, packed_n = masked_lm_loss(model, pack(examples))
    padded_loss, padded_n = full_logits_loss(model, pad(examples, pad_id=0))
    assert packed_n == padded_n > 0
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)


def test_packed_conversations_do_not_attend_to_each_other(tiny_llama):
    model = _use_packed_attention(tiny_llama)
    a, b = _examples(lengths=(6, 9))
    alone, _ = masked_lm_loss(model, pack([b]))
    together, _ = masked_lm_loss(model, pack([a, b]))
    first, _ = masked_lm_loss(model, pack([a]))
    torch.testing.assert_close(together, alone + first, rtol=1e-5, atol=1e-5)


def test_masked_loss_and_gradient_equal_full_logits(tiny_llama):
    model = _use_packed_attention(tiny_llama)
    batch = pack(_examples(seed=3))
    params = [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and p.shape[0] != 256]
    loss_a, _ = masked_lm_loss(model, batch, chunk_tokens=5)  # several chunks
    grads_a = torch.autograd.grad(loss_a, params)
    loss_b, _ = full_logits_loss(model, batch)
    grads_b = torch.autograd.grad(loss_b, params)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_step_indices_cover_each_epoch_once_and_are_deterministic():
    rows = 10
    seen = [i for step in range(5) for i in step_indices(step, 2, rows, seed=1)]
    assert sorted(seen) == list(range(rows))
    assert step_indices(0, 4, rows, seed=1) != step_indices(0, 4, rows, seed=2)


def test_step_indices_are_the_same_in_a_fresh_process():
    """What resume relies on: another process (no cache, fresh RNG state) computes the same batches."""
    import json
    import subprocess
    import sys

    expected = [step_indices(step, 4, 10, seed=3) for step in range(8)]
    epoch_order.cache_clear()
    torch.manual_seed(123)  # the global RNG must not matter
    assert [step_indices(step, 4, 10, seed=3) for step in range(8)] == expected
    code = (
        "import json; from tunelab.train.batching import step_indices; "
        "print(json.dumps([step_indices(s, 4, 10, seed=3) for s in range(8)]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == expected
