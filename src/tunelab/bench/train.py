"""`tunelab bench train --vs trl`: tunelab's loop vs TRL's SFTTrainer + PEFT on the same job.

Same model, same prepared conversations in the same order, same LoRA, max length, effective batch, optimizer,
lr schedule, number of optimizer steps, threads and precision. Each side runs in its own process
(tunelab.bench.train_worker), alternating, `repeats` times; the medians are reported. A matmul
microbenchmark (same threads, per precision) gives the peak that tunelab's FLOP rate is compared with.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunelab.bench.machine import run_header
from tunelab.errors import UserError

SIDES = ("tunelab", "trl")


# ------------------------------------------------------------------------------ matmul peak
def matmul_peak_gflops(precision: str, threads: int, seconds: float = 1.5) -> dict:
    """Best sustained GFLOP/s of a few matmul shapes (the model's own and a large square), in this process."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    shapes = [(2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (2048, 2048, 2048)]
    best = {}
    try:
        for m, k, n in shapes:
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            for _ in range(3):
                a @ b
            runs, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / len(shapes):
                a @ b
                runs += 1
            best[f"{m}x{k}x{n}"] = 2 * m * k * n * runs / elapsed / 1e9
    finally:
        torch.set_num_threads(previous)
    return {"gflops": max(best.values()), "shapes": best}


# ----------------------------------------------------------------------------------- data
def bench_data(cfg, max_val_rows: int) -> tuple[list, list]:
    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.train.recipe import rows_of

    train_set, val_set = load_prepared(prepare_dataset(cfg, verbose=False))
    return rows_of(train_set), rows_of(val_set)[:max_val_rows]


def ensure_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise UserError("the TRL side needs the benchmark extra: pip install 'tunelab[bench]' (TRL is never a runtime dependency)") from None


# --------------------------------------------------------------------------------- running
def run_side(side: str, spec_file: Path, out_file: Path, log) -> dict:
    cmd = [sys.executable, "-m", "tunelab.bench.train_worker", "--side", side, "--spec", str(spec_file), "--out", str(out_file)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(json.loads(spec_file.read_text())["threads"])}
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"bench worker ({side}) failed with exit code {proc.returncode}:\n{tail}")
    result = json.loads(out_file.read_text())
    result["wall_seconds"] = time.perf_counter() - started
    log(
        f"  {side:8s} {result['precision']}: {result['tok_per_s']:7.1f} tok/s, {result['s_per_step']:.2f} s/step, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB, val loss {result['val_loss']:.4f} ({result['tokens']} tokens)"
    )
    return result


def summarise(runs: dict[str, list[dict]], peak: dict, flops_per_token: float) -> dict:
    out = {}
    for side in SIDES:
        rs = runs[side]
        if not rs:
            continue
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        out[side] = {
            "tok_per_s": med("tok_per_s"),
            "s_per_step": med("s_per_step"),
            "peak_rss_mib": med("peak_rss_mib"),
            "val_loss": med("val_loss"),
            "tokens": rs[0]["tokens"],
            "final_train_loss": med("final_train_loss") if all(r.get("final_train_loss") is not None for r in rs) else None,
            "tok_per_cpu_s": med("tok_per_cpu_s") if all(r.get("tok_per_cpu_s") for r in rs) else None,
            "runs": [{k: r.get(k) for k in ("tok_per_s", "s_per_step", "peak_rss_mib", "val_loss", "tokens", "tok_per_cpu_s")} for r in rs],
            "fraction_of_matmul_peak": med("tok_per_s") * flops_per_token / (peak["gflops"] * 1e9),
        }
    if "tunelab" in out and "trl" in out:
        t, r = out["tunelab"], out["trl"]
        out["ratio"] = {
            "tok_per_s": t["tok_per_s"] / r["tok_per_s"],
            "peak_rss_mib": t["peak_rss_mib"] / r["peak_rss_mib"],
            "s_per_step": t["s_per_step"] / r["s_per_step"],
            "val_loss_delta": t["val_loss"] - r["val_loss"],
            "tok_per_cpu_s": t["tok_per_cpu_s"] / r["tok_per_cpu_s"] if t["tok_per_cpu_s"] and r["tok_per_cpu_s"] else None,
        }
        out["trl_settings"] = runs["trl"][0].get("trl_settings")
    out["matmul_peak"] = peak
    out["flops_per_token"] = flops_per_token
    return out


def run_bench(
    cfg,
    steps: int = 20,
    repeats: int = 3,
    precisions: list[str] | None = None,
    threads: int = 2,
    vs: str | None = "trl",
    max_val_rows: int = 64,
    command: str | None = None,
    log=print,
) -> dict:
    """Run the comparison; returns the JSON document (fp32 at the top level, `bf16` nested)."""
    from tunelab.models import resolve_model_path
    from tunelab.train.precision import choose_precision

    sides = ["tunelab"] + (["trl"] if vs == "trl" else [])
    if "trl" in sides:
        ensure_trl()
    if precisions is None:
        precisions = ["fp32"] + (["bf16"] if choose_precision("auto").name == "bf16" else [])
    train_rows, val_rows = bench_data(cfg, max_val_rows)
    model_path = resolve_model_path(cfg.model.name)
    n_params = _count_params(model_path)
    flops_per_token = 4 * n_params  # LoRA: forward 2N + backward to activations 2N (no frozen-weight grads)
    log(f"bench train: {len(train_rows)} train / {len(val_rows)} val conversations, model {model_path} ({n_params / 1e6:.0f}M params)")
    log(f"  {steps} optimizer steps x {cfg.train.batch_size} conversations, {threads} threads, {repeats} repeats, precisions {precisions}")

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        tmp = Path(tmp)
        data_file = tmp / "data.json"
        data_file.write_text(json.dumps({"train": train_rows, "val": val_rows}))
        for precision in precisions:
            spec = {
                "model_path": model_path,
                "data_file": str(data_file),
                "steps": steps,
                "batch_size": cfg.train.batch_size * cfg.train.grad_accum,
                "lr": cfg.train.lr,
                "warmup_steps": cfg.train.warmup_steps,
                "weight_decay": cfg.train.weight_decay,
                "max_grad_norm": cfg.train.max_grad_norm,
                "max_seq_len": cfg.train.max_seq_len,
                "loss_chunk_tokens": cfg.train.loss_chunk_tokens,
                "seed": cfg.train.seed,
                "threads": threads,
                "precision": precision,
                "lora": cfg.lora.model_dump(mode="json"),
            }
            spec_file = tmp / f"spec-{precision}.json"
            spec_file.write_text(json.dumps(spec))
            peak = matmul_peak_gflops(precision, threads)
            log(f"{precision}: matmul peak {peak['gflops']:.0f} GFLOP/s ({threads} threads)")
            runs: dict[str, list[dict]] = {s: [] for s in SIDES}
            for repeat in range(repeats):
                order = sides if repeat % 2 == 0 else sides[::-1]  # alternate who goes first
                for side in order:
                    runs[side].append(run_side(side, spec_file, tmp / f"{side}-{precision}-{repeat}.json", log))
            results[precision] = summarise(runs, peak, flops_per_token)

    doc = dict(results.get("fp32", {}))
    if "bf16" in results:
        doc["bf16"] = results["bf16"]
    doc.update(
        precision="fp32" if "fp32" in results else precisions[0],
        precisions=precisions,
        steps=steps,
        repeats=repeats,
        conversations_per_step=cfg.train.batch_size * cfg.train.grad_accum,
        max_seq_len=cfg.train.max_seq_len,
        lora=cfg.lora.model_dump(mode="json"),
        model=cfg.model.name,
        **run_header(command or "tunelab bench train --vs trl", threads),
    )
    if "fp32" not in results:  # only bf16 was asked for: keep its figures at the top level too
        doc.update({k: v for k, v in results[precisions[0]].items()})
    return doc


def _count_params(model_path: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def print_table(doc: dict, log=print) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for precision in doc["precisions"]:
        block = doc if precision == doc["precision"] else doc[precision]
        table = Table(title=f"bench train, {precision}: {doc['steps']} steps x {doc['conversations_per_step']} conversations, median of {doc['repeats']}")
        for column in ("side", "real tok/s", "s/step", "peak RSS MiB", "val loss", "% matmul peak", "tok/CPU-s (steps 2+)"):
            table.add_column(column)
        for side in SIDES:
            if side in block:
                s = block[side]
                table.add_row(
                    side, f"{s['tok_per_s']:.1f}", f"{s['s_per_step']:.2f}", f"{s['peak_rss_mib']:.0f}", f"{s['val_loss']:.4f}",
                    f"{100 * s['fraction_of_matmul_peak']:.0f}%", _fmt(s.get("tok_per_cpu_s")),
                )
        if "ratio" in block:
            r = block["ratio"]
            table.add_row(
                "tunelab/TRL", f"{r['tok_per_s']:.2f}x", f"{r['s_per_step']:.2f}x", f"{r['peak_rss_mib']:.2f}x", f"{r['val_loss_delta']:+.4f}", "",
                _fmt(r.get("tok_per_cpu_s"), "x"),
            )
        console.print(table)
        console.print(f"matmul peak ({precision}): {block['matmul_peak']['gflops']:.0f} GFLOP/s")
    console.print(f"machine: {doc['machine']}; date: {doc['date']}")


def _fmt(value, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.2f}{suffix}" if suffix else f"{value:.1f}"


def markdown_table(doc: dict) -> str:
    """The figures as a Markdown table (pasted into docs/benchmarks.md)."""
    lines = [
        "| precision | side | real tok/s | s/step | peak RSS MiB | val loss | % of matmul peak | tok/CPU-s (steps 2+) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for precision in doc["precisions"]:
        block = doc if precision == doc["precision"] else doc[precision]
        for side in SIDES:
            if side in block:
                s = block[side]
                lines.append(
                    f"| {precision} | {side} | {s['tok_per_s']:.1f} | {s['s_per_step']:.2f} | {s['peak_rss_mib']:.0f} | "
                    f"{s['val_loss']:.4f} | {100 * s['fraction_of_matmul_peak']:.0f}% of {block['matmul_peak']['gflops']:.0f} GFLOP/s | "
                    f"{_fmt(s.get('tok_per_cpu_s'))} |"
                )
        if "ratio" in block:
            r = block["ratio"]
            lines.append(
                f"| {precision} | **tunelab/TRL** | **{r['tok_per_s']:.2f}x** | {r['s_per_step']:.2f}x | **{r['peak_rss_mib']:.2f}x** | "
                f"{r['val_loss_delta']:+.4f} | | {_fmt(r.get('tok_per_cpu_s'), 'x')} |"
            )
    lines += ["", f"Command: `{doc['command']}`; machine: {doc['machine']}; date: {doc['date']}; "
              f"{doc['steps']} optimizer steps x {doc['conversations_per_step']} conversations, median of {doc['repeats']} runs per side."]
    return "\n".join(lines) + "\n"


def plot_throughput(doc: dict, path: Path) -> None:
    """Bar chart: real tokens/s per side and precision, with each precision's matmul-peak ceiling (4N FLOPs/token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors, ceilings = [], [], [], []
    for precision in doc["precisions"]:
        block = doc if precision == doc["precision"] else doc[precision]
        ceiling = block["matmul_peak"]["gflops"] * 1e9 / doc["flops_per_token"]
        for side, color in (("tunelab", "#3b75af"), ("trl", "#bbbbbb")):
            if side in block:
                labels.append(f"{side}\n{precision}")
                values.append(block[side]["tok_per_s"])
                colors.append(color)
                ceilings.append(ceiling)
    fig, ax = plt.subplots(figsize=(1.5 * len(labels) + 2, 4))
    bars = ax.bar(range(len(labels)), values, color=colors)
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.0f}", ha="center", va="bottom", fontsize=9)
    for i, ceiling in enumerate(ceilings):
        ax.hlines(ceiling, i - 0.45, i + 0.45, colors="#c44e52", linestyles="--", label="matmul peak / 4N" if i == 0 else None)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("real (non-padding) tokens / s")
    ax.set_title(f"LoRA training, SmolLM2-135M, {doc['steps']} steps x {doc['conversations_per_step']} conversations")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

