"""`tunelab eval RUN_DIR`: base vs tuned on the same held-out split, plus sample generations.

Loss is the trainer's own assistant-token cross-entropy (tunelab.train.heldout), so numbers from
training, evaluation and the benchmark are comparable. The base model is the tuned model with its
adapter disabled: one load, exactly the same weights underneath.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.io import atomic_write
from tunelab.models.inference import greedy_reply
from tunelab.train.heldout import base_and_tuned, heldout_loss_per_adapter, per_adapter, perplexity


def evaluate_run(
    run_dir: str | Path, overrides: list[str] | None = None, verbose: bool = False, samples: bool = True
) -> dict:
    from tunelab.config import apply_overrides, config_from_dict
    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.models.runs import load_run_model, run_config
    from tunelab.train.architectures import use_plan
    from tunelab.train.objectives import heldout_examples
    from tunelab.train.precision import precision_for_this_machine
    from tunelab.train.recipe import set_threads

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if overrides:
        cfg = config_from_dict(apply_overrides(cfg.model_dump(mode="json"), overrides), str(run_dir / "config.yaml"))
    set_threads(cfg.train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision_for_this_machine(cfg.train.precision, device.type)
    _, val_set = load_prepared(prepare_dataset(cfg))
    val_rows = heldout_examples(cfg.train.objective, val_set)[: cfg.eval.max_val_rows or None]

    # A QLoRA run is scored as it was trained: its 4/8-bit base (bitsandbytes) + adapter, in the training precision;
    # "base" is that quantised base with the adapter off.
    model, tokenizer = load_run_model(run_dir, dtype=precision.dtype, device=device, cfg=cfg, base="quantized")
    own_attention = model.config._attn_implementation
    packing = use_plan(model, cfg.train.packing, log=print if verbose else lambda *_: None)
    losses = heldout_loss_per_adapter(
        model,
        val_rows,
        batch_size=cfg.eval.batch_size,
        packing=packing,
        pad_id=tokenizer.pad_token_id,
        precision=precision,
        device=device,
        chunk_tokens=cfg.train.loss_chunk_tokens,
    )
    tuned_loss, base_loss = losses["tuned"], losses["base"]
    model.config._attn_implementation = own_attention  # generation runs on the model's own attention
    report = {
        "run_dir": str(run_dir),
        "base_model": cfg.model.name,
        "val_rows": len(val_rows),
        "precision": precision.name,
        "base": {"val_loss": base_loss, "val_ppl": perplexity(base_loss)},
        "tuned": {"val_loss": tuned_loss, "val_ppl": perplexity(tuned_loss)},
        "improved": tuned_loss < base_loss,
        "samples": [],
    }
    if samples:
        for prompt in cfg.eval.prompts:
            messages = [{"role": "user", "content": prompt}]
            answers = per_adapter(
                model,
                base_and_tuned(model),
                lambda messages=messages: greedy_reply(model, tokenizer, messages, cfg.eval.max_new_tokens)[0],
            )
            report["samples"].append({"prompt": prompt, "base": answers["base"], "tuned": answers["tuned"]})
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    atomic_write(out / "eval.json", json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write(out / "samples.md", _samples_markdown(report))
    if verbose:
        _print_report(report, out)
    return report


def _samples_markdown(report: dict) -> str:
    lines = [
        f"# Evaluation of {report['run_dir']}",
        "",
        f"Held-out rows: {report['val_rows']} (precision {report['precision']})",
        "",
        "| model | val loss | perplexity |",
        "|---|---|---|",
        f"| base | {report['base']['val_loss']:.4f} | {report['base']['val_ppl']:.2f} |",
        f"| tuned | {report['tuned']['val_loss']:.4f} | {report['tuned']['val_ppl']:.2f} |",
        "",
    ]
    for sample in report["samples"]:
        lines += [
            f"## {sample['prompt']}",
            "",
            "**Base:**",
            "",
            sample["base"],
            "",
            "**Tuned:**",
            "",
            sample["tuned"],
            "",
        ]
    return "\n".join(lines)


def _print_report(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out loss ({report['val_rows']} conversations, assistant tokens only)")
    for column in ("model", "val loss", "perplexity"):
        table.add_column(column)
    for name in ("base", "tuned"):
        table.add_row(name, f"{report[name]['val_loss']:.4f}", f"{report[name]['val_ppl']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"samples and report: {out}/samples.md, {out}/eval.json")
