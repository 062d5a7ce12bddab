"""CLI commands owned by the data stage (registered by tunelab.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.errors import UserError


def bench_data_cmd(
    scales: Annotated[str, typer.Option(help="Comma-separated sizes: 1 = the embedded ShareGPT file once, 2 = twice (perturbed copies), ...")] = "1,2,4",
    rows: Annotated[Optional[str], typer.Option(help="FineTome-sized inputs instead: comma-separated row counts, e.g. 10000,100000 (a single N also runs 10000 first).")] = None,
    out: Annotated[Path, typer.Option(help="--rows: folder for the generated inputs, prepared data and logs.")] = Path("runs/bench-data"),
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Time each data phase on the embedded ShareGPT file (--scales), or prepare FineTome-sized JSONL and Parquet
    inputs and report wall time, peak RSS and rows/s (--rows)."""
    from tunelab.data.bench import print_bench, print_rows_bench, run_bench, run_rows_bench

    if rows is not None:
        sizes = _sizes("--rows", rows, minimum=100)
        if len(sizes) == 1 and sizes[0] != 10_000:
            sizes = sorted({10_000, sizes[0]})  # flat memory is a comparison: measure the 10k baseline too
        figures = run_rows_bench(sizes, out)
        print_rows_bench(figures)
    else:
        figures = run_bench(_sizes("--scales", scales, minimum=1))
        print_bench(figures)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"figures written to {json_path}")


def _sizes(option: str, text: str, minimum: int) -> list[int]:
    try:
        sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{option} {text}: expected comma-separated integers, e.g. 1,2,4") from None
    if not sizes or min(sizes) < minimum:
        raise UserError(f"{option} {text}: every value must be >= {minimum}")
    return sizes
