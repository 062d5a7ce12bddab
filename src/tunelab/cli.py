"""The `tunelab` command line. Each command is a thin shell over one stage's function.

Heavy imports (torch, transformers, gradio) happen inside the commands so `--help` stays fast.
User errors (`tunelab.errors.UserError`) print one line and exit with code 2; `--debug` shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import UserError

app = typer.Typer(
    help="Fine-tune small chat models with LoRA on a CPU or GPU, export to GGUF, serve, and learn from feedback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (results go to docs/benchmarks.md).", no_args_is_help=True)
feedback_app = typer.Typer(help="Turn app feedback into datasets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(feedback_app, name="feedback")

SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable).")
]
ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.")]

_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _state["debug"] = debug


def load(config: Path | None, overrides: list[str] | None):
    from tunelab.config import load_config

    return load_config(config, overrides or [])


# ----------------------------------------------------------------------------------- config
@config_app.command("show")
def config_show(
    config: ConfigArg,
    set_: SetOption = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print each key's meaning (unit, range) above it.")
    ] = False,
) -> None:
    """Print the resolved config (defaults + file + --set overrides)."""
    from tunelab.config import explain as explained

    cfg = load(config, set_)
    typer.echo(explained(cfg) if explain else cfg.to_yaml(), nl=False)


# ------------------------------------------------------------------------------------- data
@data_app.command("prepare")
def data_prepare(
    config: ConfigArg,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a prepared copy for this config exists.")] = False,
) -> None:
    """Read, normalise, filter, dedup, split and tokenise the data sources; write a dataset folder + report."""
    from tunelab.data.prepare import prepare_dataset

    cfg = load(config, set_)
    out = prepare_dataset(cfg, force=force, verbose=True)
    typer.echo(f"prepared dataset: {out}")


# ------------------------------------------------------------------------------------ train
@app.command()
def train(
    config: ConfigArg,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Resume from the newest valid checkpoint in the run folder.")] = True,
    overwrite: Annotated[bool, typer.Option(help="With --no-resume: delete an existing run folder first.")] = False,
    extend: Annotated[
        bool,
        typer.Option(
            help="Continue the run to a larger train.max_steps "
            "(the learning-rate schedule is recomputed over the new total)."
        ),
    ] = False,
    doctor: Annotated[
        bool, typer.Option(help="Run the doctor's pre-training checks first and stop on a failure.")
    ] = True,
) -> None:
    """Fine-tune with LoRA; resumes an interrupted run in the same folder (never with changed settings or data)."""
    from tunelab.doctor.before import pre_training_gate
    from tunelab.train.recipe import run_training

    cfg = load(config, set_)
    if not doctor:
        typer.echo("doctor: pre-training checks skipped (--no-doctor)")
    run_training(
        cfg, resume=resume, overwrite=overwrite, extend=extend, preflight=pre_training_gate if doctor else None
    )


# ------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `tunelab train`.")],
    set_: SetOption = None,
    prompts: Annotated[
        str | None,
        typer.Option(
            help="Domain eval instead: `travel` (the shipped set) or a JSONL of "
            "{prompt, city?, days?, preferences?, country?, places?}."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="With --prompts: new tokens per answer (greedy).")] = 384,
    repetition_penalty: Annotated[float, typer.Option(min=0.01, help="With --prompts: 1.0 is plain greedy.")] = 1.0,
    limit: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --prompts: only the first N prompts; with --lm-eval: the first N documents of each task."
        ),
    ] = None,
    gguf: Annotated[
        bool, typer.Option(help="With --prompts: also compare base vs tuned GGUFs when RUN/export has one.")
    ] = True,
    adapter: Annotated[
        bool,
        typer.Option(help="With --prompts: also compare base vs tuned from the adapter (transformers fp32; slower)."),
    ] = True,
    quant: Annotated[
        str,
        typer.Option(
            help="With --prompts: the GGUF type compared "
            "(q4_k_m: what the app serves; q8_0 keeps more of a small fine-tune)."
        ),
    ] = "q4_k_m",
    judge: Annotated[
        Path | None, typer.Option(help="With --prompts: a judge GGUF for pairwise verdicts (both orders).")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="With --prompts or --lm-eval: CPU threads.")] = None,
    grammar: Annotated[
        bool,
        typer.Option(
            help="With --prompts: GGUFs answer under a grammar allowing exactly the prompt's days (a decoding lever)."
        ),
    ] = False,
    samples: Annotated[
        int,
        typer.Option(
            min=0,
            help="With --prompts: k sampled answers per prompt and side besides the greedy one, at --temperature with "
            "seeds --seed..seed+k-1; a prompt scores the mean of its answers (less at the mercy of one greedy path).",
        ),
    ] = 0,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="With --prompts --samples K: temperature of the sampled answers (the app's).")
    ] = 0.7,
    seed: Annotated[int, typer.Option(help="With --prompts --samples K: seed of the first sampled answer.")] = 0,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="Also: lm-eval harness tasks on base and tuned, side by side (comma-separated task names, "
            "task YAML files or folders; needs the optional lm-eval package).",
        ),
    ] = None,
) -> None:
    """Validation loss and perplexity of base vs tuned on the held-out split, plus sample generations;
    with --prompts, base vs tuned on domain prompts judged by the travel rubric (win/tie/loss, per criterion);
    with --lm-eval, also lm-eval harness tasks (their data is loaded first: a task that cannot be is named and
    skipped)."""
    from tunelab.eval.harness import load_tasks, run_lm_eval
    from tunelab.models.runs import run_config

    harness_tasks = None
    if lm_eval is not None:
        run_config(run_dir)  # fail on a wrong folder before loading any task
        harness_tasks = load_tasks(lm_eval)
    if prompts is not None:
        from tunelab.eval.domain import Decoding
        from tunelab.experiments.travel_eval import run_domain_eval
        from tunelab.export.pipeline import parse_quants

        decoding = Decoding(
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            day_grammar=grammar,
            samples=samples,
            temperature=temperature,
            seed=seed,
        )
        run_domain_eval(
            run_dir,
            prompts,
            decoding,
            limit,
            gguf,
            adapter,
            judge=judge,
            threads=threads,
            quant=parse_quants(quant, "--quant")[0],
        )
    else:
        from tunelab.eval.evaluate import evaluate_run

        evaluate_run(run_dir, overrides=set_ or [], verbose=True)
    if harness_tasks is not None:
        run_lm_eval(run_dir, harness_tasks, limit=limit, threads=threads)


# ----------------------------------------------------------------------------------- export
@app.command("export")
def export_(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `tunelab train`.")],
    gguf: Annotated[str, typer.Option(help="GGUF files to write, comma separated: q4_k_m,q8_0,f16.")] = "q4_k_m",
    push_to_hub: Annotated[
        str | None, typer.Option("--push-to-hub", help="Upload to this Hub repo (user/name).")
    ] = None,
    private: Annotated[bool, typer.Option(help="With --push-to-hub: create the repo private.")] = False,
    space: Annotated[Path | None, typer.Option(help="Also write a Hugging Face Space folder here.")] = None,
    dry_run: Annotated[
        bool, typer.Option(help="With --push-to-hub: list what would be uploaded, upload nothing.")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads for quantisation and the parity check.")] = None,
    adapter_gguf: Annotated[
        bool,
        typer.Option(
            help="Also write the adapter as a GGUF LoRA (adapter-f16.gguf) and the unmerged base (base-<type>.gguf), "
            "so one base in memory serves several adapters per request (llama-server)."
        ),
    ] = False,
    merge_into: Annotated[
        str | None,
        typer.Option(
            help="QLoRA runs: merge into `dequantized` (the 4-bit weights the adapter was trained on; default) or "
            "`original` (the unquantised base); parity.json measures both against the trained model."
        ),
    ] = None,
) -> None:
    """Merge the adapter, write GGUF files, check parity with llama.cpp, optionally build a Space / push to the Hub."""
    from tunelab.export.gguf import llama_cpp_source_dir
    from tunelab.export.pipeline import export_run, parse_quants
    from tunelab.hub import check_repo_id, format_plan, upload_plan
    from tunelab.hub import push_to_hub as push
    from tunelab.models.runs import run_config
    from tunelab.serve.space import build_run_space

    quants = parse_quants(gguf)
    if dry_run and not push_to_hub:
        raise UserError("--dry-run: only applies to --push-to-hub REPO")
    if push_to_hub:
        check_repo_id(push_to_hub)
    run_config(run_dir)  # fail on a wrong folder before any work
    llama_cpp_source_dir()  # fetch the converter up front (prints what it does)
    if merge_into is not None and merge_into not in ("dequantized", "original"):
        raise UserError(f"--merge-into: `{merge_into}` is not one of dequantized, original")
    export_run(run_dir, quants, threads=threads, merge_into=merge_into, adapter_gguf=adapter_gguf)
    if space is not None:
        build_run_space(run_dir, space, model_repo=push_to_hub)
    if push_to_hub:
        plan = upload_plan(run_dir, run_dir / "export")
        typer.echo(format_plan(push_to_hub, plan, private))
        if not dry_run:
            url = push(push_to_hub, plan, private)
            typer.echo(f"uploaded: {url}")


# ------------------------------------------------------------------------------- quickstart
@app.command()
def quickstart(
    output: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/quickstart"),
    set_: SetOption = None,
    serve: Annotated[bool, typer.Option(help="Export GGUF q4_k_m and open the app at the end.")] = False,
    travel_prompts: Annotated[
        int,
        typer.Option(min=0, help="Shipped travel prompts to judge base vs tuned on, from the q4_k_m GGUFs (0: skip)."),
    ] = 48,
    travel_samples: Annotated[
        int,
        typer.Option(
            min=0, help="Sampled answers per travel prompt and side besides the greedy one (the app's temperature)."
        ),
    ] = 2,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="llama.cpp threads per model in the travel check (recorded with its results; default: half the "
            "cores, so base and tuned answer side by side).",
        ),
    ] = None,
) -> None:
    """Prepare embedded data, fine-tune the embedded SmolLM2-135M on this CPU, evaluate base vs tuned."""
    from tunelab.experiments.quickstart import run_quickstart

    run_quickstart(
        output, overrides=set_ or [], serve=serve, travel_prompts=travel_prompts, travel_samples=travel_samples,
        threads=threads,
    )  # fmt: skip


def _register_stage_commands() -> None:
    """Commands owned by later stages live next to their code (serve/, bench/, experiments/)."""
    from tunelab.bench.commands import bench_data_cmd, bench_infer_cmd, bench_train_cmd
    from tunelab.bench.serve_load import bench_serve_cmd
    from tunelab.doctor.commands import doctor_cmd
    from tunelab.experiments.commands import promote_cmd, report_cmd, sweep_cmd, travel_data_cmd
    from tunelab.serve.chat import chat_cmd
    from tunelab.serve.commands import feedback_export_cmd, serve_cmd

    app.command("doctor")(doctor_cmd)
    app.command("chat")(chat_cmd)
    app.command("serve")(serve_cmd)
    app.command("sweep")(sweep_cmd)
    app.command("promote")(promote_cmd)
    app.command("report")(report_cmd)
    data_app.command("travel")(travel_data_cmd)
    feedback_app.command("export")(feedback_export_cmd)
    bench_app.command("train")(bench_train_cmd)
    bench_app.command("data")(bench_data_cmd)
    bench_app.command("infer")(bench_infer_cmd)
    bench_app.command("serve")(bench_serve_cmd)


_register_stage_commands()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except UserError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
