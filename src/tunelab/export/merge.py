"""Merge a run's LoRA adapter into its base and save a standard HF model folder (+ val loss base vs tuned)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunelab.io import atomic_folder
from tunelab.models.inference import greedy_tokens, turn_end_ids
from tunelab.models.runs import load_run_model, run_config
from tunelab.train.heldout import heldout_loss, heldout_loss_per_adapter


def fix_generation_config(model, tokenizer) -> None:
    """generation_config.json must stop at the chat template's turn end, or plain generate() runs on."""
    eos = turn_end_ids(model, tokenizer)
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = eos[0]


def val_rows(run_dir: Path, limit: int = 16) -> list[dict]:
    """Up to `limit` held-out rows (input_ids, labels) of the run's prepared data, or [] when absent: the
    conversations of an sft run, the chosen completions of a dpo run, the thumbs-up ones of a kto run."""
    from tunelab.train.objectives import heldout_examples

    summary_file = run_dir / "summary.json"
    data_dir = json.loads(summary_file.read_text()).get("data_dir") if summary_file.is_file() else None
    cfg = run_config(run_dir)
    for candidate in (data_dir, cfg.data.output_dir):
        if candidate and (Path(candidate) / "val").is_dir():
            from datasets import load_from_disk

            val = load_from_disk(str(Path(candidate) / "val"))
            rows = heldout_examples(cfg.train.objective, val)[:limit]
            return [{"input_ids": ids, "labels": labels} for ids, labels in rows]
    return []


def merge_run(run_dir: Path, out_dir: Path, val_limit: int = 16, merge_into: str | None = None) -> dict:
    """Save base+adapter merged to `out_dir` (atomically); return val losses measured on the way. A QLoRA run's
    adapter is merged into `merge_into` (tunelab.models.runs.QLORA_BASES; default: the dequantised 4-bit weights)."""
    model, tokenizer = load_run_model(run_dir, merge=False, base=merge_into)
    losses, _ = merge_and_save(model, tokenizer, val_rows(run_dir, val_limit), out_dir)
    return losses


def merge_and_save(model, tokenizer, rows: list[dict], out_dir: Path) -> tuple[dict, object]:
    """(held-out losses base vs tuned on `rows`, the merged model) for a loaded PeftModel, merged and saved to
    `out_dir` atomically."""
    examples = [(r["input_ids"], r["labels"]) for r in rows]
    # The loss `tunelab eval` and the trainer report (one function), so the model card quotes the same figure.
    losses = {"val_rows": len(examples), "tuned": None}
    if examples:
        losses.update(heldout_loss_per_adapter(model, examples, batch_size=1, pad_id=tokenizer.pad_token_id or 0))
    merged = model.merge_and_unload()
    save_hf_folder(merged, tokenizer, out_dir)
    return losses, merged


def save_base(run_dir: Path, out_dir: Path) -> Path:
    """Save the run's base model with the run's tokenizer and chat template (atomically), as the merge saves the
    merged one: the base that a GGUF LoRA of the adapter is applied to at run time."""
    model, tokenizer = load_run_model(run_dir, merge=False)
    return save_hf_folder(model.unload(), tokenizer, out_dir)  # unload: the LoRA layers removed, not merged


def save_hf_folder(model, tokenizer, out_dir: Path) -> Path:
    """A plain HF model folder (safetensors, tokenizer with the run's chat template, generation config that stops
    at the turn end), written atomically: what llama.cpp's converter and `from_pretrained` read."""
    fix_generation_config(model, tokenizer)
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_sentencepiece_model(Path(model.name_or_path), tmp)
    return out_dir


def compare_qlora_merges(
    run_dir: Path, prompts: list[str], max_new_tokens: int, export: tuple[str, Path], val_limit: int = 16
) -> tuple[dict, dict]:
    """A QLoRA run's two merges against the trained model (4/8-bit base + adapter, bitsandbytes, fp32 compute):
    held-out loss on the same rows and greedy agreement on the same prompts. The merge `export` names, (base,
    folder), is the one saved there, as `merge_run` saves it, so no model is loaded twice; its base-vs-tuned losses
    are returned beside the report. One model in memory at a time."""
    import torch

    from tunelab.export.parity import common_prefix, prompt_token_ids
    from tunelab.models.runs import DEFAULT_QLORA_BASE, QLORA_BASES

    exported_base, out_dir = export
    rows = val_rows(run_dir, val_limit)
    examples = [(r["input_ids"], r["labels"]) for r in rows]
    export_losses: dict = {}

    def measure(base: str) -> tuple[float | None, list[list[int]]]:
        model, tokenizer = load_run_model(run_dir, dtype=torch.float32, base=base)
        if base == exported_base:
            losses, model = merge_and_save(model, tokenizer, rows, out_dir)
            export_losses.update(losses)
        elif base != "quantized":
            model = model.merge_and_unload()
        pad = tokenizer.pad_token_id or 0
        loss = heldout_loss(model, examples, batch_size=1, pad_id=pad) if examples else None
        eos = turn_end_ids(model, tokenizer)
        tokens = [greedy_tokens(model, ids, max_new_tokens, eos)[0] for ids in prompt_token_ids(tokenizer, prompts)]
        del model
        return loss, tokens

    trained_loss, trained_tokens = measure("quantized")
    report = {
        "reference": "the trained model: its 4/8-bit base (bitsandbytes layers) + adapter, fp32 compute",
        "default": DEFAULT_QLORA_BASE,
        "exported": exported_base,
        "why": "the adapter was trained against the dequantised weights: merged into them it is the trained model "
        "(up to float rounding); merged into the original base, the quantisation error it learned around comes back",
        "val_rows": len(examples),
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "trained": {"val_loss": trained_loss},
        "merges": {},
    }
    for base in ("dequantized", "original"):
        loss, tokens = measure(base)
        agreement = [common_prefix(a, b) / max(len(a), len(b), 1) for a, b in zip(trained_tokens, tokens)]
        report["merges"][base] = {
            "what": QLORA_BASES[base],
            "val_loss": loss,
            "val_loss_delta": None if loss is None or trained_loss is None else loss - trained_loss,
            "greedy_exact": sum(a == b for a, b in zip(trained_tokens, tokens)),
            "greedy_agreement": sum(agreement) / max(len(agreement), 1),
        }
    return report, export_losses


def copy_sentencepiece_model(base_dir: Path, out_dir: Path) -> bool:
    """Carry the base folder's SentencePiece `tokenizer.model` over: saving a fast tokenizer does not write it, and
    llama.cpp's converter needs it for SentencePiece families (Gemma-3 without it stops at an unknown BPE
    pre-tokenizer). The merge changes no token, so the base's file is the merged model's."""
    src = base_dir / "tokenizer.model"
    if not src.is_file() or (out_dir / "tokenizer.model").exists():
        return False
    shutil.copyfile(src, out_dir / "tokenizer.model")
    return True
