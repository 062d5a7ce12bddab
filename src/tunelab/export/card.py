"""The model card (README.md) of an export: what was tuned, on what, how well, and how to run it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunelab.config import Config

KNOWN_BASES = {  # embedded keys -> the Hub model they are a quantised copy of
    "embedded:smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "embedded:gemma3-270m": ("google/gemma-3-270m", "gemma"),
}


def base_model_and_license(cfg: Config) -> tuple[str, str]:
    if cfg.model.name in KNOWN_BASES:
        return KNOWN_BASES[cfg.model.name]
    return cfg.model.name, "see the base model's card"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def data_lines(cfg: Config, summary: dict) -> list[str]:
    lines = [
        f"- `{s.label}` (weight {s.weight}" + (f", at most {s.max_records} records" if s.max_records else "") + ")"
        for s in cfg.data.sources
    ]
    report = _read_json(Path(summary["data_dir"]) / "report.json") if summary.get("data_dir") else {}
    if "train_rows" in summary:
        lines.append(f"- {summary['train_rows']} training / {summary.get('val_rows', '?')} validation conversations")
    for key in ("sources", "per_source"):
        if isinstance(report.get(key), (dict, list)):
            lines.append(f"- per-source counts: `{json.dumps(report[key])[:400]}`")
            break
    return lines


def loss_lines(summary: dict, losses: dict) -> list[str]:
    lines = ["| model | val loss |", "|---|---|"]
    if losses.get("base") is not None:
        lines.append(f"| base | {losses['base']:.4f} |")
    if losses.get("tuned") is not None:
        lines.append(f"| tuned | {losses['tuned']:.4f} |")
    if len(lines) == 2:
        if summary.get("final_val_loss") is not None:
            return [f"Final validation loss of training: {summary['final_val_loss']:.4f} (base not measured)."]
        return ["No validation split was available on the exporting machine; run `tunelab eval RUN`."]
    return [f"Assistant-token cross-entropy on {losses['val_rows']} held-out conversations:", "", *lines]


def model_card(run_dir: Path, cfg: Config, losses: dict, gguf_files: list[str], parity_table: str) -> str:
    base, license_ = base_model_and_license(cfg)
    summary = _read_json(run_dir / "summary.json")
    lora = yaml.safe_dump(cfg.lora.model_dump(mode="json"), sort_keys=False).strip()
    train_keys = (
        "max_steps",
        "batch_size",
        "grad_accum",
        "lr",
        "warmup_steps",
        "scheduler",
        "max_seq_len",
        "packing",
        "seed",
    )
    train = yaml.safe_dump({k: getattr(cfg.train, k) for k in train_keys}, sort_keys=False).strip()
    gguf_list = "\n".join(f"- `{name}`" for name in gguf_files) or "- (none exported)"
    example_gguf = next((g for g in gguf_files if "q4_k_m" in g), gguf_files[0] if gguf_files else "model-f16.gguf")
    return f"""---
license: {license_ if " " not in license_ else "other"}
base_model: {base}
library_name: transformers
tags: [tunelab, lora, gguf, chat]
---
# {run_dir.resolve().name} (tunelab LoRA fine-tune of {base})

Fine-tuned with [tunelab](https://github.com/) (LoRA, CPU). The adapter is merged into the base weights;
this folder is a standard Hugging Face model (safetensors, tokenizer with its chat template).

## Base model
`{base}` (tunelab `model.name`: `{cfg.model.name}`). License of the base model: **{license_}**;
this fine-tune inherits it.

## Data
{chr(10).join(data_lines(cfg, summary))}

## Training
LoRA:
```yaml
{lora}
```
Training:
```yaml
{train}
```
{f"{summary.get('steps')} steps, {summary.get('tokens')} tokens, {summary.get('train_seconds')} s." if summary else ""}

## Evaluation
{chr(10).join(loss_lines(summary, losses))}

## GGUF files
{gguf_list}

Parity of the GGUF files with this merged fp32 model (greedy tokens on the same prompt ids):
```
{parity_table}
```

## How to run
transformers:
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
ids = tok.apply_chat_template([{{"role": "user", "content": "Hi!"}}], add_generation_prompt=True, return_tensors="pt")
print(tok.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:], skip_special_tokens=True))
```
llama.cpp (`pip install llama-cpp-python`):
```python
from llama_cpp import Llama
llm = Llama(model_path="{example_gguf}")  # the chat template and EOS come from the GGUF metadata
print(llm.create_chat_completion([{{"role": "user", "content": "Hi!"}}])["choices"][0]["message"]["content"])
```
tunelab: `tunelab chat {example_gguf}`.
"""
