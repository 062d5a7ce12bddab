"""`tunelab doctor CONFIG|RUN`: the table of checks; exit 0 when none fails, 2 when one does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import UserError


def doctor_cmd(
    target: Annotated[
        Path, typer.Argument(help="A YAML config (checks before training) or a run folder (after training/export).")
    ],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="With a config: override a key, e.g. --set lora.r=8.")
    ] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the report to this JSON file.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="With a run folder: CPU threads for llama.cpp.")] = None,
) -> None:
    """Named checks for what fine-tuning gets silently wrong: pass / warn / fail, the evidence, what to do."""
    from tunelab.doctor.report import render_report, write_json
    from tunelab.models.runs import is_run_dir

    if is_run_dir(target):
        from tunelab.doctor.after import doctor_run

        report = doctor_run(target, threads=threads)
    elif target.is_dir():
        raise UserError(f"{target}: not a run folder (needs adapter/ and config.yaml) and not a config file")
    else:
        from tunelab.config import load_config
        from tunelab.doctor.before import doctor_config

        report = doctor_config(load_config(target, set_ or []))
    render_report(report)
    if json_file is not None:
        write_json(report, json_file)
    raise typer.Exit(report.exit_code)
