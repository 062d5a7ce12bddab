"""CLI commands owned by the data stage (registered by tunelab.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.errors import UserError


def bench_data_cmd(
    scales: Annotated[str, typer.Option(help="Comma-separated sizes: 1 = the embedded ShareGPT file once, 2 = twice (perturbed copies), ...")] = "1,2,4",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Time each data phase (recover, normalise, exact+near dedup, template+tokenise) on the embedded ShareGPT file."""
    from tunelab.data.bench import print_bench, run_bench

    try:
        sizes = [int(s) for s in scales.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--scales {scales}: expected comma-separated integers, e.g. 1,2,4") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--scales {scales}: every scale must be >= 1")
    figures = run_bench(sizes)
    print_bench(figures)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"figures written to {json_path}")
