"""Reference log-probabilities for dpo/kto: computed once before training, cached next to the prepared data.

The reference policy is the base model: the LoRA model with its adapter disabled (peft `disable_adapter()`),
so no second model is loaded, and since it never changes its log-probs are computed once (no gradient,
batched) instead of once per step. They are stored in `<prepared data>/reference/<key>.pt`, where key hashes
the prepared data folder's config key, the model config, a fingerprint of the base weights, the precision and
the packing mode (all change the numbers), so a resumed run, a second run or a sweep reuses them.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from tunelab.config import Config
from tunelab.io import atomic_path
from tunelab.train.batching import make_batch
from tunelab.train.objectives import PairRow, ThumbRow
from tunelab.train.precision import Precision
from tunelab.train.preference import sequence_logps

CACHE_VERSION = 2  # raised whenever the way log-probs are computed changes, so older caches are recomputed


def sequences_of(row: PairRow | ThumbRow) -> list:
    return [row.chosen, row.rejected] if isinstance(row, PairRow) else [row.example, row.mismatched]


def store(row: PairRow | ThumbRow, values: list[float]) -> None:
    if isinstance(row, PairRow):
        row.ref_chosen, row.ref_rejected = values
    else:
        row.ref, row.ref_mismatched = values


def base_weights_fingerprint(model) -> str:
    """A hash of every frozen (non-LoRA) weight's sum: changes when the base model's weights change."""
    sums = [p.detach().float().sum().item() for name, p in model.named_parameters() if "lora_" not in name]
    return hashlib.sha256(json.dumps(sums).encode()).hexdigest()[:16]


def cache_path(cfg: Config, data_dir: Path, model, precision: Precision) -> Path:
    report = json.loads((data_dir / "report.json").read_text(encoding="utf-8"))
    payload = {
        "version": CACHE_VERSION,
        "data": report.get("config_key"),
        "model": cfg.model.model_dump(mode="json"),
        "weights": base_weights_fingerprint(model),
        "precision": precision.name,
        "packing": cfg.train.packing,
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return data_dir / "reference" / f"{key}.pt"


@torch.no_grad()
def reference_logps(
    model,
    rows: list,
    batch_size: int,
    packing: bool,
    pad_id: int,
    precision: Precision,
    device: torch.device,
    chunk_tokens: int,
) -> torch.Tensor:
    """[rows, 2] summed completion log-probs of each row's two sequences under the base model (adapter off)."""
    sequences = [s for row in rows for s in sequences_of(row)]
    out = torch.empty(len(sequences), dtype=torch.float32)
    was_training = model.training
    model.eval()
    with model.disable_adapter():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            batch = make_batch(chunk, packing, pad_id).to(device)
            with precision.autocast(device.type) if precision is not None else nullcontext():
                logps, _ = sequence_logps(model, batch, len(chunk), chunk_tokens)
            out[start : start + len(chunk)] = logps.float().cpu()
    model.train(was_training)
    return out.view(len(rows), 2)


def attach_reference_logps(
    cfg: Config,
    data_dir: Path,
    model,
    splits: dict[str, list],
    precision: Precision,
    pad_id: int,
    device: torch.device,
    log=print,
) -> Path:
    """Fill the reference log-probs of every row of `splits` ({"train": rows, "val": rows}), from the cache or
    computed."""
    path = cache_path(cfg, data_dir, model, precision)
    cached = torch.load(path, weights_only=True) if path.is_file() else {}
    if all(name in cached and cached[name].shape[0] == len(rows) for name, rows in splits.items()):
        log(f"reference log-probs: cached ({path})")
    else:
        log(f"reference log-probs: computing for {sum(map(len, splits.values()))} rows (base model, adapter disabled)")
        batch = cfg.eval.batch_size * 2
        cached = {
            name: reference_logps(
                model, rows, batch, cfg.train.packing, pad_id, precision, device, cfg.train.loss_chunk_tokens
            )
            for name, rows in splits.items()
        }
        with atomic_path(path) as tmp:
            torch.save(cached, tmp)
    for name, rows in splits.items():
        for row, values in zip(rows, cached[name].tolist()):
            store(row, values)
    return path
