"""`tunelab export`: merge -> GGUF f16 -> quantise -> parity check -> model card (the Space bundle and the Hub
push come after it: tunelab.serve.space, tunelab.hub).

    RUN/export/merged/          HF model (safetensors, tokenizer + chat template, generation_config, README.md)
    RUN/export/model-*.gguf     as asked with --gguf
    RUN/export/adapter-f16.gguf the adapter as a GGUF LoRA, with RUN/export/base-*.gguf (--adapter-gguf): one base
                                in memory serves several adapters, chosen per request (llama-server --lora)
    RUN/export/parity.json      the parity report (also printed as a table)
    RUN/export/export.json      what was written and how long each step took
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from tunelab.errors import UserError
from tunelab.export.gguf import QUANT_TYPES, convert_hf_to_gguf, quantize_gguf
from tunelab.io import atomic_write

log = print
ADAPTER_GGUF = "adapter-f16.gguf"  # in RUN/export/, with the unmerged base as BASE_GGUF
BASE_GGUF = "base-{quant}.gguf"


def parse_quants(text: str, option: str = "--gguf") -> list[str]:
    quants = [q.strip().lower() for q in text.split(",") if q.strip()]
    unknown = [q for q in quants if q not in QUANT_TYPES]
    if unknown or not quants:
        raise UserError(f"{option}: unknown type `{unknown[0] if unknown else text}` (known: {', '.join(QUANT_TYPES)})")
    return list(dict.fromkeys(quants))


def export_run(
    run_dir: Path,
    quants: list[str],
    threads: int | None = None,
    merge_into: str | None = None,
    adapter_gguf: bool = False,
) -> dict:
    """Merge, GGUF files, parity, model card. Raises ParityError (a UserError) when the f16 GGUF is wrong.

    A QLoRA run is merged into `merge_into` (tunelab.models.runs.QLORA_BASES: `dequantized`, the default, or
    `original`); both merges are measured against the trained 4-bit model and recorded in parity.json."""
    from tunelab.export.card import model_card
    from tunelab.export.merge import compare_qlora_merges, merge_run, val_rows
    from tunelab.export.parity import parity_table, quantisation_warnings, raise_if_failed, run_parity
    from tunelab.export.quant_choice import recommend_quant
    from tunelab.models.runs import DEFAULT_QLORA_BASE, is_quantized_run, run_config

    cfg = run_config(run_dir)
    quantized = is_quantized_run(cfg)
    if merge_into is not None and not quantized:
        raise UserError("--merge-into: only for a QLoRA run (model.load_in_4bit/8bit); this run has one base")
    merge_into = (merge_into or DEFAULT_QLORA_BASE) if quantized else None
    export_dir = run_dir / "export"
    export_dir.mkdir(exist_ok=True)
    merged_dir = export_dir / "merged"
    timings: dict[str, float] = {}

    started = time.perf_counter()
    qlora_merges = None
    if quantized:
        log(">> QLoRA: both merges (dequantised 4-bit weights, original base) vs the trained 4-bit model")
        log(f">> merging adapter into {cfg.model.name} ({merge_into} weights) -> {merged_dir}")
        qlora_merges, losses = compare_qlora_merges(
            run_dir, cfg.eval.prompts, cfg.eval.max_new_tokens, export=(merge_into, merged_dir)
        )
        for base, row in qlora_merges["merges"].items():
            log(
                f"   into {base:<11} val loss {_fmt(row['val_loss'])} "
                f"(trained {_fmt(qlora_merges['trained']['val_loss'])}),"
                f" greedy {row['greedy_exact']}/{qlora_merges['prompts']} exact"
            )
    else:
        log(f">> merging adapter into {cfg.model.name} -> {merged_dir}")
        losses = merge_run(run_dir, merged_dir)
    timings["merge_s"] = time.perf_counter() - started  # a QLoRA run's: both merges measured, one saved

    # f16 is always made: it is the quantiser's input and the parity reference; dropped later if not asked.
    step = time.perf_counter()
    log(">> converting to GGUF f16 with llama.cpp's convert_hf_to_gguf.py")
    f16 = convert_hf_to_gguf(merged_dir, export_dir / "model-f16.gguf", "f16")
    timings["gguf_f16_s"] = time.perf_counter() - step
    ggufs = {"f16": f16}
    for quant in [q for q in quants if q != "f16"]:
        step = time.perf_counter()
        log(f">> quantising to {quant}")
        ggufs[quant] = quantize_gguf(f16, export_dir / f"model-{quant}.gguf", quant, threads)
        timings[f"gguf_{quant}_s"] = time.perf_counter() - step

    step = time.perf_counter()
    log(">> parity check: merged HF fp32 vs each GGUF in llama.cpp")
    rows = val_rows(run_dir, limit=8)
    report = run_parity(merged_dir, ggufs, [r["input_ids"][:256] for r in rows] or None, threads=threads)
    timings["parity_s"] = time.perf_counter() - step
    if qlora_merges is not None:
        report["qlora_merges"] = qlora_merges
    atomic_write(export_dir / "parity.json", json.dumps(report, indent=2))
    table = parity_table(report)
    log(table)
    raise_if_failed(report)  # before anything is published
    warnings = quantisation_warnings(report)
    for line in warnings:
        log(line)
    recommended = recommend_quant(
        [{"quant": g["quant"], "ppl": g["ppl_gguf"], "decode_tok_s": g["decode_tok_s"]} for g in report["ggufs"]]
    )
    if recommended:
        log(f">> recommended for a CPU Space: {recommended['reason']}")

    if "f16" not in quants:
        f16.unlink()
        ggufs.pop("f16")
    adapter_files = export_adapter_gguf(run_dir, export_dir, quants, threads) if adapter_gguf else {}
    gguf_names = [p.name for p in ggufs.values()]
    card = model_card(run_dir, cfg, losses, gguf_names, table)
    atomic_write(merged_dir / "README.md", card)

    timings["total_s"] = time.perf_counter() - started
    timings["merge_f16_q4_k_m_s"] = timings["merge_s"] + timings["gguf_f16_s"] + timings.get("gguf_q4_k_m_s", 0.0)
    summary = {
        "run_dir": str(run_dir),
        "merged": str(merged_dir),
        "ggufs": {q: str(p) for q, p in ggufs.items()},
        "val_loss": losses,
        "adapter_gguf": {name: str(path) for name, path in adapter_files.items()},
        "merged_into": merge_into,
        "recommended_quant": recommended,
        "warnings": warnings,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    atomic_write(export_dir / "export.json", json.dumps(summary, indent=2))
    log(f">> export done in {timings['total_s']:.1f} s (merge + f16 + q4_k_m: {timings['merge_f16_q4_k_m_s']:.1f} s)")
    return summary


def export_adapter_gguf(run_dir: Path, export_dir: Path, quants: list[str], threads: int | None) -> dict[str, Path]:
    """adapter-f16.gguf (the LoRA) and base-<quant>.gguf for each asked type (the unmerged base, same template)."""
    from tunelab.export.gguf import convert_lora_to_gguf

    log(">> writing the adapter as a GGUF LoRA and the base it applies to")
    written = {"adapter": convert_lora_to_gguf(run_dir / "adapter", export_dir / "merged", export_dir / ADAPTER_GGUF)}
    bases = export_base_ggufs(run_dir, {quant: export_dir / BASE_GGUF.format(quant=quant) for quant in quants}, threads)
    return written | {f"base-{quant}": path for quant, path in bases.items()}


def export_base_ggufs(run_dir: Path, targets: dict[str, Path], threads: int | None = None) -> dict[str, Path]:
    """The run's base model without its adapter (for a QLoRA run the dequantised 4-bit weights the adapter was
    trained on), with the run's tokenizer and chat template, as a GGUF file per type: {quant: path}.

    The HF folder and f16 file in between live in a temp folder beside the first target; the folder is named `base`
    because llama.cpp's converter names the model after it, so every base GGUF of a run is the same bytes."""

    from tunelab.export.merge import save_base

    work = next(iter(targets.values())).parent / f".base-gguf.tmp-{os.getpid()}"
    try:
        hf_folder = save_base(run_dir, work / "base")
        f16 = convert_hf_to_gguf(hf_folder, targets.get("f16", work / "base-f16.gguf"), "f16")
        for quant, target in targets.items():
            if quant != "f16":
                quantize_gguf(f16, target, quant, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return targets


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
