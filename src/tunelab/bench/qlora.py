"""`tunelab bench train --vs qlora`: QLoRA (a 4-bit NF4 base with double quantisation + LoRA) against bf16 LoRA and
fp32 LoRA, on each model of `--models`, in one run.

Three sides per model, each a tunelab worker (tunelab.bench.worker, its own process, so its peak RSS is its own)
given the same job's Config but for the base: `qlora` (`model.load_in_4bit`, nf4, double quant; its 4-bit layers
compute in bf16 where the CPU has native bf16, else fp32, as `train.precision: auto` would pick), `bf16` and
`fp32` (unquantised bases). Every side runs the same loop configuration (`--loop`: `lean`, the default, is
tunelab_lean: gradient checkpointing + the heap released every step, as the shipped QLoRA configs run; `fastest`
is the default loop), the same rows in the same order, LoRA, optimizer, threads and allocator setting; `repeats`
times, alternating who goes first.

Reported per side: real tokens/s, s/step and peak RSS (the whole worker process up to the end of training, model
loading included), each as median and min-max over the repeats, with the peak split into the loading's
(`load_peak_rss_mib`), the RSS once loaded and the training's own (`training_phase_peak_rss_mib`), so a peak set
by loading is visible as such. Ratios QLoRA/bf16 and QLoRA/fp32 are per repeat (the sides of one repeat ran back
to back), then median and min-max. Goal: on the Llama-3.2-1B shape, QLoRA's peak RSS <= 0.5x bf16 LoRA's.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from tunelab.bench.llama32 import CHAT_TEMPLATE
from tunelab.bench.llama32 import NAME as LLAMA32_1B_SHAPE
from tunelab.bench.machine import run_header
from tunelab.config import Config

SIDES = ("qlora", "bf16", "fp32")
LOOPS = {"lean": "tunelab_lean", "fastest": "tunelab"}  # --loop: the worker side every bench side runs
RATIOS = (("qlora", "bf16"), ("qlora", "fp32"))
RATIO_KEYS = ("tok_per_s", "s_per_step", "peak_rss_mib")
SPREAD_KEYS = (
    "tok_per_s",
    "s_per_step",
    "peak_rss_mib",
    "load_peak_rss_mib",
    "rss_after_load_mib",
    "training_phase_peak_rss_mib",
)
GOAL = {"model": LLAMA32_1B_SHAPE, "ratio": "qlora/bf16", "key": "peak_rss_mib", "at_most": 0.5}
DEFAULT_STEPS = 5
DEFAULT_VAL_ROWS = 8  # held-out rows scored per side: a check that every side trained, at 1B cost


def resolve_bench_model(name: str) -> tuple[str, dict]:
    """(model folder, model settings) for one `--models` entry: `llama32-1b-shape` (built once and cached) or
    anything `model.name` takes."""
    if name == LLAMA32_1B_SHAPE:
        from tunelab.bench.llama32 import llama32_1b_shape_folder

        return str(llama32_1b_shape_folder()), {"chat_template": CHAT_TEMPLATE}
    from tunelab.models import resolve_model_path

    return resolve_model_path(name), {}


def side_config(job: Config, side: str, qlora_precision: str) -> Config:
    """The Config of one side: `job` (one model's, see train.worker_config) with the side's base and precision."""
    precision = qlora_precision if side == "qlora" else side
    quantized = side == "qlora"
    model = job.model.model_copy(
        update={
            "load_in_4bit": quantized,
            "load_in_8bit": False,
            **({"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True} if quantized else {}),
        }
    )
    return job.model_copy(update={"model": model, "train": job.train.model_copy(update={"precision": precision})})


def spread(values: list[float | None]) -> dict | None:
    """{"median", "min", "max"} of the values (None when any is missing)."""
    if not values or any(v is None for v in values):
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired_ratio(runs_a: list[dict], runs_b: list[dict], key: str) -> dict | None:
    """`key` of side a over side b, repeat by repeat (each repeat ran both back to back): median and min-max."""
    return spread([a[key] / b[key] for a, b in zip(runs_a, runs_b, strict=True)])


def model_block(runs: dict[str, list[dict]], peaks: dict[str, dict], flops: float) -> dict:
    """One model's figures: each side's summary (medians as the train bench reports them, plus `spread` and how
    its base was quantised), the paired ratios and the memory goal."""
    from tunelab.bench.train import side_summary

    block: dict = {}
    for side in SIDES:
        rs = runs[side]
        summary = side_summary(rs, peaks[rs[0]["precision"]], flops)
        summary["precision"] = rs[0]["precision"]
        summary["quantization"] = rs[0].get("quantization")
        summary["quantized_layer_types"] = rs[0].get("quantized_layer_types")
        summary["spread"] = {key: spread([r.get(key) for r in rs]) for key in SPREAD_KEYS}
        for key in SPREAD_KEYS[3:]:
            summary[key] = summary["spread"][key]["median"] if summary["spread"][key] else None
        load, training = summary["load_peak_rss_mib"], summary["training_phase_peak_rss_mib"]
        summary["peak_set_by_loading"] = load is not None and training is not None and load > training
        block[side] = summary
    block["ratios"] = {f"{a}/{b}": {key: paired_ratio(runs[a], runs[b], key) for key in RATIO_KEYS} for a, b in RATIOS}
    value = block["ratios"][GOAL["ratio"]][GOAL["key"]]["median"]
    block["goal_peak_rss_vs_bf16"] = {"value": value, "goal": f"<= {GOAL['at_most']}", "met": value <= GOAL["at_most"]}
    return block


def run_qlora_bench(
    cfg: Config,
    models: list[str],
    steps: int = DEFAULT_STEPS,
    repeats: int = 3,
    threads: int = 2,
    loop: str = "lean",
    max_val_rows: int = DEFAULT_VAL_ROWS,
    command: str | None = None,
    log=print,
) -> dict:
    """Run the three sides on every model; returns the JSON document."""
    from tunelab.bench.train import (
        FAST_ENV,
        LEAN_ENV,
        bench_data,
        job_flops,
        matmul_peak_gflops,
        run_alternating,
        worker_config,
        write_spec,
    )
    from tunelab.bench.worker import ordered_rows
    from tunelab.train.precision import precision_for_this_machine

    qlora_precision = "bf16" if precision_for_this_machine("auto").name == "bf16" else "fp32"
    worker_side = LOOPS[loop]
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    peaks = {precision: matmul_peak_gflops(precision, threads) for precision in ("fp32", "bf16")}
    log(
        f"bench train --vs qlora: sides {', '.join(SIDES)} (the 4-bit base computes in {qlora_precision}), "
        f"loop {loop} ({worker_side}), {steps} steps x {per_step} conversations, max_seq_len "
        f"{cfg.train.max_seq_len}, {threads} threads, {repeats} repeats, models {models}"
    )
    resolved = {name: resolve_bench_model(name) for name in models}  # a bad name fails before any side runs
    blocks: dict = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-qlora-") as tmp:
        for index, (name, (model_path, settings)) in enumerate(resolved.items()):
            folder = Path(tmp) / f"model-{index}"
            folder.mkdir()
            model_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": model_path, **settings})})
            train_rows, val_rows = bench_data(model_cfg, max_val_rows)
            data_file = folder / "data.json"
            data_file.write_text(json.dumps({"train": train_rows, "val": val_rows}))
            flops = job_flops(model_path, cfg.lora, ordered_rows(train_rows, steps, per_step, cfg.train.seed))
            log(f"{name}: {model_path}, {len(train_rows)} train / {len(val_rows)} val conversations")
            job = worker_config(model_cfg, model_path, steps, "fp32", threads, objective="sft")
            jobs = {
                side: (worker_side, write_spec(side_config(job, side, qlora_precision), data_file, folder, side))
                for side in SIDES
            }
            blocks[name] = {
                "path": model_path,
                **model_block(run_alternating(jobs, folder, repeats, log), peaks, flops),
            }
    return {
        "mode": "qlora",
        "models": blocks,
        "sides": {
            side: {"precision": qlora_precision if side == "qlora" else side, "load_in_4bit": side == "qlora"}
            for side in SIDES
        },
        "qlora_base": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "compute": qlora_precision},
        "loop": loop,
        "worker_side": worker_side,
        "allocator_env": LEAN_ENV if worker_side == "tunelab_lean" else FAST_ENV,
        "steps": steps,
        "repeats": repeats,
        "conversations_per_step": per_step,
        "max_seq_len": cfg.train.max_seq_len,
        "optimizer": cfg.train.optimizer,
        "lora": cfg.lora.model_dump(mode="json"),
        "matmul_peak": peaks,
        "goal_definition": GOAL,
        **run_header(command or "tunelab bench train --vs qlora", threads),
    }


def _figure(summary: dict, key: str, digits: int = 0) -> str:
    s = summary["spread"].get(key)
    if s is None:
        return "-"
    text = f"{s['median']:.{digits}f}"
    return text if s["min"] == s["max"] else f"{text} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _ratio(r: dict | None) -> str:
    if r is None:
        return "-"
    text = f"{r['median']:.2f}x"
    return text if r["min"] == r["max"] else f"{text} ({r['min']:.2f}–{r['max']:.2f})"


def markdown_table(doc: dict) -> str:
    """The figures as a Markdown table: median (min–max) where a side ran more than once."""
    lines = [
        "| model | side | base | real tok/s | s/step | peak RSS MiB | loading's peak | RSS once loaded "
        "| training's peak | val loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, block in doc["models"].items():
        for side in SIDES:
            s = block[side]
            base = s["quantization"] or f"{s['precision']} (unquantised)"
            lines.append(
                f"| {name} | {side} | {base} | {_figure(s, 'tok_per_s', 1)} | {_figure(s, 's_per_step', 2)} "
                f"| {_figure(s, 'peak_rss_mib')} | {_figure(s, 'load_peak_rss_mib')} "
                f"| {_figure(s, 'rss_after_load_mib')} | {_figure(s, 'training_phase_peak_rss_mib')} "
                f"| {s['val_loss']:.4f} |"
            )
        for label, ratio in block["ratios"].items():
            lines.append(
                f"| {name} | **{label.replace('qlora', 'QLoRA')}** | | **{_ratio(ratio['tok_per_s'])}** "
                f"| {_ratio(ratio['s_per_step'])} | **{_ratio(ratio['peak_rss_mib'])}** | | | | |"
            )
    lines.append("")
    for name, block in doc["models"].items():
        goal = block["goal_peak_rss_vs_bf16"]
        judged = " (the goal's model)" if name == GOAL["model"] else ""
        loading = [side for side in SIDES if block[side]["peak_set_by_loading"]]
        lines.append(
            f"{name}{judged}: QLoRA/bf16 peak RSS {goal['value']:.2f}x ({goal['goal']}): "
            f"{'met' if goal['met'] else 'NOT met'}; peak set by loading: {', '.join(loading) or 'no side'}"
        )
    qlora = doc["qlora_base"]
    lines += [
        "",
        f"Command: `{doc['command']}`; machine: {doc['machine']}; date: {doc['date']}; {doc['steps']} optimizer "
        f"steps x {doc['conversations_per_step']} conversations at max_seq_len {doc['max_seq_len']}, loop "
        f"{doc['loop']} ({doc['worker_side']}), {doc['repeats']} run(s) per side (median, min–max); QLoRA base: "
        f"{qlora['bnb_4bit_quant_type']}, double quant, compute {qlora['compute']}.",
    ]
    return "\n".join(lines) + "\n"
