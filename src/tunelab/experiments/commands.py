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
    config: Annotated[Path, typer.Argument(help="Base YAML config.")],
    grid: Annotated[list[str], typer.Option("--grid", help="key.path=v1,v2,... (repeatable; the grid is their product).")],
    output: Annotated[Optional[Path], typer.Option(help="Sweep folder (default: <train.output_dir>-sweep).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override applied to every grid point.")] = None,
) -> None:
    """Train + evaluate one run per grid point; rank them by held-out loss (JSON, Markdown and a plot)."""
    from tunelab.experiments.sweep import run_sweep

    run_sweep(config, grid, output=output, overrides=set_ or [])


def promote_cmd(
    candidate: Annotated[Optional[Path], typer.Argument(help="Run folder or .gguf to promote (not needed with --rollback).")] = None,
    over: Annotated[Optional[Path], typer.Option("--over", help="The model served now: run folder or .gguf.")] = None,
    serve_dir: Annotated[
        Optional[Path], typer.Option(help="Folder whose current.json `tunelab serve DIR` serves; updated only when the gates pass.")
    ] = None,
    evalset: Annotated[
        Optional[Path], typer.Option(help="Feedback regression set (`tunelab feedback export DB --format evalset`).")
    ] = None,
    rollback: Annotated[bool, typer.Option(help="Point --serve-dir back at the model served before the last promotion.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="Threads for the latency measurement.")] = 2,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Gate override, e.g. --set promote.min_regression_win_rate=0.6.")] = None,
) -> None:
    """Compare CANDIDATE with the current model (val loss, feedback regression set, travel rubric, q4_k_m latency);
    write a decision report and promote only when every measured gate passes. Exit code 1 when not promoted."""
    if rollback:
        from tunelab.serve.pointer import rollback as roll_back

        if serve_dir is None:
            raise UserError("--rollback: give --serve-dir DIR")
        restored = roll_back(serve_dir)
        typer.echo(f"rolled back: {serve_dir / 'current.json'} -> {restored['model']}")
        return
    if candidate is None or over is None:
        raise UserError("give CANDIDATE and --over CURRENT (or --rollback --serve-dir DIR)")
    from tunelab.experiments.promote import promote

    decision = promote(candidate, over, serve_dir, set_ or [], evalset, threads, log=typer.echo)
    if not decision.promote:
        raise typer.Exit(1)
