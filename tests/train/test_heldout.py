"""The one held-out loss (train/heldout.py): what the trainer logs, `tunelab eval` reports and the model card quotes."""

from __future__ import annotations

import torch

from tests.helpers import build_tiny_llama
from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.heldout import heldout_loss


def rows(n=6, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = length // 3
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def hf_reference(model, examples) -> float:
    """Plain transformers: model(input_ids, labels=...) per conversation, averaged over assistant tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            n = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            total += float(loss) * n
            count += n
    return total / count


def test_heldout_loss_is_transformers_loss_per_assistant_token_whatever_the_batching():
    model = build_tiny_llama()
    examples = rows()
    reference = hf_reference(model, examples)
    for batch_size in (1, 4, 8):
        assert abs(heldout_loss(model, examples, batch_size=batch_size, pad_id=0) - reference) < 1e-4


def test_export_and_eval_share_the_function():
    """The model card's losses (export/merge.py) and `tunelab eval` call the same function as the trainer."""
    import inspect

    from tunelab.eval import evaluate
    from tunelab.export import merge
    from tunelab.train import objectives

    for module in (evaluate, merge, objectives):
        assert "heldout_loss(" in inspect.getsource(module), module.__name__
        assert "cross_entropy" not in inspect.getsource(module), module.__name__
