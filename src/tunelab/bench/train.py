"""`tunelab bench train --vs trl`: tunelab's loop vs TRL's SFTTrainer + PEFT on the same job.

Same model, same prepared conversations, LoRA, max length, effective batch, optimizer, lr schedule, number of
optimizer steps, threads, precision and allocator setting. Each tool runs twice. TRL in its fastest configuration
(no gradient checkpointing, length-grouped batches: the same conversations in another order) for the speed goal,
and in its memory-lean default (checkpointing on, tunelab's order) for the memory goal and the held-out loss
check; tunelab in its default loop and with `train.gradient_checkpointing` on (`tunelab_lean`), so speed is
fastest vs fastest and memory leanest vs leanest.
Each side runs in its own process (tunelab.bench.worker, given the job's Config), alternating, `repeats` times;
medians are reported.
The fraction of the matmul peak is the job's model FLOPs (tunelab.train.flops) over the matmul peak measured on
this machine (tunelab.train.matmul_peak).
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
from tunelab.bench.worker import SIDES, ordered_rows
from tunelab.config import Config, EvalConfig, LoraConfig
from tunelab.errors import UserError
from tunelab.train.memory import MMAP_THRESHOLD, ONEDNN_PRIMITIVE_CACHE

# SIDES: each tool in its fastest configuration and in its memory-lean one (gradient checkpointing on): tunelab/trl
# are the fastest, tunelab_lean/trl_lean the leanest (see worker.TUNELAB_CONFIGS and TRL_CONFIGS).
# The same allocator settings for both tools in each configuration. Fastest: glibc's defaults (freed memory is kept
# and reused; oneDNN keeps at most 64 primitives, which costs no speed). Leanest: also allocations >= 1 MiB mmapped,
# so freed ones go back to the OS, and the heap trimmed after every optimizer step (tunelab: `train.release_memory`;
# TRL: a callback, see worker). inherited MALLOC_* variables are dropped so that the bench decides.
FAST_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(ONEDNN_PRIMITIVE_CACHE)}
LEAN_ENV = {**FAST_ENV, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
ALLOCATOR_ENV = {"tunelab": FAST_ENV, "trl": FAST_ENV, "tunelab_lean": LEAN_ENV, "trl_lean": LEAN_ENV}
# Goals per precision: speed vs TRL's fastest, memory vs TRL's leanest, quality vs the same-order run.
GOALS = {"tok_per_s_vs_trl_fastest": 2.0, "peak_rss_vs_trl_leanest": 0.6, "val_loss_rel_vs_same_order": 0.005}


def matmul_peak_gflops(precision: str, threads: int) -> dict:
    """This machine's matmul peak in the precision (measured once, cached: tunelab.train.matmul_peak)."""
    from tunelab.train.matmul_peak import matmul_peak

    return matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32, threads)


def job_flops(model_path: str, lora: LoraConfig, sequences: list) -> float:
    """Model FLOPs of training once on `sequences`, (ids, labels) pairs (tunelab.train.flops: the same count for every
    side, since every side trains on the same sequences; logits counted on labelled targets only, as the job needs).
    A dpo pair is two sequences, chosen and rejected; its reference log-probs are computed before the timed part."""
    from transformers import AutoConfig

    from tunelab.data.masking import IGNORE_INDEX
    from tunelab.train.flops import model_shape, training_flops

    shape = model_shape(AutoConfig.from_pretrained(model_path), lora.r, lora.target_modules)
    targets = sum(1 for _, labels in sequences for x in labels[1:] if x != IGNORE_INDEX)
    return training_flops(shape, [len(ids) for ids, _ in sequences], targets)


def worker_config(cfg: Config, model_path: str, steps: int, precision: str, threads: int, **train) -> Config:
    """The Config every side of one precision trains with: the user's config with the bench's steps, precision and
    threads, the effective batch in one micro-batch, a step mark after every step and no checkpoint before the end.
    `train`: more train settings (the objective's)."""
    return cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"name": model_path}),
            "train": cfg.train.model_copy(
                update={
                    "max_steps": steps,
                    "batch_size": cfg.train.batch_size * cfg.train.grad_accum,
                    "grad_accum": 1,
                    "precision": precision,
                    "threads": threads,
                    "save_steps": steps,
                    "eval_steps": steps,
                    "logging_steps": 1,
                    **train,
                }
            ),
            "eval": EvalConfig(batch_size=8),
        }
    )


def write_spec(cfg: Config, data_file: Path, folder: Path, name: str | None = None) -> Path:
    """The worker's SPEC.json: the job's whole Config and the file of prepared rows (`name`: default the
    precision)."""
    spec_file = folder / f"spec-{name or cfg.train.precision}.json"
    spec_file.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "data_file": str(data_file)}))
    return spec_file


def run_repeats(sides: list[str], cfg: Config, data_file: Path, folder: Path, repeats: int, log) -> dict[str, list]:
    """Every side `repeats` times, alternating who goes first; {side: [result of each run]}."""
    spec_file = write_spec(cfg, data_file, folder)
    return run_alternating({side: (side, spec_file) for side in sides}, folder, repeats, log)


def run_alternating(jobs: dict[str, tuple[str, Path]], folder: Path, repeats: int, log) -> dict[str, list]:
    """Every job, {label: (worker side, spec file)}, `repeats` times, the order reversed every other repeat;
    {label: [result of each run]}."""
    labels = list(jobs)
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for repeat in range(repeats):
        for label in labels if repeat % 2 == 0 else labels[::-1]:
            side, spec_file = jobs[label]
            out_file = folder / f"{label}-{spec_file.stem}-{repeat}.json"
            runs[label].append(run_side(side, spec_file, out_file, log, label=label))
    return runs


# ----------------------------------------------------------------------------------- data
def bench_data(cfg, max_val_rows: int) -> tuple[list, list]:
    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.train.recipe import rows_of

    train_set, val_set = load_prepared(prepare_dataset(cfg, verbose=False))
    return list(rows_of(train_set)), list(rows_of(val_set)[:max_val_rows])  # the workers get them as JSON


def ensure_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise UserError(
            "the TRL side needs the benchmark extra: pip install 'tunelab[bench]' (TRL is never a runtime dependency)"
        ) from None


# --------------------------------------------------------------------------------- running
def run_side(side: str, spec_file: Path, out_file: Path, log, label: str | None = None) -> dict:
    args = ["--side", side, "--spec", str(spec_file), "--out", str(out_file)]
    cmd = [sys.executable, "-m", "tunelab.bench.worker", *args]
    threads = str(json.loads(spec_file.read_text())["config"]["train"]["threads"])
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env = {**inherited, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads, **ALLOCATOR_ENV[side]}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"bench worker ({side}) failed with exit code {proc.returncode}:\n{tail}")
    result = json.loads(out_file.read_text())
    result["wall_seconds"] = time.perf_counter() - started
    result["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # 1-min load: before, after
    log(
        f"  {label or side:8s} {result['precision']}: {result['tok_per_s']:7.1f} tok/s, "
        f"{result['s_per_step']:.2f} s/step, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB, val loss {result['val_loss']:.4f} ({result['tokens']} tokens), "
        f"load {result['load_avg'][0]}->{result['load_avg'][1]}"
    )
    return result


def side_summary(rs: list[dict], peak: dict, flops: float) -> dict:
    """Medians of one side's runs, each run's figures, and the fraction of the matmul peak the job's FLOPs reach."""
    med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
    return {
        "tok_per_s": med("tok_per_s"),
        "s_per_step": med("s_per_step"),
        "peak_rss_mib": med("peak_rss_mib"),
        "val_loss": med("val_loss"),
        "tokens": rs[0]["tokens"],
        "final_train_loss": med("final_train_loss") if all(r.get("final_train_loss") is not None for r in rs) else None,
        "tok_per_cpu_s": med("tok_per_cpu_s") if all(r.get("tok_per_cpu_s") for r in rs) else None,
        "runs": [
            {
                k: r.get(k)
                for k in (
                    "tok_per_s",
                    "s_per_step",
                    "peak_rss_mib",
                    "val_loss",
                    "tokens",
                    "tok_per_cpu_s",
                    "load_avg",
                    "wall_seconds",
                )
            }
            for r in rs
        ],
        "fraction_of_matmul_peak": flops / statistics.median(r["train_seconds"] for r in rs) / (peak["gflops"] * 1e9),
    }


def ratio(t: dict, r: dict) -> dict:
    return {
        "tok_per_s": t["tok_per_s"] / r["tok_per_s"],
        "peak_rss_mib": t["peak_rss_mib"] / r["peak_rss_mib"],
        "s_per_step": t["s_per_step"] / r["s_per_step"],
        "val_loss_delta": t["val_loss"] - r["val_loss"],
        "val_loss_rel": (t["val_loss"] - r["val_loss"]) / r["val_loss"],
        "tok_per_cpu_s": t["tok_per_cpu_s"] / r["tok_per_cpu_s"] if t["tok_per_cpu_s"] and r["tok_per_cpu_s"] else None,
    }


def goals(block: dict) -> dict:
    """Each goal's measured value, target and whether it is met (needs tunelab, trl and trl_lean).

    Like for like: speed is tunelab's fastest configuration against TRL's fastest; memory is tunelab's leanest
    configuration that was run (tunelab_lean when it ran, else the default) against TRL's leanest; quality is the
    default configuration against TRL's same-order run. `side` names the tunelab configuration each goal used."""
    speed = block["ratio"]["tok_per_s"]
    lean_side = min((s for s in ("tunelab", "tunelab_lean") if s in block), key=lambda s: block[s]["peak_rss_mib"])
    memory = block[lean_side]["peak_rss_mib"] / block["trl_lean"]["peak_rss_mib"]
    quality = abs(block["ratio_lean"]["val_loss_rel"])
    return {
        "tok_per_s_vs_trl_fastest": {
            "value": speed,
            "goal": f">= {GOALS['tok_per_s_vs_trl_fastest']}",
            "met": speed >= GOALS["tok_per_s_vs_trl_fastest"],
            "side": "tunelab",
        },
        "peak_rss_vs_trl_leanest": {
            "value": memory,
            "goal": f"<= {GOALS['peak_rss_vs_trl_leanest']}",
            "met": memory <= GOALS["peak_rss_vs_trl_leanest"],
            "side": lean_side,
        },
        "val_loss_rel_vs_same_order": {
            "value": quality,
            "goal": f"<= {GOALS['val_loss_rel_vs_same_order']}",
            "met": quality <= GOALS["val_loss_rel_vs_same_order"],
            "side": "tunelab",
        },
    }


def summarise(runs: dict[str, list[dict]], peak: dict, flops: float) -> dict:
    """One precision's block. `trl` (TRL's fastest) keeps the historical keys (`ratio`, `trl_settings`);
    `trl_lean` (TRL's leanest, same order as tunelab) and `ratio_lean` sit beside them."""
    out = {side: side_summary(runs[side], peak, flops) for side in SIDES if runs.get(side)}
    if "tunelab" in out and "trl" in out:
        out["ratio"] = ratio(out["tunelab"], out["trl"])
        out["trl_settings"] = runs["trl"][0].get("trl_settings")
    if "tunelab" in out and "trl_lean" in out:
        out["ratio_lean"] = ratio(out["tunelab"], out["trl_lean"])
        out["trl_lean_settings"] = runs["trl_lean"][0].get("trl_settings")
    if "tunelab_lean" in out and "trl_lean" in out:
        out["ratio_lean_vs_lean"] = ratio(out["tunelab_lean"], out["trl_lean"])
    if "ratio" in out and "ratio_lean" in out:
        out["goals"] = goals(out)
    out["matmul_peak"] = peak
    out["job_flops"] = flops
    out["flops_per_token"] = flops / out["tunelab"]["tokens"] if "tunelab" in out else None
    return out


def run_bench(
    cfg,
    steps: int = 40,
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
    from tunelab.train.precision import precision_for_this_machine

    sides = ["tunelab"] + (["tunelab_lean", "trl", "trl_lean"] if vs == "trl" else [])
    if "trl" in sides:
        ensure_trl()
    if precisions is None:
        precisions = ["fp32"] + (["bf16"] if precision_for_this_machine("auto").name == "bf16" else [])
    train_rows, val_rows = bench_data(cfg, max_val_rows)
    model_path = resolve_model_path(cfg.model.name)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    flops = job_flops(model_path, cfg.lora, ordered_rows(train_rows, steps, per_step, cfg.train.seed))
    log(
        f"bench train: {len(train_rows)} train / {len(val_rows)} val conversations, model {model_path}; "
        f"allocator: fastest sides {FAST_ENV}, lean sides {LEAN_ENV} + heap trimmed every step"
    )
    log(
        f"  {steps} optimizer steps x {per_step} conversations, {threads} threads, {repeats} repeats, "
        f"precisions {precisions}"
    )

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        tmp = Path(tmp)
        data_file = tmp / "data.json"
        data_file.write_text(json.dumps({"train": train_rows, "val": val_rows}))
        for precision in precisions:
            peak = matmul_peak_gflops(precision, threads)
            log(f"{precision}: matmul peak {peak['gflops']:.0f} GFLOP/s ({threads} threads)")
            job = worker_config(cfg, model_path, steps, precision, threads, objective="sft")
            results[precision] = summarise(run_repeats(sides, job, data_file, tmp, repeats, log), peak, flops)

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
        compile=cfg.train.compile,
        allocator_env=ALLOCATOR_ENV,
        goals_definition=GOALS,
        lora=cfg.lora.model_dump(mode="json"),
        model=cfg.model.name,
        **run_header(command or "tunelab bench train --vs trl", threads),
    )
    if "fp32" not in results:  # only bf16 was asked for: keep its figures at the top level too
        doc.update({k: v for k, v in results[precisions[0]].items()})
    return doc


def print_table(doc: dict, log=print) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for precision, block in precision_blocks(doc):
        table = Table(
            title=(
                f"bench train, {precision}: {doc['steps']} steps x {doc['conversations_per_step']} conversations, "
                f"median of {doc['repeats']}"
            )
        )
        for column in (
            "side",
            "real tok/s",
            "s/step",
            "peak RSS MiB",
            "val loss",
            "% matmul peak",
            "tok/CPU-s (steps 2+)",
        ):
            table.add_column(column)
        for side in SIDES:
            if side in block:
                s = block[side]
                table.add_row(
                    side,
                    f"{s['tok_per_s']:.1f}",
                    f"{s['s_per_step']:.2f}",
                    f"{s['peak_rss_mib']:.0f}",
                    f"{s['val_loss']:.4f}",
                    f"{100 * s['fraction_of_matmul_peak']:.0f}%",
                    _fmt(s.get("tok_per_cpu_s")),
                )
        for key, label in RATIO_ROWS:
            if key in block:
                r = block[key]
                table.add_row(
                    label,
                    f"{r['tok_per_s']:.2f}x",
                    f"{r['s_per_step']:.2f}x",
                    f"{r['peak_rss_mib']:.2f}x",
                    f"{100 * r['val_loss_rel']:+.2f}%",
                    "",
                    _fmt(r.get("tok_per_cpu_s"), "x"),
                )
        console.print(table)
        console.print(f"matmul peak ({precision}): {block['matmul_peak']['gflops']:.0f} GFLOP/s")
        if "goals" in block:
            console.print(goals_line(block["goals"]))
    console.print(f"machine: {doc['machine']}; date: {doc['date']}")


RATIO_ROWS = (
    ("ratio", "tunelab/TRL fastest"),
    ("ratio_lean", "tunelab/TRL lean"),
    ("ratio_lean_vs_lean", "tunelab lean/TRL lean"),
)


def goals_line(goals: dict) -> str:
    return "goals: " + "; ".join(
        f"{name} {g['value']:.3f} ({g['goal']}, {g.get('side', 'tunelab')}): {'met' if g['met'] else 'NOT met'}"
        for name, g in goals.items()
    )


def _fmt(value, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.2f}{suffix}" if suffix else f"{value:.1f}"


def precision_blocks(doc: dict):
    """(precision, its figures) for each precision benched: the first precision's figures sit at the top level."""
    for precision in doc["precisions"]:
        yield precision, doc if precision == doc["precision"] else doc[precision]


def markdown_table(doc: dict) -> str:
    """The figures as a Markdown table (pasted into docs/benchmarks.md)."""
    lines = [
        "| precision | side | real tok/s | s/step | peak RSS MiB | val loss | % of matmul peak "
        "| tok/CPU-s (steps 2+) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for precision, block in precision_blocks(doc):
        for side in SIDES:
            if side in block:
                s = block[side]
                lines.append(
                    f"| {precision} | {side} | {s['tok_per_s']:.1f} | {s['s_per_step']:.2f} "
                    f"| {s['peak_rss_mib']:.0f} | {s['val_loss']:.4f} | {100 * s['fraction_of_matmul_peak']:.0f}% "
                    f"of {block['matmul_peak']['gflops']:.0f} GFLOP/s | "
                    f"{_fmt(s.get('tok_per_cpu_s'))} |"
                )
        for key, label in RATIO_ROWS:
            if key in block:
                r = block[key]
                lines.append(
                    f"| {precision} | **{label}** | **{r['tok_per_s']:.2f}x** | {r['s_per_step']:.2f}x "
                    f"| **{r['peak_rss_mib']:.2f}x** | "
                    f"{100 * r['val_loss_rel']:+.2f}% | | {_fmt(r.get('tok_per_cpu_s'), 'x')} |"
                )
    for precision, block in precision_blocks(doc):
        if "goals" in block:
            lines += ["", f"{precision} {goals_line(block['goals'])}"]
    lines += [
        "",
        f"Command: `{doc['command']}`; machine: {doc['machine']}; date: {doc['date']}; "
        f"{doc['steps']} optimizer steps x {doc['conversations_per_step']} conversations, "
        f"median of {doc['repeats']} runs per side.",
    ]
    return "\n".join(lines) + "\n"


def plot_throughput(doc: dict, path: Path) -> None:
    """Bar chart: real tokens/s per side and precision, with each precision's ceiling
    (matmul peak / FLOPs per token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors, ceilings = [], [], [], []
    for precision, block in precision_blocks(doc):
        ceiling = block["matmul_peak"]["gflops"] * 1e9 / block["flops_per_token"]
        for side, color in (("tunelab", "#3b75af"), ("trl", "#bbbbbb"), ("trl_lean", "#e0e0e0")):
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
        ax.hlines(
            ceiling,
            i - 0.45,
            i + 0.45,
            colors="#c44e52",
            linestyles="--",
            label="matmul peak / FLOPs per token" if i == 0 else None,
        )
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("real (non-padding) tokens / s")
    ax.set_title(f"LoRA training, SmolLM2-135M, {doc['steps']} steps x {doc['conversations_per_step']} conversations")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
