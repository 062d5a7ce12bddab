"""`tunelab export`, `tunelab chat` and `tunelab bench infer` (registered by tunelab.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.errors import UserError


def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `tunelab train`.")],
    gguf: Annotated[str, typer.Option(help="GGUF files to write, comma separated: q4_k_m,q8_0,f16.")] = "q4_k_m",
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Upload to this Hub repo (user/name).")] = None,
    private: Annotated[bool, typer.Option(help="With --push-to-hub: create the repo private.")] = False,
    space: Annotated[Optional[Path], typer.Option(help="Also write a Hugging Face Space folder here.")] = None,
    dry_run: Annotated[bool, typer.Option(help="With --push-to-hub: list what would be uploaded, upload nothing.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for quantisation and the parity check.")] = None,
) -> None:
    """Merge the adapter, write GGUF files, check parity with llama.cpp, optionally build a Space / push to the Hub."""
    from tunelab.export.gguf import llama_cpp_source_dir
    from tunelab.export.hub import format_plan, push_to_hub as push, upload_plan
    from tunelab.export.pipeline import export_run, parse_quants
    from tunelab.models.runs import run_config

    quants = parse_quants(gguf)
    if dry_run and not push_to_hub:
        raise UserError("--dry-run: only applies to --push-to-hub REPO")
    if push_to_hub and push_to_hub.count("/") != 1:
        raise UserError(f"--push-to-hub: expected a repo id like user/name (got {push_to_hub!r})")
    run_config(run_dir)  # fail on a wrong folder before any work
    llama_cpp_source_dir()  # fetch the converter up front (prints what it does)
    export_run(run_dir, quants, space_dir=space, threads=threads, repo_id=push_to_hub)
    if push_to_hub:
        plan = upload_plan(run_dir, run_dir / "export")
        typer.echo(format_plan(push_to_hub, plan, private))
        if not dry_run:
            url = push(push_to_hub, plan, private)
            typer.echo(f"uploaded: {url}")


def chat_cmd(
    model: Annotated[Path, typer.Argument(help="A run folder, a merged HF folder or a .gguf file.")],
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all cores).")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.9,
    max_new_tokens: Annotated[int, typer.Option()] = 256,
    repetition_penalty: Annotated[float, typer.Option()] = 1.1,
    system: Annotated[Optional[str], typer.Option(help="A system message for the conversation.")] = None,
) -> None:
    """Chat with a model in the terminal (streaming). /reset clears the conversation, /exit quits."""
    from tunelab.serve.backends import GenerationParams, load_backend
    from tunelab.serve.terminal import chat_loop

    params = GenerationParams(temperature, top_p, max_new_tokens, repetition_penalty).validate()
    backend = load_backend(model, threads=threads)
    chat_loop(backend, params, system=system)


def bench_infer_cmd(
    models: Annotated[list[Path], typer.Argument(help="Models to compare: run/merged folders and .gguf files.")],
    threads: Annotated[int, typer.Option(help="Threads, the same for every model.")] = 2,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    repeats: Annotated[int, typer.Option(help="Runs per prompt (the first is a warm-up).")] = 2,
    output: Annotated[Optional[Path], typer.Option(help="Also write the results as JSON here.")] = None,
) -> None:
    """Time to first token, decode tokens/s, RSS and file size per model, on the same prompts and threads."""
    from tunelab.export.bench import run_bench

    run_bench(models, threads=threads, max_new_tokens=max_new_tokens, repeats=repeats, output=output)
