"""`tunelab sweep` (registered by tunelab.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer



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
    over: Annotated[
        Optional[Path],
        typer.Option("--over", help="The model served now: run folder or .gguf (default: what --serve-dir serves)."),
    ] = None,
    serve_dir: Annotated[
        Optional[Path], typer.Option(help="Folder whose current.json `tunelab serve DIR` serves; updated only when the gates pass.")
    ] = None,
    evalset: Annotated[
        Optional[Path], typer.Option(help="Feedback regression set (`tunelab feedback export DB --format evalset`).")
    ] = None,
    rollback: Annotated[bool, typer.Option(help="Point --serve-dir back at the model served before the last promotion.")] = False,
    space: Annotated[
        Optional[Path], typer.Option(help="Also rebuild this Space bundle around the model --serve-dir now serves (a q4_k_m export).")
    ] = None,
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
        _refresh_space(serve_dir, space)
        return
    from tunelab.experiments.promote import promote, served_run

    if over is None and serve_dir is not None:
        over = served_run(serve_dir)
    if candidate is None or over is None:
        raise UserError("give CANDIDATE and --over CURRENT or --serve-dir DIR (or --rollback --serve-dir DIR)")

    if space is not None and serve_dir is None:
        raise UserError("--space: give --serve-dir DIR too (the Space serves what DIR's current.json names)")
    decision = promote(candidate, over, serve_dir, set_ or [], evalset, threads, log=typer.echo)
    if not decision.promote:
        raise typer.Exit(1)
    _refresh_space(serve_dir, space)


def _refresh_space(serve_dir: Path | None, space: Path | None) -> None:
    if space is not None and serve_dir is not None:
        from tunelab.serve.pointer import refresh_space

        typer.echo(f"Space bundle {space}: now serves {refresh_space(serve_dir, space).resolve()}")
