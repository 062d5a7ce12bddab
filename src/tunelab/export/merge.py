"""Merge a run's LoRA adapter into its base and save a standard HF model folder (+ val loss base vs tuned)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunelab.io import atomic_folder
from tunelab.models.inference import turn_end_ids
from tunelab.models.runs import load_run_model, run_config
from tunelab.train.heldout import heldout_loss_per_adapter


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


def merge_run(run_dir: Path, out_dir: Path, val_limit: int = 16) -> dict:
    """Save base+adapter merged to `out_dir` (atomically); return val losses measured on the way."""
    model, tokenizer = load_run_model(run_dir, merge=False)
    rows = [(r["input_ids"], r["labels"]) for r in val_rows(run_dir, val_limit)]
    # The loss `tunelab eval` and the trainer report (one function), so the model card quotes the same figure.
    losses = {"val_rows": len(rows), "tuned": None}
    if rows:
        losses.update(heldout_loss_per_adapter(model, rows, batch_size=1, pad_id=tokenizer.pad_token_id or 0))
    merged = model.merge_and_unload()
    fix_generation_config(merged, tokenizer)
    with atomic_folder(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_sentencepiece_model(Path(merged.name_or_path), tmp)
    return losses


def save_base(run_dir: Path, out_dir: Path) -> Path:
    """Save the run's base model with the run's tokenizer and chat template (atomically), as the merge saves the
    merged one: the base that a GGUF LoRA of the adapter is applied to at run time."""
    model, tokenizer = load_run_model(run_dir, merge=False)
    base = model.unload()  # the LoRA layers removed, not merged
    fix_generation_config(base, tokenizer)
    with atomic_folder(out_dir) as tmp:
        base.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_sentencepiece_model(Path(base.name_or_path), tmp)
    return out_dir


def copy_sentencepiece_model(base_dir: Path, out_dir: Path) -> bool:
    """Carry the base folder's SentencePiece `tokenizer.model` over: saving a fast tokenizer does not write it, and
    llama.cpp's converter needs it for SentencePiece families (Gemma-3 without it stops at an unknown BPE
    pre-tokenizer). The merge changes no token, so the base's file is the merged model's."""
    src = base_dir / "tokenizer.model"
    if not src.is_file() or (out_dir / "tokenizer.model").exists():
        return False
    shutil.copyfile(src, out_dir / "tokenizer.model")
    return True
