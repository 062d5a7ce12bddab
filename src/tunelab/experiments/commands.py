"""`tunelab bench train` and `tunelab sweep` (registered by tunelab.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.errors import UserError


def bench_train_cmd(
    vs: Annotated[str, typer.Option("--vs", help="The peer to compare with (trl), or 'none' for tunelab alone.")] = "trl",
    repeats: Annotated[int, typer.Option(min=1, help="Runs per side (alternating); medians are reported.")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per run.")] = 20,
    precision: Annotated[
        Optional[list[str]], typer.Option("--precision", help="fp32 and/or bf16 (default: fp32, plus bf16 where the CPU has native bf16).")
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="Intra-op threads for both sides.")] = 2,
    config: Annotated[Optional[Path], typer.Option(help="Config for data/model/LoRA/train settings (default: the quickstart config).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override, e.g. --set train.max_seq_len=256.")] = None,
    max_val_rows: Annotated[int, typer.Option(min=1, help="Held-out conversations scored after training.")] = 32,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a tokens/s bar chart (PNG) here.")] = None,
) -> None:
    """tunelab's training loop vs TRL SFTTrainer + PEFT: real tokens/s, s/step, peak RSS, held-out loss."""
    from tunelab.config import load_config
    from tunelab.experiments.bench_train import command_line, markdown_table, plot_throughput, print_table, run_bench
    from tunelab.experiments.quickstart import QUICKSTART_CONFIG

    if vs not in ("trl", "none"):
        raise UserError(f"--vs {vs}: only `trl` (or `none`) is supported")
    for p in precision or []:
        if p not in ("fp32", "bf16"):
            raise UserError(f"--precision {p}: expected fp32 or bf16")
    cfg = load_config(config or QUICKSTART_CONFIG, set_ or [])
    doc = run_bench(
        cfg, steps=steps, repeats=repeats, precisions=precision or None, threads=threads,
        vs=None if vs == "none" else vs, max_val_rows=max_val_rows, command=command_line(),
    )
    print_table(doc)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=2))
        json_path.with_suffix(".md").write_text(markdown_table(doc))
        typer.echo(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    if plot is not None:
        plot_throughput(doc, plot)
        typer.echo(f"wrote {plot}")


def sweep_cmd(
    config: Annotated[Path, typer.Argument(help="A sweep file (base + grid/runs + held-out sets), or a base config with --grid.")],
    grid: Annotated[
        Optional[list[str]], typer.Option("--grid", help="Shortcut: key.path=v1,v2,... on a base config (repeatable; the grid is their product).")
    ] = None,
    output: Annotated[Optional[Path], typer.Option(help="Sweep folder (default: the sweep file's `output`, or <train.output_dir>-sweep).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="With --grid: override applied to every grid point.")] = None,
) -> None:
    """Train, export and judge one run per sweep point on the same held-out sets; results.csv/.md and plots.

    Re-running skips finished runs and resumes an interrupted one."""
    if grid:
        from tunelab.experiments.sweep import run_sweep

        run_sweep(config, grid, output=output, overrides=set_ or [])
        return
    if set_:
        raise UserError("--set: only with --grid (put overrides for every run in the sweep file's `set`)")
    from tunelab.experiments.study import run_study

    run_study(config, output=output)


def report_cmd(sweep_dir: Annotated[Path, typer.Argument(help="A sweep folder written by `tunelab sweep`.")]) -> None:
    """Rebuild results.csv, results.md and the plots from a sweep folder's finished runs."""
    from tunelab.experiments.results import rebuild_report

    for path in rebuild_report(sweep_dir):
        typer.echo(f"wrote {path}")


def travel_data_cmd(
    output: Annotated[Path, typer.Argument(help="Folder for itineraries.jsonl, self-generated.jsonl, preference-pairs.jsonl, counts.json.")],
    prompts: Annotated[int, typer.Option(min=0, help="Synthetic travel prompts to sample (0: only select real itineraries).")] = 40,
    samples: Annotated[int, typer.Option(min=1, help="Sampled answers per synthetic prompt (rejection sampling keeps the best).")] = 4,
    model: Annotated[Optional[Path], typer.Option(help="GGUF to sample from (default: the embedded base SmolLM2-135M).")] = None,
    min_score: Annotated[float, typer.Option(min=0.0, max=1.0, help="Keep a best answer only at or above this rubric score.")] = 1.0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="llama.cpp threads.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic prompt mix.")] = 0,
) -> None:
    """Travel training data: real day-by-day itineraries from the embedded ShareGPT, plus base-model answers to
    synthetic prompts kept by rejection sampling under the travel rubric (never the shipped eval prompts)."""
    from tunelab.experiments.travel_data import (
        gguf_sampler, rejection_sample, select_itineraries, sharegpt_first_exchanges, synthetic_prompts, write_jsonl,
    )

    kept, counts = select_itineraries(sharegpt_first_exchanges())
    write_jsonl(output / "itineraries.jsonl", kept)
    report = {"itineraries": dict(counts)}
    typer.echo(f"real itineraries: {counts['after_exact_dedup']} kept; filters: {dict(counts)}")
    if prompts:
        from tunelab.models.loading import embedded_gguf_path

        sampler = gguf_sampler(model or embedded_gguf_path("smollm2-135m"), threads=threads)
        rows, pairs, sampled = rejection_sample(synthetic_prompts(prompts, seed), sampler, samples, min_score, log=typer.echo)
        write_jsonl(output / "self-generated.jsonl", rows)
        write_jsonl(output / "preference-pairs.jsonl", pairs)
        report["self_generated"] = {**dict(sampled), "kept": sampled["kept"], "preference_pairs": len(pairs), "min_score": min_score}
        typer.echo(f"self-generated: kept {sampled['kept']} of {sampled['prompts']} prompts from {sampled['samples']} samples")
    (output / "counts.json").write_text(json.dumps(report, indent=2))
