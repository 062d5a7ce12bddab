"""Micro-batches without compute on padding.

`pack` concatenates a micro-batch's conversations into one row: position ids restart at 0 for each
conversation and `segments` tells the packed attention (tunelab.train.packed_attention) where each one
starts and ends, so conversations never attend to each other. `pad` is the plain alternative (one row per
conversation, right-padded, attention mask) used when `train.packing: false` and as the reference in tests.

Targets are shifted per conversation (target[t] = label[t + 1], last = -100), so a packed row never
asks a conversation's last token to predict the next conversation's first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from tunelab.data.masking import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, T]
    position_ids: torch.Tensor  # [rows, T]
    targets: torch.Tensor  # [rows, T], IGNORE_INDEX where no loss
    attention_mask: torch.Tensor | None = None  # [rows, T] for padded batches, None when packed
    segments: tuple[tuple[int, int], ...] | None = None  # packed row: (start, end) of each conversation

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def model_kwargs(self) -> dict:
        kwargs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.segments is not None:
            kwargs["packed_segments"] = self.segments
        else:
            kwargs["attention_mask"] = self.attention_mask
        return kwargs

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.position_ids), move(self.targets), move(self.attention_mask), self.segments
        )


def shifted_targets(labels: list[int]) -> list[int]:
    return list(labels[1:]) + [IGNORE_INDEX]


def pack(examples: list[tuple[list[int], list[int]]]) -> Batch:
    """examples: (input_ids, labels) pairs -> one packed row."""
    ids, pos, tgt, segments = [], [], [], []
    for input_ids, labels in examples:
        start = len(ids)
        ids.extend(input_ids)
        pos.extend(range(len(input_ids)))
        tgt.extend(shifted_targets(labels))
        segments.append((start, len(ids)))
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return Batch(as_row(ids), as_row(pos), as_row(tgt), None, tuple(segments))


def pad(examples: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _ in examples)
    rows = len(examples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    targets = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, (ids, labels) in enumerate(examples):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        targets[r, :n] = torch.tensor(shifted_targets(labels))
        mask[r, :n] = 1
    position_ids = torch.arange(width).unsqueeze(0).expand(rows, -1).contiguous()
    return Batch(input_ids, position_ids, targets, mask, None)


def make_batch(examples: list[tuple[list[int], list[int]]], packing: bool, pad_id: int) -> Batch:
    return pack(examples) if packing else pad(examples, pad_id)


@lru_cache(maxsize=4)
def epoch_order(num_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A fixed permutation per (seed, epoch): the data order is a pure function of the step number."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_rows, generator=generator).tolist())


def step_indices(step: int, per_step: int, num_rows: int, seed: int) -> list[int]:
    """Row indices used by optimizer step `step` (0-based): consecutive slices of per-epoch permutations."""
    start = step * per_step
    indices = []
    for flat in range(start, start + per_step):
        epoch, offset = divmod(flat, num_rows)
        indices.append(epoch_order(num_rows, seed, epoch)[offset])
    return indices
