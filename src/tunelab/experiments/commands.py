"""`tunelab sweep` (registered by tunelab.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import UserError


def sweep_cmd(
    config: Annotated[
        Path, typer.Argument(help="A sweep file (base + grid/runs + held-out sets), or a base config with --grid.")
    ],
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            help="Shortcut: key.path=v1,v2,... on a base config (repeatable; the grid is their product); every run is "
            "judged on the base config's own validation split.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Sweep folder (default: the sweep file's `output`, or <train.output_dir>-sweep)."),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="With --grid: override applied to every grid point.")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads of every run: training, llama.cpp judging and latency (default: the sweep file's "
            "train.threads and latency.threads). Give each of two sweeps on one machine its own cores.",
        ),
    ] = None,
) -> None:
    """Train, export and judge one run per sweep point on the same held-out sets; results.csv/.md and plots.

    Re-running skips finished runs and resumes an interrupted one."""
    from tunelab.experiments.study import run_grid, run_study

    if grid:
        run_grid(config, grid, set_ or [], output=output, threads=threads)
        return
    if set_:
        raise UserError("--set: only with --grid (put overrides for every run in the sweep file's `set`)")
    run_study(config, output=output, threads=threads)


def report_cmd(sweep_dir: Annotated[Path, typer.Argument(help="A sweep folder written by `tunelab sweep`.")]) -> None:
    """Rebuild results.csv, results.md and the plots from a sweep folder's finished runs."""
    from tunelab.experiments.results import rebuild_report

    for path in rebuild_report(sweep_dir):
        typer.echo(f"wrote {path}")


def travel_data_cmd(
    output: Annotated[
        Path,
        typer.Argument(help="Folder for itineraries.jsonl, self-generated.jsonl, preference-pairs.jsonl, counts.json."),
    ],
    prompts: Annotated[
        int, typer.Option(min=0, help="Synthetic travel prompts to sample (0: only select real itineraries).")
    ] = 40,
    samples: Annotated[
        int, typer.Option(min=1, help="Sampled answers per synthetic prompt (rejection sampling keeps the best).")
    ] = 4,
    model: Annotated[
        Path | None, typer.Option(help="GGUF to sample from (default: the embedded base SmolLM2-135M).")
    ] = None,
    min_score: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Keep a best answer only at or above this rubric score.")
    ] = 1.0,
    threads: Annotated[int | None, typer.Option(min=1, help="llama.cpp threads.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic prompt mix.")] = 0,
    max_days: Annotated[int, typer.Option(min=1, max=7, help="Synthetic prompts ask for 1 to this many days.")] = 5,
    grammar: Annotated[
        bool, typer.Option(help="Sample under a grammar that allows exactly the prompt's number of 'Day n' sections.")
    ] = False,
    recheck: Annotated[
        Path | None,
        typer.Option(
            help="Also put a plans file made earlier (e.g. src/tunelab/data/travel_plans.jsonl) through today's "
            "pass/fail checks (stays_in_city included) into OUTPUT/rechecked.jsonl."
        ),
    ] = None,
) -> None:
    """Travel training data: real day-by-day itineraries from the embedded ShareGPT, plus base-model answers to
    synthetic prompts kept by rejection sampling under the travel rubric (never the shipped eval prompts)."""
    from tunelab.experiments.travel_data import (
        gguf_sampler,
        rejection_sample,
        select_itineraries,
        sharegpt_first_exchanges,
        synthetic_prompts,
    )
    from tunelab.io import atomic_write, write_jsonl

    earlier_plans = _plans_to_recheck(recheck) if recheck is not None else None  # refused before any sampling
    kept, counts = select_itineraries(sharegpt_first_exchanges())
    write_jsonl(output / "itineraries.jsonl", kept)
    report = {"itineraries": dict(counts)}
    typer.echo(f"real itineraries: {counts['after_exact_dedup']} kept; filters: {dict(counts)}")
    if prompts:
        from tunelab.models.loading import embedded_gguf_path

        sampler = gguf_sampler(model or embedded_gguf_path("smollm2-135m"), threads=threads, day_grammar=grammar)
        rows, pairs, sampled = rejection_sample(
            synthetic_prompts(prompts, seed, max_days), sampler, samples, min_score, log=typer.echo
        )
        write_jsonl(output / "self-generated.jsonl", rows)
        write_jsonl(output / "preference-pairs.jsonl", pairs)
        report["self_generated"] = {
            **dict(sampled),
            "kept": sampled["kept"],
            "preference_pairs": len(pairs),
            "min_score": min_score,
            "day_grammar": grammar,
        }
        typer.echo(
            f"self-generated: kept {sampled['kept']} of {sampled['prompts']} prompts from {sampled['samples']} samples"
        )
    if earlier_plans is not None:
        from tunelab.experiments.travel_data import recheck_plans

        rechecked, recounted = recheck_plans(earlier_plans)
        write_jsonl(output / "rechecked.jsonl", rechecked)
        report["rechecked"] = {"source": str(recheck), **dict(recounted)}
        typer.echo(f"rechecked {recheck}: kept {recounted['kept']} of {recounted['plans']}; filters: {dict(recounted)}")
    atomic_write(output / "counts.json", json.dumps(report, indent=2))


def _plans_to_recheck(path: Path) -> list[dict]:
    """The --recheck file's plans: each a {"messages": [user, ..., assistant]} record with text contents."""
    from tunelab.io import jsonl_records

    if not path.is_file():
        raise UserError(f"--recheck {path}: file not found")
    plans = []
    for where, plan in jsonl_records(path):
        messages = plan.get("messages")
        if not (
            isinstance(messages, list)
            and len(messages) >= 2
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        ):
            raise UserError(f"{where}: needs `messages`, a list of at least two messages with text `content`")
        plans.append(plan)
    return plans


def promote_cmd(
    candidate: Annotated[
        Path | None, typer.Argument(help="Run folder or .gguf to promote (not needed with --rollback).")
    ] = None,
    over: Annotated[
        Path | None,
        typer.Option("--over", help="The model served now: run folder or .gguf (default: what --serve-dir serves)."),
    ] = None,
    serve_dir: Annotated[
        Path | None,
        typer.Option(help="Folder whose current.json `tunelab serve DIR` serves; updated only when the gates pass."),
    ] = None,
    evalset: Annotated[
        Path | None, typer.Option(help="Feedback regression set (`tunelab feedback export DB --format evalset`).")
    ] = None,
    rollback: Annotated[
        bool, typer.Option(help="Point --serve-dir back at the model served before the last promotion.")
    ] = False,
    space: Annotated[
        Path | None,
        typer.Option(help="Also rebuild this Space bundle around the model --serve-dir now serves (a q4_k_m export)."),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            min=1,
            help="llama.cpp threads per model, for the rubric gate (its two files answer side by side when twice "
            "this fits the cores) and the latency measurement.",
        ),
    ] = 2,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Gate override, e.g. --set promote.min_regression_win_rate=0.6."),
    ] = None,
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
