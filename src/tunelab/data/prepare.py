"""`tunelab data prepare`: sources -> canonical conversations -> dedup -> mix/split -> tokenised dataset folder.

    read       every source, record by record (readers.py); file-level problems raise DataError
    normalise  record -> canonical conversation + filters (formats.py, normalize.py); per-record problems counted
    dedup      exact (content id) then near (MinHash LSH), first occurrence wins (dedup.py)
    mix/split  copies per row from the source weight; val iff hash(id) < val_fraction (split.py)
    encode     chat template, labels on assistant tokens, truncation policy (masking.py)
    write      train/ val/ (datasets.save_to_disk) + report.json, summary.md, token_lengths.png,
               into a temp folder renamed into place: a half-written dataset never exists.

Rows: `id` is the content hash of the whole normalised conversation (split and dedup key); `messages` is the
conversation as kept (whole exchanges, shorter when truncated), matching `input_ids`; a train row repeated by a
source weight > 1 appears several times with the same id. `data.num_proc` is not used: every phase is either
C-level or vectorised, and the 2-core target gains nothing from worker processes.

Output folder: `data.output_dir`, else `<tunelab cache>/data/<hash of data + model config, train.max_seq_len>`.
An existing folder is reused when its config hash and its input files (size, mtime) match, unless `force`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import Config, DataConfig, SourceConfig
from tunelab.data import dedup, readers
from tunelab.data.formats import record_to_pairs
from tunelab.data.masking import IGNORE_INDEX, VERIFY_ROWS, Encoded, encode_conversations
from tunelab.data.normalize import Message, canonical_conversation, keyword_pattern
from tunelab.data.problems import FILTER_REASONS, DataError, ProblemLog, RecordProblem
from tunelab.data.report import length_stats, print_summary, write_report
from tunelab.data.split import copies_for_weight, is_validation
from tunelab.io import atomic_folder

FORMAT_VERSION = 1  # bump when the prepared output changes for the same config
TRUNCATION_POLICIES = {
    "truncate": "keep the longest run of whole user/assistant exchanges that fits; drop rows whose first exchange does not fit",
    "drop": "drop rows that do not fit whole",
}


@dataclass
class Row:
    id: str
    source: str
    where: str
    messages: list[Message]


@dataclass
class SourceCounts:
    name: str
    origin: str
    weight: float
    files: int = 0
    records_read: int = 0
    valid: int = 0
    unique: int = 0
    train_rows: int = 0
    val_rows: int = 0
    unparsed_bytes: int = 0
    unparsed: list[dict] = field(default_factory=list)


@dataclass
class FileRecords:
    """Raw records of one file (or hub dataset) and what reading it found."""

    stats: readers.FileStats
    records: list[readers.RawRecord]


class DataPipeline:
    """The phases of prepare_dataset as separate methods, so `tunelab bench data` can time each one."""

    def __init__(self, cfg: Config, tokenizer=None) -> None:
        self.cfg = cfg
        self.data: DataConfig = cfg.data
        self.log = ProblemLog(self.data.on_error)
        self.counts: dict[str, SourceCounts] = {}
        self.timings: dict[str, float] = defaultdict(float)
        self.cpu_timings: dict[str, float] = defaultdict(float)
        self.duplicates = {"exact": _LocatedCount(), "near": _LocatedCount()}
        self._tokenizer = tokenizer
        self.encode_stats = None

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.timings[phase] += time.perf_counter() - start
            # CPU seconds of this process: on a shared machine they vary much less than wall time
            self.cpu_timings[phase] += time.process_time() - cpu_start

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tunelab.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    # ------------------------------------------------------------------ read + normalise
    def source_name(self, src: SourceConfig) -> str:
        name, n = src.label, 2
        while name in self.counts:  # two sources with the same label stay apart in the report
            name, n = f"{src.label}-{n}", n + 1
        return name

    def read_source(self, src: SourceConfig, name: str) -> list[FileRecords]:
        counts = self.counts.setdefault(name, SourceCounts(name, src.path or src.preset, src.weight))
        located = readers.source_files(src)
        budget = src.max_records
        out = []
        for path, label in located.files or [(None, located.hub_id)]:
            stats = readers.FileStats(label)
            ctx = readers.ReadContext(label, name, self.log, self.data.max_record_chars, stats)
            records = readers.iter_hub(located.hub_id, src.split, stats) if path is None else readers.iter_file(path, ctx)
            kept = []
            with contextlib.closing(records):  # closes the file even when max_records stops early
                for record in records:
                    kept.append(record)
                    if budget is not None and len(kept) >= budget:
                        break
            counts.files += 1
            counts.records_read += stats.records
            counts.unparsed_bytes += stats.unparsed_bytes
            if stats.unparsed_bytes:
                counts.unparsed.append({"at": stats.unparsed_at, "bytes": stats.unparsed_bytes, "error": stats.unparsed_error})
            out.append(FileRecords(stats, kept))
            if budget is not None:
                budget -= len(kept)
                if budget <= 0:
                    break
        return out

    def normalise(self, src: SourceConfig, name: str, files: list[FileRecords]) -> list[Row]:
        keywords = keyword_pattern(src.keywords)
        fmt = src.format
        rows: list[Row] = []
        for file in files:
            reasons: Counter[str] = Counter()
            before = len(rows)
            for record in file.records:
                try:
                    pairs = record_to_pairs(record.value, fmt)
                    if sum(len(text) for _, text in pairs) > self.data.max_record_chars:
                        raise RecordProblem("too_long", f"more than data.max_record_chars={self.data.max_record_chars} characters")
                    messages = canonical_conversation(pairs, self.data, keywords, lambda r, w=record.where: self.log.repair(r, w))
                except RecordProblem as problem:
                    reasons[problem.reason] += 1
                    self.log.drop(problem.reason, record.where, name, problem.detail)
                    continue
                rows.append(Row(dedup.content_id(messages), name, record.where, messages))
            check_file_usable(file, len(rows) - before, reasons, first_record=file.records[0].value if file.records else None)
        self.counts[name].valid += len(rows)
        if not rows:
            total = self.counts[name].records_read
            raise DataError(f"{src.path or src.preset}: all {total} rows were filtered out ({self.log.top_reasons(name)})")
        return rows

    def read_all(self) -> list[Row]:
        rows: list[Row] = []
        for src in self.data.sources:
            name = self.source_name(src)
            with self.timed("read"):
                files = self.read_source(src, name)
            with self.timed("normalise"):
                rows += self.normalise(src, name, files)
        return rows

    # ------------------------------------------------------------------ dedup
    def dedup_exact(self, rows: list[Row]) -> list[Row]:
        if not self.data.dedup.exact:
            return rows
        with self.timed("dedup_exact"):
            dups = set(dedup.exact_duplicates([r.id for r in rows]))
            for i in sorted(dups):
                self.duplicates["exact"].add(rows[i].where)
            return [r for i, r in enumerate(rows) if i not in dups]

    def dedup_near(self, rows: list[Row]) -> list[Row]:
        cfg = self.data.dedup
        if not cfg.near:
            return rows
        with self.timed("dedup_near"):
            texts = [dedup.dedup_text(r.messages) for r in rows]
            dups = dedup.near_duplicates(texts, cfg.threshold, cfg.num_perm, cfg.shingle_words)
            for i, original in sorted(dups.items()):
                self.duplicates["near"].add(f"{rows[i].where} ~ {rows[original].where}")
            return [r for i, r in enumerate(rows) if i not in dups]

    # ------------------------------------------------------------------ mix, split, encode
    def encode(self, rows: list[Row]) -> tuple[list[dict], list[dict]]:
        """Tokenise the rows that the mix keeps; returns (train, val) lists of output rows."""
        weights = {name: c.weight for name, c in self.counts.items()}
        for r in rows:
            self.counts[r.source].unique += 1
        plan = []  # (row, is_val, copies)
        for r in rows:
            val = is_validation(r.id, self.data.val_fraction)
            copies = copies_for_weight(r.id, weights[r.source])
            if copies:
                plan.append((r, val, 1 if val else copies))  # val holds each row once: repeats would not help eval
        with self.timed("encode"):
            results, self.encode_stats = encode_conversations(
                self.tokenizer,
                [r.messages for r, _, _ in plan],
                [r.where for r, _, _ in plan],
                self.cfg.train.max_seq_len,
                self.data.truncation,
            )
        train, val = [], []
        for (r, is_val, copies), result in zip(plan, results):
            if isinstance(result, RecordProblem):
                self.log.drop(result.reason, r.where, r.source, result.detail)
                continue
            out = output_row(r, result)
            (val if is_val else train).extend([out] * copies)
            counts = self.counts[r.source]
            if is_val:
                counts.val_rows += 1
            else:
                counts.train_rows += copies
        if not train:
            raise DataError(
                f"data.sources: no training rows left after filtering, dedup and tokenising "
                f"(dropped: {', '.join(f'{k} {v}' for k, v in self.log.dropped.counts.most_common(4))})"
            )
        return train, val

    def run(self) -> tuple[list[dict], list[dict]]:
        rows = self.read_all()
        rows = self.dedup_exact(rows)
        rows = self.dedup_near(rows)
        return self.encode(rows)

    # ------------------------------------------------------------------ report
    def report(self, train: list[dict], val: list[dict], key: str, inputs: list) -> dict[str, Any]:
        stats = self.encode_stats
        return {
            "format_version": FORMAT_VERSION,
            "config_key": key,
            "inputs": inputs,
            "sources": [vars(c) for c in self.counts.values()],
            "records_read": sum(c.records_read for c in self.counts.values()),
            "dropped": self.log.dropped.to_json(),
            "repaired": self.log.repaired.to_json(),
            "duplicates": {k: v.to_json() for k, v in self.duplicates.items()},
            "unparsed_bytes": sum(c.unparsed_bytes for c in self.counts.values()),
            "splits": {"train": len(train), "val": len(val), "val_fraction": self.data.val_fraction},
            "tokens": {
                "train": length_stats([r["num_tokens"] for r in train], [r["num_label_tokens"] for r in train]),
                "val": length_stats([r["num_tokens"] for r in val], [r["num_label_tokens"] for r in val]),
            },
            "truncation": {
                "policy": self.data.truncation,
                "max_seq_len": self.cfg.train.max_seq_len,
                "description": TRUNCATION_POLICIES[self.data.truncation],
                "truncated_rows": stats.truncated if stats else 0,
            },
            "tokenization": {
                "template_checked_rows": stats.verified if stats else 0,
                "segment_boundary_mismatches": stats.boundary_mismatch if stats else 0,
                "note": f"segments are tokenised separately; the first {VERIFY_ROWS} rows are compared with whole-text tokenisation",
            },
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


class _LocatedCount:
    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(where)

    def to_json(self) -> dict:
        return {"count": self.count, "first": self.first}


def check_file_usable(file: FileRecords, usable: int, reasons: Counter, first_record: Any) -> None:
    """File-level problems: no record at all, an unknown format, not UTF-8, or nothing but broken records."""
    stats = file.stats
    if usable:
        return
    label = stats.label
    if stats.records == 0:
        if stats.unparsed_bytes:
            raise DataError(f"{label}: nothing usable: no complete record ({stats.unparsed_error} at {stats.unparsed_at})")
        raise DataError(f"{label}: empty file (no records)")
    if stats.first_error and stats.problems >= stats.records:
        raise DataError(f"{label}: nothing usable: no line is valid JSON (first error: {stats.first_error})")
    if reasons and set(reasons) <= {"unknown_format", "not_a_record"} and reasons["unknown_format"]:
        keys = ", ".join(sorted(map(str, first_record))[:8]) if isinstance(first_record, dict) else type(first_record).__name__
        raise DataError(
            f"{label}: unknown format (expected ShareGPT `conversations`, OpenAI `messages`, Alpaca "
            f"`instruction`/`output` or `prompt`/`response` fields; first record has: {keys})"
        )
    if reasons and set(reasons) == {"invalid_utf8"}:
        raise DataError(f"{label}: not UTF-8 text (no record decodes)")
    if reasons and not set(reasons) <= set(FILTER_REASONS):
        top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
        raise DataError(f"{label}: nothing usable: every record has a problem ({top})")
    # Only filters (keywords, turn counts) emptied this file: fine unless the whole source ends up empty.


def output_row(row: Row, encoded: Encoded) -> dict[str, Any]:
    return {
        "id": row.id,
        "source": row.source,
        "messages": json.dumps(encoded.messages, ensure_ascii=False),
        "input_ids": encoded.input_ids,
        "labels": encoded.labels,
        "num_tokens": len(encoded.input_ids),
        "num_label_tokens": sum(label != IGNORE_INDEX for label in encoded.labels),
    }


# ---------------------------------------------------------------------------------- folders
def config_key(cfg: Config) -> str:
    payload = {
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "max_seq_len": cfg.train.max_seq_len,
        "format_version": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def output_folder(cfg: Config) -> Path:
    if cfg.data.output_dir:
        return Path(cfg.data.output_dir).expanduser()
    from tunelab.models.loading import cache_dir

    return cache_dir() / "data" / config_key(cfg)


def input_fingerprints(data: DataConfig) -> list:
    """Size and mtime of every input file: a cached folder is stale when its data files changed."""
    prints = []
    for src in data.sources:
        located = readers.source_files(src)
        if located.hub_id:
            prints.append([located.hub_id, src.split])
        for path, label in located.files:
            st = path.stat()
            prints.append([label, st.st_size, st.st_mtime_ns])
    return prints


def is_prepared(folder: Path) -> bool:
    return (folder / "report.json").is_file() and (folder / "train").is_dir() and (folder / "val").is_dir()


def _up_to_date(folder: Path, key: str, inputs: list) -> bool:
    if not is_prepared(folder):
        return False
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return report.get("config_key") == key and report.get("inputs") == inputs


def _check_output_folder(folder: Path) -> None:
    if folder.exists() and not is_prepared(folder) and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"data.output_dir: {folder} exists and is not a prepared dataset folder (choose another or remove it)")


def save_splits(folder: Path, train: list[dict], val: list[dict]) -> None:
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "messages": datasets.Value("string"),
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "num_tokens": datasets.Value("int32"),
            "num_label_tokens": datasets.Value("int32"),
        }
    )
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # two tiny writes: a progress bar would be noise in the CLI output
    try:
        for name, rows in (("train", train), ("val", val)):
            columns = {key: [r[key] for r in rows] for key in features}
            datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(folder / name))
    finally:
        if bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------- public
def prepare_dataset(cfg: Config, force: bool = False, verbose: bool = False) -> Path:
    """Prepare (or reuse) the tokenised train/val dataset for `cfg`; returns the folder (layout: docs/design.md)."""
    folder = output_folder(cfg)
    key = config_key(cfg)
    inputs = input_fingerprints(cfg.data)
    if not force and _up_to_date(folder, key, inputs):
        if verbose:
            print(f"using prepared data (config and inputs unchanged): {folder}")
        return folder
    _check_output_folder(folder)
    pipeline = DataPipeline(cfg)
    train, val = pipeline.run()

    with atomic_folder(folder) as tmp:  # readers see the old or the new folder, never half
        with pipeline.timed("write"):
            save_splits(tmp, train, val)
        report = pipeline.report(train, val, key, inputs)
        lengths = {"train": [r["num_tokens"] for r in train], "val": [r["num_tokens"] for r in val]}
        write_report(tmp, report, lengths)
    if verbose:
        print_summary(json.loads((folder / "report.json").read_text(encoding="utf-8")), folder)
    return folder


def load_prepared(path: str | Path):
    """(train, val) `datasets.Dataset`s of a folder written by prepare_dataset."""
    import datasets

    folder = Path(path)
    if not is_prepared(folder):
        raise DataError(f"{folder}: not a prepared dataset folder (run `tunelab data prepare CONFIG`)")
    return datasets.load_from_disk(str(folder / "train")), datasets.load_from_disk(str(folder / "val"))
