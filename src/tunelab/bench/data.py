"""`tunelab bench data`: the data stage's speed and memory.

Two benchmarks:
- `--scales 1,2,4`: time each phase of preparing the embedded ShareGPT file, at 1x/2x/4x its size. Scale s reads
  and parses the file s times; copy c >= 1 of each record gets a small perturbation (a suffix on its first
  message) so exact dedup keeps it and near-dedup has real work. `--max-records N`: the file's first N records
  only (a quick run).
- `--rows 10000,100000`: FineTome-sized inputs. The embedded ShareGPT and chatterbot exchanges are resampled into
  N new conversations (1-3 exchanges each, seeded), written as a JSONL and a Parquet file under `--out`; then
  `tunelab data prepare` runs on each file in its own process, and its wall time, peak RSS (`wait4`'s ru_maxrss,
  that process's own: see `measured`) and rows/s are reported, plus the peak RSS of a process reading every
  prepared training row the way training does (memory-mapped). Bounded memory means peak RSS stays flat (within
  1.5x) from the smallest to the largest N. `--formats jsonl` (or `parquet`) measures one input format only.
  Beside each prepare, the plain Hugging Face floor on the same file, measured the same way in its own process:
  `datasets.load_dataset` + `.map` of the same tokenizer's chat template (tokenize=True, cut at max_seq_len tokens,
  batched, num_proc=2) + `.save_to_disk`, with a fresh datasets cache each time so nothing is reused. It does no
  normalisation, dedup, assistant-only masks, split or report; the ratio is prepare wall s / floor wall s. Its
  peak RSS is wait4's: the largest of the main process and its two map workers, not their sum.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.bench.machine import run_header
from tunelab.config import Config, SourceConfig
from tunelab.data import readers
from tunelab.data.formats import record_to_pairs
from tunelab.data.prepare import DataPipeline, SourceCounts
from tunelab.data.problems import ProblemLog, RecordProblem

PHASES = ("recover", "normalize", "dedup_exact", "dedup_near", "encode")
INPUT_FORMATS = ("jsonl", "parquet")
FLOOR_NUM_PROC = 2  # the plain Hugging Face floor's map workers (`.map(num_proc=2)`)
FLAT_RSS_RATIO = 1.5  # the bounded-memory rule: peak RSS at the largest N <= 1.5 x peak RSS at the smallest
MAX_MESSAGE_CHARS = 1_000  # resampled messages are cut here: files stay a few hundred MB at 100k rows


# ------------------------------------------------------------------------------------ --scales
def perturbed(record: Any, copy_index: int) -> Any:
    """A near-duplicate of a ShareGPT record: same text plus a short suffix on the first message."""
    if copy_index == 0 or not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return record
    record = copy.deepcopy(record)
    first = record["conversations"][0] if record["conversations"] else None
    if isinstance(first, dict) and isinstance(first.get("value"), str):
        first["value"] += f" (variant {copy_index})"
    return record


class PhaseTimer:
    """Wall seconds and this process's CPU seconds per phase (CPU seconds vary much less on a shared machine)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[phase] += time.perf_counter() - start
            self.cpu[phase] += time.process_time() - cpu_start


def with_dedup(cfg: Config, **dedup) -> Config:
    """`cfg` with some `data.dedup` settings changed (one dedup kind alone, to time it apart)."""
    data = cfg.data.model_copy(update={"dedup": cfg.data.dedup.model_copy(update=dedup)})
    return cfg.model_copy(update={"data": data})


def run_scale(scale: int, tokenizer, max_records: int | None = None) -> dict[str, Any]:
    """Each phase of preparing `scale` copies of the embedded ShareGPT file (its first `max_records` records when
    given), timed through the pipeline's public
    steps: reading, normalising, exact dedup alone, near dedup alone (each kind a pipeline of its own that has the
    other kind off), then the split and encoding."""
    cfg = Config()
    src = SourceConfig(preset="embedded:sharegpt")
    pipeline = DataPipeline(cfg, tokenizer=tokenizer)
    name = pipeline.source_name(src)
    counts = pipeline.counts.setdefault(name, SourceCounts(name, src.preset, src.weight))
    timed = PhaseTimer()
    records = []
    with timed("recover"):
        for c in range(scale):
            for path, label in readers.source_files(src).files:
                stats = readers.FileStats(label)
                ctx = readers.ReadContext(label, name, pipeline.log, cfg.data.max_record_chars, stats)
                with contextlib.closing(readers.iter_file(path, ctx)) as file_records:
                    records += [
                        readers.RawRecord(perturbed(r.value, c), f"{r.where}+{c}" if c else r.where)
                        for r in itertools.islice(file_records, max_records)
                    ]
                counts.records_read += stats.records
                counts.unparsed_bytes += stats.unparsed_bytes
    with timed("normalize"):
        rows = [
            row for r in records if (row := pipeline.normalize_record(r, src.format, None, name, Counter())) is not None
        ]
    del records
    valid = len(rows)
    exact_only, near_only = DataPipeline(with_dedup(cfg, near=False)), DataPipeline(with_dedup(cfg, exact=False))
    with timed("dedup_exact"):
        rows = list(exact_only.unique_rows(rows))
    with timed("dedup_near"):
        rows = list(near_only.unique_rows(rows))
    unique = len(rows)
    with timed("encode"):
        split = Counter("val" if is_val else "train" for _, is_val, _, _ in pipeline.encoded(rows))
    return {
        "scale": scale,
        "records": counts.records_read,
        "valid": valid,
        "exact_duplicates": exact_only.duplicates["exact"].count,
        "near_duplicates": near_only.duplicates["near"].count,
        "after_dedup": unique,
        "train": split["train"],
        "val": split["val"],
        "unparsed_bytes": counts.unparsed_bytes,
        "seconds": {phase: round(timed.wall[phase], 2) for phase in PHASES},
        "total_s": round(sum(timed.wall[p] for p in PHASES), 2),
        "cpu_seconds": {phase: round(timed.cpu[phase], 2) for phase in PHASES},
        "cpu_total_s": round(sum(timed.cpu[p] for p in PHASES), 2),
    }


def run_bench(scales: list[int], max_records: int | None = None) -> dict[str, Any]:
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(ModelConfig())
    load_s = time.perf_counter() - start
    return {
        **run_header(
            "tunelab bench data --scales "
            + ",".join(map(str, scales))
            + (f" --max-records {max_records}" if max_records else "")
        ),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "tokenizer_load_s": round(load_s, 2),
        "config": {"max_seq_len": Config().train.max_seq_len, "dedup": Config().data.dedup.model_dump()},
        "max_records": max_records,
        "results": [run_scale(s, tokenizer, max_records) for s in scales],
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
    table.add_row(
        "near-dedup CPU ms / 1k rows",
        *(f"{1e6 * r['cpu_seconds']['dedup_near'] / max(r['valid'] - r['exact_duplicates'], 1):.0f}" for r in results),
    )
    table.add_row("rows after dedup", *(str(r["after_dedup"]) for r in results))
    table.add_row("train / val rows", *(f"{r['train']} / {r['val']}" for r in results))
    Console().print(table)


# ------------------------------------------------------------------------------------ --rows
def exchange_pool() -> list[tuple[str, str]]:
    """Every (user, assistant) exchange of the embedded ShareGPT and chatterbot data, messages cut to
    MAX_MESSAGE_CHARS (the pool the FineTome-sized inputs are resampled from)."""
    pool: list[tuple[str, str]] = []
    for preset in ("embedded:sharegpt", "embedded:chatterbot"):
        for path, label in readers.source_files(SourceConfig(preset=preset)).files:
            ctx = readers.ReadContext(label, preset, ProblemLog(), 10**9, readers.FileStats(label))
            for record in readers.iter_file(path, ctx):
                try:
                    pairs = record_to_pairs(record.value)
                except RecordProblem:
                    continue
                pool += [
                    (q[:MAX_MESSAGE_CHARS], a[:MAX_MESSAGE_CHARS])
                    for (rq, q), (ra, a) in zip(pairs, pairs[1:])
                    if rq in ("human", "user") and ra in ("gpt", "assistant", "bot") and q.strip() and a.strip()
                ]
    return pool


def resampled_conversations(pool: list[tuple[str, str]], rows: int, seed: int = 0):
    """`rows` new conversations in OpenAI `messages` format, 1-3 exchanges drawn from the pool (a generator)."""
    rng = random.Random(seed)
    for _ in range(rows):
        messages = []
        for question, answer in rng.sample(pool, rng.choice((1, 1, 2, 3))):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield {"messages": messages}


def write_inputs(folder: Path, pool: list[tuple[str, str]], rows: int) -> dict[str, Path]:
    """The same `rows` conversations as `conversations-N.jsonl` and `conversations-N.parquet` (written in batches);
    keyed by INPUT_FORMATS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    jsonl, parquet = folder / f"conversations-{rows}.jsonl", folder / f"conversations-{rows}.parquet"
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    batch: list[dict] = []
    with open(jsonl, "w", encoding="utf-8") as f, pq.ParquetWriter(parquet, schema) as writer:
        for record in resampled_conversations(pool, rows):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            batch.append(record)
            if len(batch) == 1000:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch.clear()
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return {"jsonl": jsonl, "parquet": parquet}


_READ_ALL_ROWS = """
import sys
from tunelab.data.prepare import TokenRows, load_prepared
train, _ = load_prepared(sys.argv[1])
rows = TokenRows(train)
print(sum(len(rows[i][0]) for i in range(len(rows))))
"""


# What a plain Hugging Face user runs to tokenize a chat file (no tunelab import): argv is the input file, the
# tokenizer folder, max_seq_len, the output folder and a datasets cache folder of its own.
_HF_FLOOR = f"""
import sys
import datasets
from transformers import AutoTokenizer
data_file, tokenizer_dir, max_seq_len, out_dir, cache_dir = sys.argv[1:6]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
builder = "parquet" if data_file.endswith(".parquet") else "json"
dataset = datasets.load_dataset(builder, data_files=data_file, split="train", cache_dir=cache_dir)
def template(batch):
    ids = tokenizer.apply_chat_template(
        batch["messages"], tokenize=True, truncation=True, max_length=int(max_seq_len), return_dict=False
    )
    return {{"input_ids": ids}}
dataset.map(template, batched=True, num_proc={FLOOR_NUM_PROC}).save_to_disk(out_dir)
"""


# Saves the tokenizer prepare uses (ModelConfig's defaults, tunelab's chat template) as a plain HF folder (argv[1]).
_SAVE_TOKENIZER = """
import sys
from tunelab.config import ModelConfig
from tunelab.models import load_tokenizer
load_tokenizer(ModelConfig()).save_pretrained(sys.argv[1])
"""


# The measuring process: runs argv[2:] with its output in the log file argv[1], waits for it and prints its wall
# seconds, wait4's ru_maxrss (KiB) and exit code as JSON. The kernel starts a child's ru_maxrss at its parent's peak
# RSS (recorded when the child execs), and the bench process has hundreds of MiB of libraries imported: started from
# this small process instead, the figure is the measured command's own.
_MEASURE = """
import json, os, subprocess, sys, time
with open(sys.argv[1], "w", encoding="utf-8") as log:
    start = time.perf_counter()
    child = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "maxrss_kib": usage.ru_maxrss, "exit": os.waitstatus_to_exitcode(status)}))
"""


def measured(command: list[str], log_path: Path, rows: int | None = None) -> dict[str, Any]:
    """Run `command` in its own process: wall seconds and its own peak RSS (wait4's ru_maxrss: the largest of the
    process and the children it waited for, from a small measuring process), plus rows/s when it handled `rows`."""
    measure = [sys.executable, "-I", "-S", "-c", _MEASURE, str(log_path), *map(str, command)]
    result = json.loads(subprocess.run(measure, capture_output=True, text=True, check=True).stdout)
    if result["exit"] != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed; see {log_path}")
    figures = {"wall_s": round(result["wall_s"], 2), "peak_rss_mib": round(result["maxrss_kib"] / 1024, 1)}
    if rows is not None:
        figures["rows_per_s"] = round(rows / max(result["wall_s"], 1e-9), 1)
    return figures


def hf_floor(path: Path, tokenizer_dir: Path, out: Path, label: str, rows: int) -> dict[str, Any]:
    """The plain Hugging Face load + chat-template map + save of `path`, measured like prepare; its saved dataset is
    `out/floor-LABEL`. The datasets cache starts empty (a cached load or map would skip the work) and is removed."""
    cache = out / f"floor-{label}-cache"
    saved = out / f"floor-{label}"
    for folder in (cache, saved):
        shutil.rmtree(folder, ignore_errors=True)
    max_seq_len = str(Config().train.max_seq_len)
    command = [sys.executable, "-c", _HF_FLOOR, str(path), str(tokenizer_dir), max_seq_len, str(saved), str(cache)]
    try:
        return {**measured(command, out / f"floor-{label}.log", rows), "saved_to": str(saved)}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run_rows_bench(sizes: list[int], out: Path, formats: tuple[str, ...] = INPUT_FORMATS) -> dict[str, Any]:
    """Write N-row JSONL and Parquet inputs for each N in `sizes`; for each of `formats`, measure prepare, the
    training read and the plain Hugging Face floor."""
    import yaml

    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "tunelab bench data --rows " + ",".join(map(str, sizes))
    started = {  # command, machine, date and load when the run starts
        **run_header(command + ("" if formats == INPUT_FORMATS else " --formats " + ",".join(formats))),
        "load_average_at_start": os.getloadavg()[0],
    }
    tokenizer_dir = out / "floor-tokenizer"  # prepare's tokenizer and chat template, as a plain HF folder
    measured([sys.executable, "-c", _SAVE_TOKENIZER, str(tokenizer_dir)], out / "floor-tokenizer.log")
    pool = exchange_pool()
    results = []
    for rows in sizes:
        inputs = write_inputs(out / "inputs", pool, rows)
        for fmt in formats:
            path = inputs[fmt]
            prepared = out / f"prepared-{fmt}-{rows}"
            config = out / f"config-{fmt}-{rows}.yaml"
            config.write_text(yaml.safe_dump({"data": {"sources": [{"path": str(path)}], "output_dir": str(prepared)}}))
            prepare = measured(
                [sys.executable, "-m", "tunelab.cli", "data", "prepare", str(config), "--force"],
                out / f"prepare-{fmt}-{rows}.log",
                rows,
            )
            read = measured([sys.executable, "-c", _READ_ALL_ROWS, str(prepared)], out / f"read-{fmt}-{rows}.log")
            floor = hf_floor(path, tokenizer_dir, out, f"{fmt}-{rows}", rows)
            report = json.loads((prepared / "report.json").read_text(encoding="utf-8"))
            results.append(
                {
                    "rows": rows,
                    "format": fmt,
                    "input_mib": round(path.stat().st_size / 2**20, 1),
                    "prepare": prepare,
                    "train_read": read,
                    "hf_floor": floor,
                    "prepare_over_floor": round(prepare["wall_s"] / max(floor["wall_s"], 1e-9), 2),
                    "train_rows": report["splits"]["train"],
                    "val_rows": report["splits"]["val"],
                    "near_duplicates": report["duplicates"]["near"]["count"],
                }
            )
    return {
        **started,
        "config": {"max_seq_len": Config().train.max_seq_len, "dedup": Config().data.dedup.model_dump()},
        "hf_floor": {
            "does": "datasets.load_dataset + .map(apply_chat_template, tokenize=True, truncation to max_seq_len, "
            f"batched, num_proc={FLOOR_NUM_PROC}) + .save_to_disk",
            "does_not": "normalise, dedup, mask labels to assistant tokens, split train/val, write a report",
            "datasets": importlib.metadata.version("datasets"),
        },
        "out": str(out),
        "results": results,
        "flat_rss": flat_rss(results),
    }


def flat_rss(results: list[dict]) -> dict[str, Any]:
    """Peak RSS at the largest N over the smallest N, per format and measured process; `ok` when all <= 1.5."""
    ratios = {}
    for fmt in sorted({r["format"] for r in results}):
        runs = sorted((r for r in results if r["format"] == fmt), key=lambda r: r["rows"])
        for what in ("prepare", "train_read"):
            ratios[f"{fmt} {what}"] = round(runs[-1][what]["peak_rss_mib"] / runs[0][what]["peak_rss_mib"], 2)
    return {"ratios": ratios, "limit": FLAT_RSS_RATIO, "ok": all(v <= FLAT_RSS_RATIO for v in ratios.values())}


def print_rows_bench(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tunelab bench data --rows - {figures['machine']}")
    for column in (
        "input",
        "rows",
        "MiB",
        "prepare wall s",
        "rows/s",
        "prepare peak RSS MiB",
        "train read peak RSS MiB",
        "train / val rows",
    ):
        table.add_column(column, justify="right")
    for r in figures["results"]:
        table.add_row(
            r["format"],
            f"{r['rows']:,}",
            f"{r['input_mib']}",
            f"{r['prepare']['wall_s']:.1f}",
            f"{r['prepare']['rows_per_s']:.0f}",
            f"{r['prepare']['peak_rss_mib']:.0f}",
            f"{r['train_read']['peak_rss_mib']:.0f}",
            f"{r['train_rows']:,} / {r['val_rows']:,}",
        )
    Console().print(table)
    floor = Table(
        title=f"beside it: plain Hugging Face datasets load + chat-template map (num_proc {FLOOR_NUM_PROC}) + save"
    )
    for column in ("input", "rows", "prepare wall s", "floor wall s", "floor rows/s", "floor peak RSS MiB",
                   "prepare / floor wall"):  # fmt: skip
        floor.add_column(column, justify="right")
    for r in figures["results"]:
        floor.add_row(
            r["format"],
            f"{r['rows']:,}",
            f"{r['prepare']['wall_s']:.1f}",
            f"{r['hf_floor']['wall_s']:.1f}",
            f"{r['hf_floor']['rows_per_s']:.0f}",
            f"{r['hf_floor']['peak_rss_mib']:.0f}",
            f"{r['prepare_over_floor']:.2f}x",
        )
    Console().print(floor)
    flat = figures["flat_rss"]
    verdict = "met" if flat["ok"] else "NOT met"
    Console().print(f"peak RSS, largest / smallest N: {flat['ratios']} (limit {flat['limit']}x: {verdict})")
