"""`tunelab bench infer --quants ...`: which llama.cpp quantisation to ship on a CPU Space.

For one model (a run's merged export, or the base model when no run is given) the f16 GGUF is quantised to each
type, and every file is measured the same way: decode tokens/s and time to first token through the app's own
ChatBackend (tunelab.bench.infer.measure_model, one fresh process per file), file size, held-out perplexity
through llama.cpp on the validation conversations, and the memory-bandwidth bound on decode (file bytes per
token over the copy bandwidth measured here). The recommendation is tunelab.export.quant_choice's: the fastest
file within its perplexity tolerance of q8_0.

q4_0 is listed for llama.cpp's runtime repacking: builds with REPACK (see `llama_print_system_info`) re-lay q4_0
weights at load time for their AVX2/AVX-512 kernels; `repack` in the report says whether this build does.
"""

from __future__ import annotations

import math
import multiprocessing
from pathlib import Path

from tunelab.errors import UserError

DEFAULT_QUANTS = ("q4_k_m", "q4_0", "q5_k_m", "q8_0")


def source_model(run: Path | None) -> tuple[Path, Path]:
    """(HF model folder to quantise, folder for the GGUFs): RUN/export/merged, or the quickstart's base model."""
    if run is not None:
        merged = run / "export" / "merged"
        if not (merged / "config.json").is_file():
            raise UserError(f"{run}: no merged export in {merged}; run `tunelab export {run}` first")
        return merged, run / "export"
    from tunelab.config import QUICKSTART_CONFIG, load_config
    from tunelab.io import cache_dir
    from tunelab.models import resolve_model_path

    folder = Path(resolve_model_path(load_config(QUICKSTART_CONFIG).model.name))
    return folder, cache_dir() / "bench-infer" / folder.name


def val_sequences(run: Path | None, limit: int, max_tokens: int = 256) -> list[list[int]]:
    """Held-out token ids: the run's validation split, or the quickstart's prepared one."""
    if run is not None:
        from tunelab.export.merge import val_rows

        rows = [r["input_ids"] for r in val_rows(run, limit)]
    else:
        from tunelab.config import QUICKSTART_CONFIG, load_config
        from tunelab.data.prepare import load_prepared, prepare_dataset

        _, val = load_prepared(prepare_dataset(load_config(QUICKSTART_CONFIG), verbose=False))
        rows = [val[i]["input_ids"] for i in range(min(limit, len(val)))]
    if not rows:
        raise UserError(f"{run}: no prepared validation split found for the perplexity column")
    return [list(r[:max_tokens]) for r in rows]


def make_ggufs(model_dir: Path, out_dir: Path, quants: list[str], threads: int) -> dict[str, Path]:
    """f16 GGUF (converted once) and one file per quantisation, reused when already there."""
    from tunelab.export.gguf import convert_hf_to_gguf, quantize_gguf

    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "model-f16.gguf"
    if not f16.is_file():
        convert_hf_to_gguf(model_dir, f16, "f16")
    files = {}
    for quant in quants:
        path = out_dir / f"model-{quant}.gguf"
        files[quant] = path if path.is_file() else quantize_gguf(f16, path, quant, threads)
    return files


def gguf_perplexity(path: Path, sequences: list[list[int]], threads: int) -> float:
    from tunelab.export.parity import gguf_nll
    from tunelab.models.inference import open_llama

    llm = open_llama(path, threads=threads, n_ctx=max(len(s) for s in sequences) + 8, logits_all=True)
    total, count = gguf_nll(llm, sequences)
    return math.exp(total / count)


def _measure_in_child(path: Path, threads: int, max_new_tokens: int, repeats: int) -> dict:
    from tunelab.bench.infer import _child

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, str(path), threads, max_new_tokens, repeats))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def quant_table(
    run: Path | None,
    quants: list[str],
    threads: int = 2,
    max_new_tokens: int = 64,
    repeats: int = 2,
    val_limit: int = 16,
    log=print,
) -> dict:
    from tunelab.bench.bandwidth import copy_bandwidth_gb_s, decode_bound_tok_s
    from tunelab.export.quant_choice import PPL_TOLERANCE_PCT, recommend_quant
    from tunelab.models.inference import amx_build_needs_plain_buffers

    model_dir, out_dir = source_model(run)
    sequences = val_sequences(run, val_limit)
    files = make_ggufs(model_dir, out_dir, quants, threads)
    bandwidth = copy_bandwidth_gb_s(threads)
    log(f"copy bandwidth ({threads} threads): {bandwidth:.1f} GB/s; perplexity on {len(sequences)} val sequences")
    rows = []
    for quant, path in files.items():
        measured = _measure_in_child(path, threads, max_new_tokens, repeats)
        if "error" in measured:
            raise UserError(f"{path}: could not be measured: {measured['error']}")
        size = path.stat().st_size
        row = {
            "quant": quant,
            "file": str(path),
            "size_mib": round(size / 2**20, 1),
            "decode_tok_s": measured["decode_tok_s"],
            "ttft_s": measured["ttft_s"],
            "peak_rss_mib": measured["peak_rss_mib"],
            "ppl": round(gguf_perplexity(path, sequences, threads), 4),
            "bandwidth_bound_tok_s": round(decode_bound_tok_s(size, bandwidth), 1),
        }
        row["fraction_of_bound"] = (
            round(row["decode_tok_s"] / row["bandwidth_bound_tok_s"], 3) if row["decode_tok_s"] else None
        )
        rows.append(row)
        log(format_row(row))
    reference = next((r["ppl"] for r in rows if r["quant"] == "q8_0"), None)
    for row in rows:
        row["ppl_vs_q8_0_pct"] = round(100 * (row["ppl"] - reference) / reference, 2) if reference else None
    return {
        "model": str(model_dir),
        "val_sequences": len(sequences),
        "val_tokens": sum(len(s) - 1 for s in sequences),
        "copy_bandwidth_gb_s": round(bandwidth, 2),
        "repack": not amx_build_needs_plain_buffers() and _build_has_repack(),
        "ppl_tolerance_pct": PPL_TOLERANCE_PCT,
        "quants": rows,
        "recommended": recommend_quant(rows),
    }


def _build_has_repack() -> bool:
    import llama_cpp

    return b"REPACK = 1" in llama_cpp.llama_print_system_info()


HEADER = (
    f"{'quant':<8} {'size MiB':>9} {'decode tok/s':>12} {'bound tok/s':>11} "
    f"{'of bound':>8} {'TTFT s':>7} {'ppl':>8} {'vs q8_0':>8}"
)


def format_row(row: dict) -> str:
    vs = f"{row['ppl_vs_q8_0_pct']:+.2f}%" if row.get("ppl_vs_q8_0_pct") is not None else "-"
    of_bound = f"{100 * row['fraction_of_bound']:.0f}%" if row.get("fraction_of_bound") else "-"
    return (
        f"{row['quant']:<8} {row['size_mib']:>9.1f} {row['decode_tok_s'] or 0:>12.1f} "
        f"{row['bandwidth_bound_tok_s']:>11.1f} "
        f"{of_bound:>8} {row['ttft_s']:>7.3f} {row['ppl']:>8.3f} {vs:>8}"
    )


def format_table(report: dict) -> str:
    lines = [HEADER, *(format_row(r) for r in report["quants"])]
    lines.append(
        f"copy bandwidth {report['copy_bandwidth_gb_s']} GB/s; "
        f"q4_0 runtime repacking: {'on' if report['repack'] else 'off'}; "
        f"perplexity on {report['val_sequences']} val sequences ({report['val_tokens']} tokens)"
    )
    choice = report["recommended"]
    lines.append(f"recommended: {choice['reason']}" if choice else "recommended: - (needs q8_0 in the table)")
    return "\n".join(lines)
