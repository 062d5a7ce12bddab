"""Merge a run's LoRA adapter into its base and save a standard HF model folder (+ val loss base vs tuned)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from tunelab.models.runs import load_run_model, run_config


def turn_end_ids(model, tokenizer) -> list[int]:
    """The ids that end an assistant turn: the tokenizer's EOS (<|im_end|> for ChatML) first."""
    ids = [tokenizer.eos_token_id]
    configured = model.generation_config.eos_token_id
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def fix_generation_config(model, tokenizer) -> None:
    """generation_config.json must stop at the chat template's turn end, or plain generate() runs on."""
    eos = turn_end_ids(model, tokenizer)
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = eos[0]


def val_rows(run_dir: Path, limit: int = 16) -> list[dict]:
    """Up to `limit` held-out rows (input_ids, labels) of the run's prepared data, or [] when absent."""
    summary_file = run_dir / "summary.json"
    data_dir = json.loads(summary_file.read_text()).get("data_dir") if summary_file.is_file() else None
    cfg_dir = run_config(run_dir).data.output_dir
    for candidate in (data_dir, cfg_dir):
        if candidate and (Path(candidate) / "val").is_dir():
            from datasets import load_from_disk

            val = load_from_disk(str(Path(candidate) / "val"))
            n = min(limit, len(val))
            return [{"input_ids": val[i]["input_ids"], "labels": val[i]["labels"]} for i in range(n)]
    return []


@torch.inference_mode()
def assistant_loss(model, rows: list[dict]) -> float | None:
    """Mean cross-entropy per assistant token (labels != -100), like the trainer's validation loss."""
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        mask = target != -100
        if mask.any():
            total += float(torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum"))
            count += int(mask.sum())
    return total / count if count else None


def merge_run(run_dir: Path, out_dir: Path, val_limit: int = 16) -> dict:
    """Save base+adapter merged to `out_dir` (atomically); return val losses measured on the way."""
    model, tokenizer = load_run_model(run_dir, merge=False)
    rows = val_rows(run_dir, val_limit)
    losses = {"val_rows": len(rows), "tuned": assistant_loss(model, rows) if rows else None}
    if rows:
        with model.disable_adapter():
            losses["base"] = assistant_loss(model, rows)
    merged = model.merge_and_unload()
    fix_generation_config(merged, tokenizer)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return losses
