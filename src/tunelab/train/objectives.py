"""What one training step optimises (`train.objective`): the loop asks its objective for five things.

    loss_module(model)                   -> the module whose forward gives a micro-batch's summed loss (DDP/FSDP
                                            wrap it, so their hooks run around the forward)
    step_weight(indices)                 -> what the summed micro-batch losses of a step are divided by
    step_flops(shape, indices, weight)   -> the step's model FLOPs (train/flops.py), for MFU
    micro_batch(indices, device)         -> (inputs for the loss module, tokens in them)
    evaluate(model, device)              -> held-out figures ({"val_loss": ..., ...}) for metrics.jsonl and summary.json

- sft: summed assistant-token cross-entropy / assistant tokens of the step (train/loss.py).
- dpo: summed per-pair DPO loss / pairs in the step; a micro-batch of B pairs is one batch of 2B sequences
  (chosen..., rejected...), so one forward. Reference log-probs come with the rows (train/reference.py).
- kto: summed per-row KTO loss / rows in the step. Each row's mismatched pair (its prompt with the previous
  row's completion, in prepared order) gives the KL estimate: its policy log-prob is one extra forward
  without gradient per micro-batch (as in TRL), its reference log-prob is cached like the others.
Dividing by the whole step's count makes gradient accumulation and DDP equal one big batch, as for sft.

Held-out preference figures: `val_pref_accuracy` (dpo: chosen reward > rejected reward; kto: the reward's
sign agrees with the thumb) and `val_reward_margin` (mean chosen - rejected reward; kto: mean desirable reward
- mean undesirable reward), rewards being beta x (log pi - log ref) as in TRL's logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.config import EvalConfig, TrainConfig
from tunelab.data.masking import IGNORE_INDEX
from tunelab.train.batching import Batch, make_batch
from tunelab.train.flops import training_flops
from tunelab.train.heldout import Example, heldout_loss, perplexity
from tunelab.train.loss import AssistantLoss
from tunelab.train.precision import Precision
from tunelab.train.preference import dpo_loss, kto_kl, kto_loss, sequence_logps


@dataclass
class PairRow:
    """One DPO pair with its reference log-probs (filled by train/reference.py)."""

    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


@dataclass
class ThumbRow:
    """One KTO row; `mismatched` is its prompt with another row's completion (the KL estimate)."""

    example: Example
    desirable: bool
    mismatched: Example
    ref: float = 0.0
    ref_mismatched: float = 0.0


def pair_rows(dataset) -> list[PairRow]:
    columns = [dataset[c] for c in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")]
    return [PairRow((ci, cl), (ri, rl)) for ci, cl, ri, rl in zip(*columns)]


def thumb_rows(dataset) -> list[ThumbRow]:
    """Rows with their mismatched pair: prompt of row i + completion of row i-1 (TRL rotates the same way)."""
    ids, labels, prompt_lens, thumbs = dataset["input_ids"], dataset["labels"], dataset["prompt_len"], dataset["label"]
    rows = []
    for i, (row_ids, row_labels, n, thumb) in enumerate(zip(ids, labels, prompt_lens, thumbs)):
        other_ids, other_labels, m = ids[i - 1], labels[i - 1], prompt_lens[i - 1]  # row 0 takes the last row's
        rows.append(
            ThumbRow((row_ids, row_labels), thumb, (row_ids[:n] + other_ids[m:], row_labels[:n] + other_labels[m:]))
        )
    return rows


def objective_rows(objective: str, dataset) -> list:
    """The rows `make_objective(objective)` trains on, from a prepared split."""
    if objective == "dpo":
        return pair_rows(dataset)
    if objective == "kto":
        return thumb_rows(dataset)
    from tunelab.data.prepare import TokenRows

    return TokenRows(dataset)  # read on demand from the memory-mapped Arrow data: bounded memory at any size


def heldout_examples(objective: str, dataset) -> list[Example]:
    """The (input_ids, labels) rows a plain held-out LM loss is computed on (`tunelab eval`, base vs tuned):
    every conversation for sft, the chosen completions for dpo, the thumbs-up completions for kto."""
    if objective == "dpo":
        return list(zip(dataset["chosen_input_ids"], dataset["chosen_labels"]))
    if objective == "kto":
        return [
            (ids, labels)
            for ids, labels, good in zip(dataset["input_ids"], dataset["labels"], dataset["label"])
            if good
        ]
    return list(zip(dataset["input_ids"], dataset["labels"]))


class SftObjective:
    def __init__(self, train_rows, val_rows, cfg: TrainConfig, eval_cfg: EvalConfig, pad_id: int, precision: Precision):
        self.train_rows, self.val_rows, self.cfg, self.eval_cfg = train_rows, val_rows, cfg, eval_cfg
        self.pad_id, self.precision = pad_id, precision
        self.step_rows: dict[int, Example] = {}

    def loss_module(self, model) -> torch.nn.Module:
        return AssistantLoss(model, self.cfg.loss_chunk_tokens)

    def step_weight(self, indices: list[int]) -> int:
        self.step_rows = {i: self.train_rows[i] for i in indices}  # read once per step (memory-mapped rows)
        return sum(sum(1 for x in self.step_rows[i][1][1:] if x != IGNORE_INDEX) for i in indices)

    def step_flops(self, shape, indices: list[int], step_weight: int) -> float:
        """Model FLOPs of the step (train/flops.py): every conversation, the LM head on its assistant tokens."""
        return training_flops(shape, [len(self.step_rows[i][0]) for i in indices], step_weight)

    def micro_batch(self, indices: list[int], device) -> tuple[Batch, int]:
        rows = [self.step_rows[i] if i in self.step_rows else self.train_rows[i] for i in indices]
        batch = make_batch(rows, self.cfg.packing, self.pad_id).to(device)
        return batch, batch.num_tokens

    def evaluate(self, model, device, loss_module: torch.nn.Module | None = None) -> dict[str, float]:
        """Held-out loss and perplexity; `loss_module`: the wrapped one under FSDP (see heldout_loss)."""
        loss = heldout_loss(
            model,
            self.val_rows,
            self.eval_cfg.batch_size,
            self.cfg.packing,
            self.pad_id,
            self.precision,
            device,
            self.cfg.loss_chunk_tokens,
            loss_module,
        )
        return {"val_loss": loss, "val_ppl": perplexity(loss)}


@dataclass
class PreferenceInputs:
    """One micro-batch for PreferenceLoss: sequences in one batch, what the loss needs besides their log-probs."""

    batch: Batch
    num_sequences: int
    ref: torch.Tensor  # dpo: [2B] chosen then rejected; kto: [B]
    desirable: torch.Tensor | None = None  # kto
    mismatched: Batch | None = None  # kto
    ref_mismatched: torch.Tensor | None = None  # kto


class PreferenceLoss(torch.nn.Module):
    """`forward(inputs)` = summed dpo/kto loss of a micro-batch. A module (like AssistantLoss) so that DDP/FSDP
    hooks run around the forward."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, inputs: PreferenceInputs) -> torch.Tensor:
        return self.score(inputs)[0]

    def score(self, inputs: PreferenceInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, rewards of chosen/desirable completions, rewards of rejected/undesirable ones)."""
        cfg = self.cfg
        logps, counts = sequence_logps(self.model, inputs.batch, inputs.num_sequences, cfg.loss_chunk_tokens)
        if cfg.objective == "dpo":
            half = inputs.num_sequences // 2
            losses, chosen, rejected = dpo_loss(
                logps[:half],
                logps[half:],
                inputs.ref[:half],
                inputs.ref[half:],
                cfg.beta,
                cfg.dpo_loss,
                counts[:half],
                counts[half:],
            )
            return losses.sum(), chosen, rejected
        with torch.no_grad():
            mismatched, _ = sequence_logps(self.model, inputs.mismatched, inputs.num_sequences, cfg.loss_chunk_tokens)
        kl = kto_kl(mismatched, inputs.ref_mismatched)
        losses, rewards = kto_loss(
            logps, inputs.ref, inputs.desirable, kl, cfg.beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight
        )
        return losses.sum(), rewards[inputs.desirable], rewards[~inputs.desirable]


class PreferenceObjective:
    def __init__(
        self,
        train_rows: list,
        val_rows: list,
        cfg: TrainConfig,
        eval_cfg: EvalConfig,
        pad_id: int,
        precision: Precision,
    ):
        self.train_rows, self.val_rows, self.cfg, self.eval_cfg = train_rows, val_rows, cfg, eval_cfg
        self.pad_id, self.precision = pad_id, precision

    def loss_module(self, model) -> torch.nn.Module:
        return PreferenceLoss(model, self.cfg)

    def step_weight(self, indices: list[int]) -> int:
        return len(indices)

    def step_flops(self, shape, indices: list[int], step_weight: int) -> float:
        """Model FLOPs of the trained sequences (dpo: chosen + rejected; kto: the completions); KTO's no-grad
        forward of the mismatched pairs (the KL estimate) is not counted."""
        rows = [self.train_rows[i] for i in indices]
        sequences = [s for r in rows for s in ((r.chosen, r.rejected) if self.cfg.objective == "dpo" else (r.example,))]
        labelled = sum(sum(1 for x in labels[1:] if x != IGNORE_INDEX) for _, labels in sequences)
        return training_flops(shape, [len(ids) for ids, _ in sequences], labelled)

    def inputs(self, rows: list, device) -> PreferenceInputs:
        if self.cfg.objective == "dpo":
            sequences = [r.chosen for r in rows] + [r.rejected for r in rows]
            ref = torch.tensor([r.ref_chosen for r in rows] + [r.ref_rejected for r in rows])
            return PreferenceInputs(
                make_batch(sequences, self.cfg.packing, self.pad_id).to(device), len(sequences), ref.to(device)
            )
        return PreferenceInputs(
            make_batch([r.example for r in rows], self.cfg.packing, self.pad_id).to(device),
            len(rows),
            torch.tensor([r.ref for r in rows], device=device),
            torch.tensor([r.desirable for r in rows], device=device),
            make_batch([r.mismatched for r in rows], self.cfg.packing, self.pad_id).to(device),
            torch.tensor([r.ref_mismatched for r in rows], device=device),
        )

    def micro_batch(self, indices: list[int], device) -> tuple[PreferenceInputs, int]:
        inputs = self.inputs([self.train_rows[i] for i in indices], device)
        return inputs, inputs.batch.num_tokens

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        """Held-out preference loss, accuracy and reward margin over the val rows, in a fixed order."""
        if not self.val_rows:
            raise ValueError("validation split is empty")
        module = PreferenceLoss(model, self.cfg)
        model.eval()
        total, chosen, rejected = 0.0, [], []
        for start in range(0, len(self.val_rows), self.eval_cfg.batch_size):
            inputs = self.inputs(self.val_rows[start : start + self.eval_cfg.batch_size], device)
            with self.precision.autocast(device.type):
                loss, c, r = module.score(inputs)
            total += float(loss)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        if self.cfg.objective == "dpo":
            accuracy = (chosen > rejected).float().mean().item()
            margin = (chosen - rejected).mean().item()
        else:
            accuracy = (torch.cat([chosen > 0, rejected < 0])).float().mean().item()
            margin = (chosen.mean() if len(chosen) else torch.tensor(0.0)).item() - (
                rejected.mean() if len(rejected) else torch.tensor(0.0)
            ).item()
        return {
            "val_loss": total / len(self.val_rows),
            "val_pref_accuracy": accuracy,
            "val_reward_margin": margin,
            "val_chosen_reward": chosen.mean().item() if len(chosen) else 0.0,
            "val_rejected_reward": rejected.mean().item() if len(rejected) else 0.0,
        }


def make_objective(
    train_rows: list, val_rows: list, cfg: TrainConfig, eval_cfg: EvalConfig, pad_id: int, precision: Precision
):
    kind = SftObjective if cfg.objective == "sft" else PreferenceObjective
    return kind(train_rows, val_rows, cfg, eval_cfg, pad_id, precision)
