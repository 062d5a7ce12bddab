"""`tunelab bench data`: time each phase of preparing the embedded ShareGPT file, at 1x/2x/4x its size.

Scale s reads and parses the file s times; copy c >= 1 of each record gets a small perturbation (a suffix on its
first message) so exact dedup keeps it and near-dedup has real work. The phases are DataPipeline's own methods.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

from tunelab.config import Config, SourceConfig
from tunelab.data import readers
from tunelab.data.prepare import DataPipeline, FileRecords
from tunelab.bench.machine import run_header

PHASES = ("recover", "normalise", "dedup_exact", "dedup_near", "encode")


def perturbed(record: Any, copy_index: int) -> Any:
    """A near-duplicate of a ShareGPT record: same text plus a short suffix on the first message."""
    if copy_index == 0 or not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return record
    record = copy.deepcopy(record)
    first = record["conversations"][0] if record["conversations"] else None
    if isinstance(first, dict) and isinstance(first.get("value"), str):
        first["value"] += f" (variant {copy_index})"
    return record


def run_scale(scale: int, tokenizer) -> dict[str, Any]:
    cfg = Config()
    src = SourceConfig(preset="embedded:sharegpt")
    pipeline = DataPipeline(cfg, tokenizer=tokenizer)
    name = pipeline.source_name(src)
    files: list[FileRecords] = []
    with pipeline.timed("recover"):
        for c in range(scale):
            part = pipeline.read_source(src, name)
            for file in part:
                file.records = [readers.RawRecord(perturbed(r.value, c), f"{r.where}+{c}" if c else r.where) for r in file.records]
            files += part
    with pipeline.timed("normalise"):
        rows = pipeline.normalise(src, name, files)
    valid = len(rows)
    rows = pipeline.dedup_exact(rows)
    rows = pipeline.dedup_near(rows)
    unique = len(rows)
    train, val = pipeline.encode(rows)
    counts = pipeline.counts[name]
    return {
        "scale": scale,
        "records": counts.records_read,
        "valid": valid,
        "exact_duplicates": pipeline.duplicates["exact"].count,
        "near_duplicates": pipeline.duplicates["near"].count,
        "after_dedup": unique,
        "train": len(train),
        "val": len(val),
        "unparsed_bytes": counts.unparsed_bytes,
        "seconds": {phase: round(pipeline.timings.get(phase, 0.0), 2) for phase in PHASES},
        "total_s": round(sum(pipeline.timings.get(p, 0.0) for p in PHASES), 2),
        "cpu_seconds": {phase: round(pipeline.cpu_timings.get(phase, 0.0), 2) for phase in PHASES},
        "cpu_total_s": round(sum(pipeline.cpu_timings.get(p, 0.0) for p in PHASES), 2),
    }


def run_bench(scales: list[int]) -> dict[str, Any]:
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(ModelConfig())
    load_s = time.perf_counter() - start
    return {
        **run_header("tunelab bench data --scales " + ",".join(map(str, scales))),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "tokenizer_load_s": round(load_s, 2),
        "config": {"max_seq_len": Config().train.max_seq_len, "dedup": Config().data.dedup.model_dump()},
        "results": [run_scale(s, tokenizer) for s in scales],
    }


def print_bench(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    results = figures["results"]
    table = Table(title=f"tunelab bench data - {figures['machine']}")
    table.add_column("phase: wall s (CPU s)")
    for r in results:
        table.add_column(f"{r['scale']}x ({r['records']} records)", justify="right")
    for phase in PHASES:  # wall seconds (CPU seconds of this process)
        table.add_row(phase, *(f"{r['seconds'][phase]:.2f} ({r['cpu_seconds'][phase]:.2f})" for r in results))
    table.add_row("total (wall)", *(f"{r['total_s']:.2f}" for r in results))
    table.add_row("total (CPU s)", *(f"{r['cpu_total_s']:.2f}" for r in results))
    table.add_row("near-dedup CPU ms / 1k rows", *(f"{1e6 * r['cpu_seconds']['dedup_near'] / max(r['valid'] - r['exact_duplicates'], 1):.0f}" for r in results))
    table.add_row("rows after dedup", *(str(r["after_dedup"]) for r in results))
    table.add_row("train / val rows", *(f"{r['train']} / {r['val']}" for r in results))
    Console().print(table)
