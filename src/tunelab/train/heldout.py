"""Held-out loss: the one function behind the trainer's val loss, `tunelab eval`, the exported model card, the
sweep's fixed held-out sets and the promotion gate.

The same assistant-only loss the trainer optimises (the loss module `AssistantLoss`, which it also calls), summed over
every assistant token of `rows` and divided by their count, so the figure does not depend on how the rows are batched.
`heldout_loss_per_adapter` scores one PEFT model under several adapter settings (adapter off = the base model,
the trained adapter, a second adapter loaded beside it): one load, exactly the same weights underneath.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import TypeVar

import torch

from tunelab.train.batching import make_batch
from tunelab.train.loss import AssistantLoss
from tunelab.train.precision import Precision

Example = tuple[list[int], list[int]]  # (input_ids, labels)
T = TypeVar("T")


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


BASE = None  # the adapter setting "every adapter off": the base model


def base_and_tuned(model) -> dict[str, str | None]:
    """The two settings `tunelab eval`, the model card and the sweep compare: the active adapter, then none."""
    return {"tuned": model.active_adapter, "base": BASE}


@contextmanager
def adapter_setting(model, adapter: str | None) -> Iterator[None]:
    """`model` (a PeftModel) with only `adapter` active, or with every adapter off (None); restored afterwards."""
    if adapter is BASE:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(previous)


def per_adapter(model, adapters: Mapping[str, str | None], measure: Callable[[], T]) -> dict[str, T]:
    """{name: measure()} with `model` under each adapter setting in turn (see `adapter_setting`)."""
    results = {}
    for name, adapter in adapters.items():
        with adapter_setting(model, adapter):
            results[name] = measure()
    return results


def heldout_loss_per_adapter(
    model, rows: list[Example], adapters: Mapping[str, str | None] | None = None, **kwargs
) -> dict[str, float]:
    """`heldout_loss` of one PEFT model under each adapter setting (default: `base_and_tuned`), on the same rows.
    `kwargs` are heldout_loss's (batch_size, packing, pad_id, precision, device, chunk_tokens)."""
    return per_adapter(model, adapters or base_and_tuned(model), lambda: heldout_loss(model, rows, **kwargs))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
