"""`tunelab eval RUN --prompts ...` end to end: find (or make) the base and tuned GGUFs, then run the domain eval.

The tuned GGUF is what `tunelab export` wrote (RUN/export/model-<quant>.gguf; q4_k_m, what the app serves, unless
`--quant` names another type). Its fair base is the same base model through the same converter and quantiser, so
the first domain eval of an exported run writes RUN/export/base-<quant>.gguf once (about as long as the export's
f16 + quantise steps) and reuses it afterwards.
This lives above export/ and eval/ because it needs both.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.eval.domain import Decoding, evaluate_domain
from tunelab.eval.rubric import load_travel_prompts
from tunelab.export.pipeline import BASE_GGUF

SHIPPED_QUANT = "q4_k_m"  # what the app and the Space serve


def quant_suffix(quant: str) -> str:
    """What eval files of a GGUF type other than the shipped one carry, so they never overwrite the shipped one's."""
    return "" if quant == SHIPPED_QUANT else f"-{quant}"


def tuned_gguf_path(run_dir: Path, quant: str = SHIPPED_QUANT) -> Path:
    return run_dir / "export" / f"model-{quant}.gguf"


def base_gguf_path(run_dir: Path, quant: str = SHIPPED_QUANT) -> Path:
    """The file `tunelab export RUN --adapter-gguf` also writes (the unmerged base), so either can reuse it."""
    return run_dir / "export" / BASE_GGUF.format(quant=quant)


def export_base_gguf(
    run_dir: Path, threads: int | None = None, log=print, target: Path | None = None, quant: str = SHIPPED_QUANT
) -> Path:
    """The run's base model (no adapter) as a GGUF of type `quant`, made once (`export.pipeline.export_base_ggufs`).

    `target` lets a sweep share one base GGUF between runs of the same base model."""
    from tunelab.export.pipeline import export_base_ggufs

    target = target or base_gguf_path(run_dir, quant)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"exporting the base model to {target} (once, for a like-for-like GGUF comparison)")
    return export_base_ggufs(run_dir, {quant: target}, threads)[quant]


def domain_eval_name(prompts_source: str, day_grammar: bool = False, quant: str = SHIPPED_QUANT) -> str:
    """The stem of a domain eval's files in RUN/eval (`travel`, `travel-grammar`, `domain-<file>-q8_0`, ...)."""
    name = "travel" if prompts_source == "travel" else f"domain-{Path(prompts_source).stem}"
    return name + ("-grammar" if day_grammar else "") + quant_suffix(quant)


def planner_decoding(max_new_tokens: int | None = None, samples: int = 0) -> Decoding:
    """How the app's Travel Planner decodes a GGUF by default (its token budget, day-plan grammar, repetition penalty
    and temperature): the quickstart's check and the promotion gate judge what users would get. `samples` sampled
    answers per prompt besides the greedy one, from fixed seeds."""
    from tunelab.models.inference import GenerationParams
    from tunelab.serve import limits

    return Decoding(
        max_new_tokens=max_new_tokens or limits.PLANNER_MAX_NEW_TOKENS,
        repetition_penalty=GenerationParams.repetition_penalty,
        day_grammar=limits.PLANNER_DAY_FORMAT,
        samples=samples,
        temperature=GenerationParams.temperature,
    )


def run_domain_eval(
    run_dir: Path,
    prompts_source: str,
    decoding: Decoding | None = None,
    limit: int | None = None,
    gguf: bool = True,
    adapter: bool = True,
    judge: Path | None = None,
    threads: int | None = None,
    log=print,
    base_gguf: Path | None = None,
    quant: str = SHIPPED_QUANT,
) -> dict:
    from tunelab.models.runs import run_config

    decoding = decoding or Decoding()
    run_config(run_dir)  # a clear error for a folder that is not a finished run
    prompts = load_travel_prompts(prompts_source)[: limit or None]
    name = domain_eval_name(prompts_source, decoding.day_grammar, quant)
    ggufs = None
    if gguf and tuned_gguf_path(run_dir, quant).is_file():
        ggufs = (export_base_gguf(run_dir, threads, log, base_gguf, quant), tuned_gguf_path(run_dir, quant))
    elif gguf:
        log(
            f"no {tuned_gguf_path(run_dir, quant)}: GGUF comparison skipped "
            f"(run `tunelab export {run_dir} --gguf {quant}` first)"
        )
    if judge is None:
        log("judge: none given (--judge MODEL.gguf adds pairwise verdicts); lm-eval harness tasks: --lm-eval TASKS")
    if decoding.day_grammar and adapter:
        log("--grammar constrains llama.cpp only: the adapter comparison is skipped")
        adapter = False
    if not adapter and ggufs is None:
        from tunelab.errors import UserError

        raise UserError(
            f"{run_dir}: nothing to compare — no {tuned_gguf_path(run_dir, quant).name} in RUN/export and the "
            "adapter comparison is off (drop --no-adapter, or export first)"
        )
    # A base GGUF shared by a sweep's runs keeps its answers beside it: the base side is answered once per sweep.
    base_answers = base_gguf.with_suffix(".answers.json") if base_gguf is not None and ggufs is not None else None
    return evaluate_domain(
        run_dir,
        prompts,
        name,
        decoding,
        ggufs=ggufs,
        judge=judge,
        adapter=adapter,
        threads=threads,
        log=log,
        base_answers=base_answers,
    )
