"""`tunelab data prepare`: sources -> canonical conversations -> dedup -> mix/split -> tokenised dataset folder.

One streamed pass, in bounded memory (records are never collected into lists):
    read       every source, record by record (readers.py); file-level problems raise DataError
    normalize  record -> canonical conversation + filters (formats.py, normalize.py); per-record problems counted
    dedup      exact (set of content ids) then near (streaming MinHash LSH index), first occurrence wins (dedup.py)
    mix/split  copies per row from the source weight; val iff hash(id) < val_fraction (split.py)
    encode     chat template, labels on assistant tokens, truncation policy (masking.py), ENCODE_CHUNK rows at a time
    write      train/ val/ (Arrow, datasets.save_to_disk layout) + report.json, summary.md, token_lengths.png,
               into a temp folder renamed into place: a half-written dataset never exists.
What grows with the input is a few numbers per row: content ids, MinHash signatures, token lengths for the report.
Training reads the written Arrow files memory-mapped (TokenRows), never as Python lists.

Rows: `id` is the content hash of the whole normalised conversation (split and dedup key); `messages` is the
conversation as kept (whole exchanges, shorter when truncated), matching `input_ids`; a train row repeated by a
source weight > 1 appears several times with the same id. There are no worker processes: every phase is either
C-level or vectorised, and the 2-core target gains nothing from them.

Output folder: `data.output_dir`, else `<tunelab cache>/data/<hash of data + model config, train.max_seq_len>`.
An existing folder is reused when its config hash and its input files (size, mtime) match, unless `force`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import Config, DataConfig, SourceConfig
from tunelab.data import dedup, readers
from tunelab.data.formats import record_to_pairs
from tunelab.data.masking import IGNORE_INDEX, VERIFY_ROWS, Encoded, EncodeStats, encode_conversations
from tunelab.data.normalize import Message, canonical_conversation, keyword_pattern
from tunelab.data.problems import FILTER_REASONS, FIRST_LOCATIONS, DataError, ProblemLog, RecordProblem
from tunelab.data.report import length_stats, print_summary, write_report
from tunelab.data.split import copies_for_weight, is_validation
from tunelab.io import atomic_folder

FORMAT_VERSION = 1  # bump when the prepared output changes for the same config
ENCODE_CHUNK = 1024  # rows tokenised (and held) at a time: the tokenizer's batch, and the memory bound
TRUNCATION_POLICIES = {
    "truncate": (
        "keep the longest run of whole user/assistant exchanges that fits; drop rows whose first exchange does not fit"
    ),
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


class DataPipeline:
    """The phases of prepare_dataset, streamed: records flow from the file through normalisation, dedup, the
    split and tokenisation to the Arrow writers in chunks of ENCODE_CHUNK rows. What stays in memory grows only
    by a few numbers per row (content ids for exact dedup, MinHash signatures for near dedup, token lengths for
    the report), never by the rows themselves."""

    def __init__(self, cfg: Config, tokenizer=None) -> None:
        self.cfg = cfg
        self.data: DataConfig = cfg.data
        self.log = ProblemLog(self.data.on_error)
        self.counts: dict[str, SourceCounts] = {}
        self.timings: dict[str, float] = defaultdict(float)  # wall seconds per phase, for report.json
        self.duplicates = {"exact": _LocatedCount(), "near": _LocatedCount()}
        self._tokenizer = tokenizer
        self.encode_stats = EncodeStats()
        self.lengths: dict[str, array] = {"train": array("i"), "val": array("i")}
        self.label_lengths: dict[str, array] = {"train": array("i"), "val": array("i")}

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] += time.perf_counter() - start

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

    def source_rows(self, src: SourceConfig, name: str | None = None) -> Iterator[Row]:
        """Normalised rows of one source, record by record; file-level checks run as each file ends."""
        name = name or self.source_name(src)
        counts = self.counts.setdefault(name, SourceCounts(name, src.path or src.preset, src.weight))
        located = readers.source_files(src)
        budget = src.max_records
        keywords = keyword_pattern(src.keywords)
        for path, label in located.files or [(None, located.hub_id)]:
            stats = readers.FileStats(label)
            ctx = readers.ReadContext(label, name, self.log, self.data.max_record_chars, stats)
            records = readers.iter_hub(located.hub_id, src, ctx) if path is None else readers.iter_file(path, ctx)
            reasons: Counter[str] = Counter()
            taken, usable, first_record = 0, 0, None
            with contextlib.closing(records):  # closes the file even when max_records stops early
                for record in records:
                    taken += 1
                    first_record = record.value if taken == 1 else first_record
                    row = self.normalize_record(record, src.format, keywords, name, reasons)
                    if row is not None:
                        usable += 1
                        counts.valid += 1
                        yield row
                    if budget is not None and taken >= budget:
                        break
            counts.files += 1
            counts.records_read += stats.records
            counts.unparsed_bytes += stats.unparsed_bytes
            if stats.unparsed_bytes:
                counts.unparsed.append(
                    {"at": stats.unparsed_at, "bytes": stats.unparsed_bytes, "error": stats.unparsed_error}
                )
            check_file_usable(stats, usable, reasons, first_record)
            if budget is not None:
                budget -= taken
                if budget <= 0:
                    break
        if not counts.valid:
            raise DataError(
                f"{src.path or src.preset}: all {counts.records_read} rows were filtered out "
                f"({self.log.top_reasons(name)})"
            )

    def normalize_record(
        self, record: readers.RawRecord, fmt: str, keywords, name: str, reasons: Counter
    ) -> Row | None:
        try:
            pairs = record_to_pairs(record.value, fmt)
            if sum(len(text) for _, text in pairs) > self.data.max_record_chars:
                raise RecordProblem(
                    "too_long", f"more than data.max_record_chars={self.data.max_record_chars} characters"
                )
            messages = canonical_conversation(
                pairs, self.data, keywords, lambda r, w=record.where: self.log.repair(r, w)
            )
        except RecordProblem as problem:
            reasons[problem.reason] += 1
            self.log.drop(problem.reason, record.where, name, problem.detail)
            return None
        return Row(dedup.content_id(messages), name, record.where, messages)

    def iter_rows(self) -> Iterator[Row]:
        for src in self.data.sources:
            yield from self.source_rows(src, self.source_name(src))

    def read_all(self) -> list[Row]:
        """Every normalised row in a list: for small inputs and tests (prepare itself streams)."""
        return list(self.iter_rows())

    # ------------------------------------------------------------------ dedup
    def unique_rows(self, rows: Iterable[Row]) -> Iterator[Row]:
        """Rows without exact and near duplicates, first occurrence wins; the rows stream through."""
        cfg = self.data.dedup
        seen: set[str] = set()
        near = dedup.NearDuplicateIndex(cfg.threshold, cfg.num_perm, cfg.shingle_words) if cfg.near else None
        kept_where: list[str] = []  # location of each row the near index holds (for the report)
        for row in rows:
            if cfg.exact:
                if row.id in seen:
                    self.duplicates["exact"].add(row.where)
                    continue
                seen.add(row.id)
            if near is not None:
                original = near.add(dedup.dedup_text(row.messages))
                if original is not None:
                    self.duplicates["near"].add(f"{row.where} ~ {kept_where[original]}")
                    continue
                # the report names the first few duplicates' originals; once those are found, no location is kept
                kept_where.append(row.where if self.duplicates["near"].count < FIRST_LOCATIONS else "")
            yield row

    # ------------------------------------------------------------------ mix, split, encode, write
    def planned(self, rows: Iterable[Row]) -> Iterator[tuple[Row, bool, int]]:
        """(row, is_val, copies) for every row the mix keeps: val iff hash(id) < val_fraction,
        copies from the weight."""
        weights = {name: c.weight for name, c in self.counts.items()}
        for r in rows:
            self.counts[r.source].unique += 1
            weight = weights.get(r.source) or self.counts[r.source].weight
            val = is_validation(r.id, self.data.val_fraction)
            copies = copies_for_weight(r.id, weight)
            if copies:
                yield r, val, 1 if val else copies  # val holds each row once: repeats would not help eval

    def encoded(self, rows: Iterable[Row]) -> Iterator[tuple[Row, bool, int, Encoded]]:
        """Tokenise the planned rows chunk by chunk (the tokenizer works on batches); problems are counted."""
        plan = self.planned(rows)
        while chunk := list(itertools.islice(plan, ENCODE_CHUNK)):
            verify = max(VERIFY_ROWS - self.encode_stats.verified, 0)
            with self.timed("encode"):
                results, stats = encode_conversations(
                    self.tokenizer,
                    [r.messages for r, _, _ in chunk],
                    [r.where for r, _, _ in chunk],
                    self.cfg.train.max_seq_len,
                    self.data.truncation,
                    verify_rows=verify,
                )
            for key, value in vars(stats).items():
                setattr(self.encode_stats, key, getattr(self.encode_stats, key) + value)
            for (r, is_val, copies), result in zip(chunk, results):
                if isinstance(result, RecordProblem):
                    self.log.drop(result.reason, r.where, r.source, result.detail)
                    continue
                yield r, is_val, copies, result

    def write_splits(self, folder: Path, rows: Iterable[Row]) -> None:
        """Encode `rows` and write folder/train and folder/val (datasets.save_to_disk layout) in bounded memory."""
        with SplitWriter(folder) as writer:
            for r, is_val, copies, result in self.encoded(rows):
                split = "val" if is_val else "train"
                out = output_row(r, result)
                for _ in range(copies):
                    writer.add(split, out)
                    self.lengths[split].append(out["num_tokens"])
                    self.label_lengths[split].append(out["num_label_tokens"])
                counts = self.counts[r.source]
                if is_val:
                    counts.val_rows += 1
                else:
                    counts.train_rows += copies
            if not self.lengths["train"]:
                raise DataError(
                    f"data.sources: no training rows left after filtering, dedup and tokenising "
                    f"(dropped: {', '.join(f'{k} {v}' for k, v in self.log.dropped.counts.most_common(4))})"
                )

    def run(self, folder: Path) -> None:
        """Every phase, streamed: sources -> unique rows -> split/mix -> encode -> folder/train, folder/val."""
        with self.timed("total"):
            self.write_splits(folder, self.unique_rows(self.iter_rows()))

    # ------------------------------------------------------------------ report
    def report(self, key: str, inputs: list) -> dict[str, Any]:
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
            "splits": {
                "train": len(self.lengths["train"]),
                "val": len(self.lengths["val"]),
                "val_fraction": self.data.val_fraction,
            },
            "tokens": {
                split: length_stats(self.lengths[split], self.label_lengths[split]) for split in ("train", "val")
            },
            "truncation": {
                "policy": self.data.truncation,
                "max_seq_len": self.cfg.train.max_seq_len,
                "description": TRUNCATION_POLICIES[self.data.truncation],
                "truncated_rows": stats.truncated,
            },
            "tokenization": {
                "template_checked_rows": stats.verified,
                "segment_boundary_mismatches": stats.boundary_mismatch,
                "note": (
                    f"segments are tokenised separately; the first {VERIFY_ROWS} rows are compared "
                    "with whole-text tokenisation"
                ),
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


def check_file_usable(stats: readers.FileStats, usable: int, reasons: Counter, first_record: Any) -> None:
    """File-level problems: no record at all, an unknown format, not UTF-8, or nothing but broken records."""
    if usable:
        return
    label = stats.label
    if stats.records == 0:
        if stats.first_error:  # a stream that failed before its first record
            raise DataError(f"{label}: nothing usable: {stats.first_error}")
        if stats.unparsed_bytes:
            raise DataError(
                f"{label}: nothing usable: no complete record ({stats.unparsed_error} at {stats.unparsed_at})"
            )
        raise DataError(f"{label}: empty file (no records)")
    if stats.first_error and stats.problems >= stats.records:
        raise DataError(f"{label}: nothing usable: no line is valid JSON (first error: {stats.first_error})")
    if reasons and set(reasons) <= {"unknown_format", "not_a_record"} and reasons["unknown_format"]:
        keys = (
            ", ".join(sorted(map(str, first_record))[:8])
            if isinstance(first_record, dict)
            else type(first_record).__name__
        )
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
    if cfg.train.objective != "sft":  # preference rows are another dataset; sft keys stay as they were
        payload["objective"] = cfg.train.objective
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def output_folder(cfg: Config) -> Path:
    if cfg.data.output_dir:
        return Path(cfg.data.output_dir).expanduser()
    from tunelab.io import cache_dir

    return cache_dir() / "data" / config_key(cfg)


def input_fingerprints(data_cfg: DataConfig) -> list:
    """Size and mtime of every input file: a cached folder is stale when its data files changed."""
    prints = []
    for src in data_cfg.sources:
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
        raise DataError(
            f"data.output_dir: {folder} exists and is not a prepared dataset folder (choose another or remove it)"
        )


def prepared_features():
    import datasets

    return datasets.Features(
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


class SplitWriter:
    """Rows -> folder/train and folder/val in `datasets.save_to_disk` layout, a batch at a time.

    Each split's rows go straight into its one Arrow file (datasets' ArrowWriter); `state.json` and
    `dataset_info.json` are then written the way `Dataset.save_to_disk` writes them, from the file opened
    memory-mapped. (Writing a Dataset and calling save_to_disk would read every page of it back: resident
    memory that grows with the data.) `datasets.load_from_disk` reads the result."""

    DATA_FILE = "data-00000-of-00001.arrow"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.features = prepared_features()
        self.pending: dict[str, list[dict]] = {"train": [], "val": []}
        self.writers: dict = {}

    def __enter__(self) -> SplitWriter:
        from datasets.arrow_writer import ArrowWriter

        for split in self.pending:
            (self.folder / split).mkdir(parents=True, exist_ok=True)
            self.writers[split] = ArrowWriter(features=self.features, path=str(self.folder / split / self.DATA_FILE))
        return self

    def add(self, split: str, row: dict) -> None:
        rows = self.pending[split]
        rows.append(row)
        if len(rows) >= ENCODE_CHUNK:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self.pending[split]
        if rows:
            self.writers[split].write_batch({key: [r[key] for r in rows] for key in self.features})
            rows.clear()

    def __exit__(self, exc_type, *exc) -> bool:
        for split, writer in self.writers.items():
            if exc_type is None:
                self._flush(split)
                writer.finalize()
            writer.close()
        if exc_type is None:
            for split in self.writers:
                self._write_state(self.folder / split)
        return False

    def _write_state(self, split_dir: Path) -> None:
        from dataclasses import asdict

        import datasets

        dataset = datasets.Dataset.from_file(str(split_dir / self.DATA_FILE))  # memory-mapped: no data is read
        keys = ("_fingerprint", "_format_columns", "_format_kwargs", "_format_type", "_output_all_columns")
        state = {key: dataset.__dict__[key] for key in keys}
        state.update(_split=None, _data_files=[{"filename": self.DATA_FILE}])
        (split_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        info = asdict(dataset.info)
        (split_dir / "dataset_info.json").write_text(
            json.dumps({k: info[k] for k in sorted(info)}, indent=2), encoding="utf-8"
        )


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
    if cfg.train.objective == "sft":
        pipeline = DataPipeline(cfg)
        with atomic_folder(folder) as tmp:  # readers see the old or the new folder, never half
            pipeline.run(tmp)  # reads, dedups, encodes and writes train/ and val/ in one streamed pass
            write_report(tmp, pipeline.report(key, inputs), pipeline.lengths)
    else:  # preference pairs/thumbs: small (feedback exports), encoded in memory
        from tunelab.data.preference import PreferencePipeline, save_preference_splits

        pipeline = PreferencePipeline(cfg)
        train, val = pipeline.run()
        with atomic_folder(folder) as tmp:
            with pipeline.timed("write"):
                save_preference_splits(tmp, train, val)
            write_report(tmp, pipeline.report(key, inputs), pipeline.lengths)
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


class TokenRows(Sequence):
    """(input_ids, labels) of a prepared split, read on demand from its memory-mapped Arrow table: training
    indexes rows (batching.step_indices) without turning the dataset into Python lists."""

    def __init__(self, dataset, positions: range | None = None) -> None:
        import pyarrow as pa

        self._table = dataset if isinstance(dataset, pa.Table) else dataset.data.table  # memory-mapped by datasets
        self._input_ids = self._table.column("input_ids")
        self._labels = self._table.column("labels")
        self._positions = positions if positions is not None else range(self._table.num_rows)

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TokenRows(self._table, self._positions[index])
        row = self._positions[index]
        return self._input_ids[row].as_py(), self._labels[row].as_py()
