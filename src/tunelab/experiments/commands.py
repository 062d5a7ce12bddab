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
