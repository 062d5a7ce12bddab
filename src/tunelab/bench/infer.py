"""`tunelab bench infer`: TTFT, decode tokens/s, peak RSS and size per model, same prompts and threads.

Each model is measured in its own fresh process (spawn), so the RSS is that model's and not the sum of
everything loaded before it. Timings go through the same ChatBackend the app uses.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

from tunelab.bench.machine import run_header
from tunelab.config import DEMO_PROMPTS
from tunelab.errors import UserError
from tunelab.io import atomic_write


def model_size_mib(path: Path) -> float:
    """File size of a GGUF; for folders the weights (a run folder: base weights + adapter)."""
    if path.is_file():
        return path.stat().st_size / 2**20
    from tunelab.models.runs import is_run_dir, run_config

    files = list(path.rglob("*.safetensors"))
    if is_run_dir(path):
        from tunelab.models import resolve_model_path

        files += list(Path(resolve_model_path(run_config(path).model.name)).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


def count_tokens(backend, text: str) -> int:
    if backend.kind == "llama.cpp":
        return len(backend.llm.tokenize(text.encode(), add_bos=False, special=True))
    return len(backend.tokenizer(text, add_special_tokens=False)["input_ids"])


def measure_model(path: str, threads: int, max_new_tokens: int, repeats: int) -> dict:
    """Runs in a child process: load, warm up, then time every prompt."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from tunelab.models.inference import GenerationParams, load_backend
    from tunelab.train.memory import peak_rss_mib  # the child's own peak, not its parent's

    started = time.perf_counter()
    backend = load_backend(path, threads=threads)
    load_s = time.perf_counter() - started
    params = GenerationParams(temperature=0.0, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
    ttfts, rates, tokens = [], [], []
    for prompt in DEMO_PROMPTS:
        for attempt in range(repeats):
            t0 = time.perf_counter()
            first, text = None, ""
            for piece in backend.stream_chat([{"role": "user", "content": prompt}], params):
                first = first or time.perf_counter()
                text += piece
            end = time.perf_counter()
            if attempt == 0 and repeats > 1:
                continue  # warm-up: first-call allocations and caches
            n = count_tokens(backend, text)
            ttfts.append((first or end) - t0)
            if n > 1 and first:
                rates.append((n - 1) / (end - first))
            tokens.append(n)
    return {
        "model": path,
        "backend": backend.kind,
        "size_mib": round(model_size_mib(Path(path)), 1),
        "load_s": round(load_s, 2),
        "ttft_s": round(sum(ttfts) / len(ttfts), 3),
        "decode_tok_s": round(sum(rates) / len(rates), 1) if rates else None,
        "tokens_per_reply": round(sum(tokens) / len(tokens), 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def _child(queue, *args) -> None:
    try:
        queue.put(measure_model(*args))
    except BaseException as exc:  # report instead of hanging the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def format_results(results: list[dict], threads: int) -> str:
    lines = [
        f"threads={threads}",
        f"{'model':<44} {'backend':<12} {'size MiB':>9} {'TTFT s':>7} {'decode tok/s':>12} {'RSS MiB':>8}",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<44} error: {r['error']}")
            continue
        lines.append(
            f"{Path(r['model']).name[:44]:<44} {r['backend']:<12} {r['size_mib']:>9.1f} {r['ttft_s']:>7.3f} "
            f"{r['decode_tok_s'] or 0:>12.1f} {r['peak_rss_mib']:>8.1f}"
        )
    return "\n".join(lines)


def run_bench(
    models: list[Path], threads: int = 2, max_new_tokens: int = 64, repeats: int = 2, output: Path | None = None
) -> dict:
    for m in models:
        if not m.exists():
            raise UserError(f"{m}: not found")
    ctx = multiprocessing.get_context("spawn")
    results = []
    for model in models:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, str(model), threads, max_new_tokens, repeats))
        proc.start()
        results.append(queue.get())
        proc.join()
        print(format_results(results[-1:], threads).splitlines()[-1], flush=True)
    report = {
        **run_header(threads=threads),
        "threads": threads,
        "max_new_tokens": max_new_tokens,
        "prompts": DEMO_PROMPTS,
        "results": results,
    }
    if output:  # written before the table is printed: a printing error never costs the measurements
        atomic_write(output, json.dumps(report, indent=2) + "\n")
    print(format_results(results, threads))
    return report
