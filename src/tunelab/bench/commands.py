"""`tunelab bench data|train|infer` (registered by tunelab.cli); results go to docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import UserError


def bench_data_cmd(
    scales: Annotated[
        str,
        typer.Option(
            help="Comma-separated sizes: 1 = the embedded ShareGPT file once, 2 = twice (perturbed copies), ..."
        ),
    ] = "1,2,4",
    rows: Annotated[
        str | None,
        typer.Option(
            help=(
                "FineTome-sized inputs instead: comma-separated row counts, e.g. 10000,100000 "
                "(a single N also runs 10000 first)."
            )
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="--rows: folder for the generated inputs, prepared data and logs.")] = Path(
        "runs/bench-data"
    ),
    max_records: Annotated[
        int | None,
        typer.Option(min=1, help="--scales: read only the file's first N records per copy (a quick run; default all)."),
    ] = None,
    formats: Annotated[
        str, typer.Option(help="--rows: the input formats to measure, comma-separated (jsonl, parquet).")
    ] = "jsonl,parquet",
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Time each data phase on the embedded ShareGPT file (--scales), or prepare FineTome-sized JSONL and Parquet
    inputs and report wall time, peak RSS and rows/s, beside a plain Hugging Face datasets load + chat-template map
    + save of the same file (--rows)."""
    from tunelab.bench.data import INPUT_FORMATS, print_bench, print_rows_bench, run_bench, run_rows_bench

    if rows is not None:
        sizes = _sizes("--rows", rows, minimum=100)
        if len(sizes) == 1 and sizes[0] != 10_000:
            sizes = sorted({10_000, sizes[0]})  # flat memory is a comparison: measure the 10k baseline too
        chosen = {f.strip().lower() for f in formats.split(",") if f.strip()}
        if not chosen or not chosen <= set(INPUT_FORMATS):
            raise UserError(f"--formats {formats}: expected one or both of {', '.join(INPUT_FORMATS)}")
        figures = run_rows_bench(sizes, out, tuple(f for f in INPUT_FORMATS if f in chosen))
        write_results(json_path, figures)
        print_rows_bench(figures)
    else:
        figures = run_bench(_sizes("--scales", scales, minimum=1), max_records)
        write_results(json_path, figures)
        print_bench(figures)


def write_results(path: Path | None, figures: dict, markdown: str | None = None) -> None:
    """The figures as JSON at `path` (and `markdown` beside it as .md), atomically, before anything is printed:
    a printing error never costs the measurements."""
    if path is None:
        return
    from tunelab.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(figures, indent=2) + "\n")
    if markdown is not None:
        atomic_write(path.with_suffix(".md"), markdown)
    typer.echo(f"figures written to {path}" + (f" and {path.with_suffix('.md')}" if markdown is not None else ""))


def _sizes(option: str, text: str, minimum: int) -> list[int]:
    try:
        sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{option} {text}: expected comma-separated integers, e.g. 1,2,4") from None
    if not sizes or min(sizes) < minimum:
        raise UserError(f"{option} {text}: every value must be >= {minimum}")
    return sizes


def bench_train_cmd(
    vs: Annotated[
        str,
        typer.Option(
            "--vs",
            help=(
                "What to compare: trl (tunelab vs TRL), qlora (4-bit NF4 base + LoRA vs bf16 LoRA vs fp32 LoRA, on "
                "each of --models), or none (tunelab alone)."
            ),
        ),
    ] = "trl",
    models: Annotated[
        str | None,
        typer.Option(
            help=(
                "--vs qlora: comma-separated models, each `llama32-1b-shape` (Llama-3.2-1B's shape, random weights, "
                "built once under the cache) or a model.name (embedded:..., a folder). "
                "Default: the config's model,llama32-1b-shape."
            )
        ),
    ] = None,
    loop: Annotated[
        str,
        typer.Option(
            help=(
                "--vs qlora: the loop every side runs: lean (gradient checkpointing + heap released every step, "
                "as the QLoRA configs run) or fastest (the default loop)."
            )
        ),
    ] = "lean",
    repeats: Annotated[int, typer.Option(min=1, help="Runs per side (alternating); medians are reported.")] = 3,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=(
                "Optimizer steps per run (default 40: it moves the adapters enough for the held-out loss check; "
                "5 with --vs qlora)."
            ),
        ),
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option("--precision", help="fp32 and/or bf16 (default: fp32, plus bf16 where the CPU has native bf16)."),
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="Intra-op threads for both sides.")] = 2,
    config: Annotated[
        Path | None, typer.Option(help="Config for data/model/LoRA/train settings (default: the quickstart config).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override, e.g. --set train.max_seq_len=256.")
    ] = None,
    max_val_rows: Annotated[
        int | None,
        typer.Option(min=1, help="Held-out conversations scored after training (default 32; 8 with --vs qlora)."),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a tokens/s bar chart (PNG) here.")] = None,
    objective: Annotated[
        str,
        typer.Option(
            help="sft (vs TRL SFTTrainer) or dpo (vs TRL DPOTrainer, on pairs built from the config's conversations)."
        ),
    ] = "sft",
) -> None:
    """tunelab's training loop vs TRL SFTTrainer/DPOTrainer + PEFT (--vs trl), or QLoRA vs bf16 and fp32 LoRA
    (--vs qlora): real tokens/s, s/step, peak RSS, held-out figures."""
    from tunelab.bench.machine import command_line
    from tunelab.bench.train import markdown_table, plot_throughput, print_table, run_bench
    from tunelab.config import QUICKSTART_CONFIG, load_config

    if vs not in ("trl", "qlora", "none"):
        raise UserError(f"--vs {vs}: expected trl, qlora or none")
    if objective not in ("sft", "dpo"):
        raise UserError(f"--objective {objective}: expected sft or dpo")
    if vs == "qlora":
        for option, given in (("--precision", precision), ("--plot", plot), ("--objective dpo", objective == "dpo")):
            if given:
                raise UserError(
                    f"{option}: not used with --vs qlora (its sides are qlora, bf16 and fp32 LoRA on sft; the 4-bit "
                    "base computes in bf16 where the CPU has it)"
                )
        from tunelab.bench.qlora import markdown_table as qlora_table

        doc = bench_qlora(models, loop, config, set_, steps, repeats, threads, max_val_rows)
        write_results(json_path, doc, qlora_table(doc))
        typer.echo(qlora_table(doc))
        return
    for option, value in (("--models", models), ("--loop", None if loop == "lean" else loop)):
        if value is not None:
            raise UserError(f"{option}: only with --vs qlora")
    for p in precision or []:
        if p not in ("fp32", "bf16"):
            raise UserError(f"--precision {p}: expected fp32 or bf16")
    cfg = load_config(config or QUICKSTART_CONFIG, set_ or [])
    if objective == "dpo":
        from tunelab.bench.dpo import markdown_table as dpo_table
        from tunelab.bench.dpo import run_dpo_bench

        run, table, show = run_dpo_bench, dpo_table, lambda doc: typer.echo(dpo_table(doc))
    else:
        run, table, show = run_bench, markdown_table, print_table
    doc = run(
        cfg,
        steps=steps or 40,
        repeats=repeats,
        precisions=precision or None,
        threads=threads,
        vs=None if vs == "none" else vs,
        max_val_rows=max_val_rows or 32,
        command=command_line(),
    )
    write_results(json_path, doc, table(doc))
    show(doc)
    if plot is not None:
        plot_throughput(doc, plot)
        typer.echo(f"wrote {plot}")


def bench_qlora(models, loop, config, set_, steps, repeats, threads, max_val_rows) -> dict:
    """`tunelab bench train --vs qlora` (tunelab.bench.qlora): its own options checked, then the run's document."""
    from tunelab.bench.llama32 import NAME
    from tunelab.bench.machine import command_line
    from tunelab.bench.qlora import DEFAULT_STEPS, DEFAULT_VAL_ROWS, LOOPS, run_qlora_bench
    from tunelab.config import QUICKSTART_CONFIG, load_config

    if loop not in LOOPS:
        raise UserError(f"--loop {loop}: expected {' or '.join(LOOPS)}")
    names = [m.strip() for m in (models or "").split(",") if m.strip()]
    if models is not None and (not names or len(set(names)) < len(names)):
        raise UserError(f"--models {models!r}: expected distinct comma-separated models, e.g. embedded:smollm2-135m")
    cfg = load_config(config or QUICKSTART_CONFIG, set_ or [])
    return run_qlora_bench(
        cfg,
        names or [cfg.model.name, NAME],
        steps=steps or DEFAULT_STEPS,
        repeats=repeats,
        threads=threads,
        loop=loop,
        max_val_rows=max_val_rows or DEFAULT_VAL_ROWS,
        command=command_line(),
    )


def bench_infer_cmd(
    models: Annotated[
        list[Path] | None, typer.Argument(help="Models to compare: run/merged folders and .gguf files.")
    ] = None,
    quants: Annotated[
        str | None,
        typer.Option(help="Quantisation table instead: comma-separated llama.cpp types, e.g. q4_k_m,q4_0,q5_k_m,q8_0."),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            help="With --quants: the run whose merged export is quantised (default: the quickstart's base model)."
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="Threads, the same for every model.")] = 2,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    repeats: Annotated[int, typer.Option(help="Runs per prompt (the first is a warm-up).")] = 2,
    output: Annotated[Path | None, typer.Option(help="Also write the results as JSON here.")] = None,
) -> None:
    """Time to first token, decode tokens/s, RSS and file size per model, on the same prompts and threads;
    with --quants, the quantisation table (adds held-out perplexity, the memory-bandwidth bound, a recommendation)."""
    if quants:
        from tunelab.bench.machine import run_header
        from tunelab.bench.quants import format_table, quant_table
        from tunelab.export.gguf import QUANT_TYPES

        chosen = [q.strip().lower() for q in quants.split(",") if q.strip()]
        unknown = [q for q in chosen if q not in QUANT_TYPES or q == "f16"]
        if unknown:
            raise UserError(
                f"--quants: unknown type `{unknown[0]}` (known: {', '.join(q for q in QUANT_TYPES if q != 'f16')})"
            )
        report = {**run_header(threads=threads), **quant_table(run, chosen, threads, max_new_tokens, repeats)}
        write_results(output, report)
        typer.echo(format_table(report))
        return
    if not models:
        raise UserError("bench infer: give the models to compare, or --quants for the quantisation table")
    from tunelab.bench.infer import run_bench

    run_bench(models, threads=threads, max_new_tokens=max_new_tokens, repeats=repeats, output=output)
