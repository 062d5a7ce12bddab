"""Preference data for `train.objective: dpo|kto`: records -> prompt + completion(s) -> tokenised rows.

Record formats (JSON/JSONL/YAML/Parquet, read by readers.py like SFT data; TRL's preference formats):
- DPO (paired):   {"prompt" | "messages": ..., "chosen": C, "rejected": C}
- KTO (unpaired): {"prompt" | "messages": ..., "completion": C, "label": true | false}
`prompt` is a string (one user message) or a list of OpenAI-style messages ending with a user message;
`messages` is the same list. A completion C is a string, an assistant message object, or a list holding
one assistant message (what `tunelab feedback export --format dpo` writes).

Encoding: the prompt is rendered with the chat template and `add_generation_prompt=True`; a completion's
tokens are what rendering prompt + completion adds after that, without trailing whitespace, so they end
with the turn-end token (the model learns to stop). Labels are the completion tokens, -100 elsewhere
(earlier assistant turns in a multi-turn prompt are context, not labelled). A sequence over
`train.max_seq_len` is dropped (`over_max_seq_len`): cutting a completion would change what is preferred.

Rows (datasets columns): DPO `chosen_input_ids/labels`, `rejected_input_ids/labels`; KTO `input_ids`,
`labels`, `label`; both `id` (content hash, split and dedup key), `source`, `prompt_len` (tokens of the
rendered prompt), `num_tokens`, `num_label_tokens`. Exact duplicates are removed; near-dedup does not
apply (two pairs sharing a prompt are different preferences).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import SourceConfig
from tunelab.data.formats import openai as openai_pairs
from tunelab.data.masking import IGNORE_INDEX, batch_token_ids, render
from tunelab.data.normalize import ROLE_NAMES, Message, canonical_conversation
from tunelab.data.prepare import DataPipeline
from tunelab.data.problems import DataError, RecordProblem
from tunelab.data.readers import RawRecord
from tunelab.data.split import copies_for_weight, is_validation
from tunelab.models.templates import TemplateError

OBJECTIVE_FIELDS = {"dpo": ("chosen", "rejected"), "kto": ("completion",)}


@dataclass
class PreferenceRow:
    id: str
    source: str
    where: str
    prompt: list[Message]  # normalised, ends with the user message
    completions: list[str]  # dpo: [chosen, rejected]; kto: [completion]
    label: bool | None = None  # kto: thumbs up (True) or down (False)


@dataclass
class EncodedSequence:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int


@dataclass
class _NoEncodeStats:  # what DataPipeline.report reads; preference rows are never truncated or segment-checked
    truncated: int = 0
    verified: int = 0
    boundary_mismatch: int = 0


# ------------------------------------------------------------------------------------------- parse
def parse_record(record: Any, objective: str) -> tuple[list[tuple[str, str]], list[str], bool | None]:
    """(prompt role/text pairs, completion texts, label) of one raw record; raises RecordProblem."""
    if not isinstance(record, dict):
        raise RecordProblem("not_a_record", f"record is a {type(record).__name__}, not an object")
    prompt = _prompt_pairs(record)
    if not prompt or ROLE_NAMES.get(prompt[-1][0].strip().lower()) != "user":
        # checked before normalising, which would merge a trailing assistant message into the completion
        raise RecordProblem("prompt_not_user", "the prompt must end with a user message")
    completions = [_completion_text(record, name) for name in OBJECTIVE_FIELDS[objective]]
    label = None
    if objective == "kto":
        if "label" not in record:
            raise RecordProblem("missing_field", "missing `label` (true for a good completion, false for a bad one)")
        label = record["label"]
        if not isinstance(label, bool):
            raise RecordProblem("wrong_type", f"`label` must be true or false, got {type(label).__name__}")
    return prompt, completions, label


def _prompt_pairs(record: dict) -> list[tuple[str, str]]:
    value = record.get("prompt", record.get("messages"))
    name = "prompt" if "prompt" in record else "messages"
    if value is None:
        raise RecordProblem("missing_field", "missing `prompt` (or `messages`)")
    if isinstance(value, str):
        return [("user", value)]
    if isinstance(value, list):
        return openai_pairs({"messages": value})
    raise RecordProblem("wrong_type", f"`{name}` must be text or a list of messages, got {type(value).__name__}")


def _completion_text(record: dict, name: str) -> str:
    if name not in record or record[name] is None:
        raise RecordProblem("missing_field", f"missing `{name}`")
    value = record[name]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        pairs = openai_pairs({"messages": [value]})
        if pairs[0][0].strip().lower() != "assistant":
            raise RecordProblem("wrong_type", f"`{name}` must be an assistant message, got role `{pairs[0][0][:40]}`")
        return pairs[0][1]
    if isinstance(value, str):
        return value
    raise RecordProblem("wrong_type", f"`{name}` must be text or one assistant message, got {type(value).__name__}")


# --------------------------------------------------------------------------------------- pipeline
class PreferencePipeline(DataPipeline):
    """DataPipeline's reading, problem log, exact dedup and report, with preference records and encoding. The rows
    are kept in lists: preference data (feedback exports, curated pairs) is small next to SFT mixes."""

    def __init__(self, cfg, tokenizer=None) -> None:
        super().__init__(cfg, tokenizer)
        self.objective = cfg.train.objective
        self.encode_stats = _NoEncodeStats()
        self.first_records: dict[str, Any] = {}

    def run(self) -> tuple[list[dict], list[dict]]:
        with self.timed("total"):
            return self.encode(list(self.unique_rows(self.iter_rows())))

    def source_rows(self, src: SourceConfig, name: str | None = None):
        """The base reader, with a clearer message for a source that is not preference data at all."""
        name = name or self.source_name(src)
        usable = 0
        try:
            for row in super().source_rows(src, name):
                usable += 1
                yield row
        except DataError:
            first = self.first_records.get(name)
            if usable or (isinstance(first, dict) and any(k in first for k in OBJECTIVE_FIELDS[self.objective])):
                raise
            keys = ", ".join(sorted(map(str, first))[:8]) if isinstance(first, dict) else type(first).__name__
            wanted = " + ".join(OBJECTIVE_FIELDS[self.objective]) + (" + label" if self.objective == "kto" else "")
            raise DataError(
                f"{src.path or src.preset}: not {self.objective} preference data (expected prompt/messages + {wanted}; "
                f"first record has: {keys})"
            ) from None

    def normalize_record(
        self, record: RawRecord, fmt: str, keywords, name: str, reasons: Counter
    ) -> PreferenceRow | None:
        self.first_records.setdefault(name, record.value)
        try:
            return self.preference_row(record.value, record.where, name, keywords)
        except RecordProblem as problem:
            reasons[problem.reason] += 1
            self.log.drop(problem.reason, record.where, name, problem.detail)
            return None

    def unique_rows(self, rows):
        """Exact duplicates only: two pairs sharing most of their text are still two different judgements."""
        seen: set[str] = set()
        for row in rows:
            if self.data.dedup.exact and row.id in seen:
                self.duplicates["exact"].add(row.where)
                continue
            seen.add(row.id)
            yield row

    def preference_row(self, value: Any, where: str, source: str, keywords) -> PreferenceRow:
        prompt_pairs, completions, label = parse_record(value, self.objective)
        chars = sum(len(t) for _, t in prompt_pairs) + sum(len(c) for c in completions)
        if chars > self.data.max_record_chars:
            raise RecordProblem("too_long", f"more than data.max_record_chars={self.data.max_record_chars} characters")
        repair = lambda r: self.log.repair(r, where)  # noqa: E731
        prompt, texts = [], []
        for completion in completions:
            conversation = canonical_conversation(
                [*prompt_pairs, ("assistant", completion)], self.data, keywords, repair
            )
            *prompt, reply = conversation
            texts.append(reply["content"])
        if len(texts) == 2 and texts[0] == texts[1]:
            raise RecordProblem("identical_pair", "`chosen` and `rejected` are the same text")
        key = json.dumps([prompt, texts, label], ensure_ascii=False, separators=(",", ":"))
        row_id = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        return PreferenceRow(row_id, source, where, prompt, texts, label)

    def encode(self, rows: list[PreferenceRow]) -> tuple[list[dict], list[dict]]:
        weights = {name: c.weight for name, c in self.counts.items()}
        for r in rows:
            self.counts[r.source].unique += 1
        with self.timed("encode"):
            encoded = encode_preferences(self.tokenizer, rows, self.cfg.train.max_seq_len)
        train, val = [], []
        for r, result in zip(rows, encoded):
            if isinstance(result, RecordProblem):
                self.log.drop(result.reason, r.where, r.source, result.detail)
                continue
            is_val = is_validation(r.id, self.data.val_fraction)
            copies = 1 if is_val else copies_for_weight(r.id, weights[r.source])
            if not copies:
                continue
            out = output_row(r, result, self.objective)
            (val if is_val else train).extend([out] * copies)
            split = "val" if is_val else "train"
            self.lengths[split].extend([out["num_tokens"]] * copies)
            self.label_lengths[split].extend([out["num_label_tokens"]] * copies)
            counts = self.counts[r.source]
            if is_val:
                counts.val_rows += 1
            else:
                counts.train_rows += copies
        if not train:
            dropped = ", ".join(f"{k} {v}" for k, v in self.log.dropped.counts.most_common(4))
            raise DataError(
                "data.sources: no preference rows left for training after filtering and tokenising "
                f"(dropped: {dropped})"
            )
        if self.objective == "kto" and len({r["label"] for r in train}) < 2:
            raise DataError(
                "data.sources: KTO needs both desirable (label true) and undesirable (label false) training rows"
            )
        self.splits = (train, val)
        return train, val

    def report(self, key, inputs):
        report = super().report(key, inputs)
        report["objective"] = self.objective
        report["truncation"].update(
            policy="drop", description="preference sequences over train.max_seq_len are dropped"
        )
        if self.objective == "kto":
            report["labels"] = {
                split: {"desirable": sum(r["label"] for r in rows), "undesirable": sum(not r["label"] for r in rows)}
                for split, rows in zip(("train", "val"), self.splits)
            }
        return report


# ----------------------------------------------------------------------------------------- encode
def encode_preferences(
    tokenizer, rows: list[PreferenceRow], max_seq_len: int
) -> list[list[EncodedSequence] | RecordProblem]:
    """One EncodedSequence per completion of each row, or the RecordProblem that drops the row."""
    prompts = render(tokenizer, [r.prompt for r in rows], add_generation_prompt=True)
    flat = [(i, text) for i, r in enumerate(rows) for text in r.completions]
    fulls = render(
        tokenizer,
        [rows[i].prompt + [{"role": "assistant", "content": text}] for i, text in flat],
        add_generation_prompt=False,
    )
    tails = []
    for (i, _), full in zip(flat, fulls):
        if not full.startswith(prompts[i]):
            raise TemplateError(
                f"model.chat_template: rendering {rows[i].where} with its completion does not start with the rendered "
                "prompt, so completion tokens cannot be found; set model.chat_template to chatml, llama-3.1 or zephyr"
            )
        tails.append(full[len(prompts[i]) :].rstrip())
    prompt_ids = batch_token_ids(tokenizer, prompts)
    completion_ids = batch_token_ids(tokenizer, tails)
    results: list[list[EncodedSequence] | RecordProblem] = [[] for _ in rows]
    for (i, _), ids in zip(flat, completion_ids):
        if isinstance(results[i], RecordProblem):
            continue
        p = prompt_ids[i]
        if not ids:
            results[i] = RecordProblem("no_label_tokens", "a completion has no tokens")
        elif len(p) + len(ids) > max_seq_len:
            results[i] = RecordProblem(
                "over_max_seq_len", f"prompt + completion longer than train.max_seq_len={max_seq_len}"
            )
        else:
            results[i].append(EncodedSequence(p + ids, [IGNORE_INDEX] * len(p) + ids, len(p)))
    return results


def output_row(row: PreferenceRow, sequences: list[EncodedSequence], objective: str) -> dict[str, Any]:
    out: dict[str, Any] = {"id": row.id, "source": row.source, "prompt": json.dumps(row.prompt, ensure_ascii=False)}
    names = ("chosen_", "rejected_") if objective == "dpo" else ("",)
    for prefix, seq in zip(names, sequences):
        out[prefix + "input_ids"] = seq.input_ids
        out[prefix + "labels"] = seq.labels
    if objective == "kto":
        out["label"] = row.label
    out["prompt_len"] = sequences[0].prompt_len
    out["num_tokens"] = sum(len(s.input_ids) for s in sequences)
    out["num_label_tokens"] = sum(len(s.input_ids) - s.prompt_len for s in sequences)
    return out


def save_preference_splits(folder: Path, train: list[dict], val: list[dict]) -> None:
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    sequences = ("chosen_", "rejected_") if "chosen_input_ids" in train[0] else ("",)
    features = {"id": datasets.Value("string"), "source": datasets.Value("string"), "prompt": datasets.Value("string")}
    for prefix in sequences:
        features[prefix + "input_ids"], features[prefix + "labels"] = ids, ids
    if "label" in train[0]:
        features["label"] = datasets.Value("bool")
    for name in ("prompt_len", "num_tokens", "num_label_tokens"):
        features[name] = datasets.Value("int32")
    features = datasets.Features(features)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for name, rows in (("train", train), ("val", val)):
            columns = {key: [r[key] for r in rows] for key in features}
            datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(folder / name))
    finally:
        if bars:
            datasets.enable_progress_bars()
