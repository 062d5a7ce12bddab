"""One YAML file per run, validated into pydantic models.

Every YAML key maps to exactly one field below, and each field's docstring-style comment
names the code that uses it. Errors are reported as one line naming the key path
(`train.lr: must be > 0`) through `ConfigError`; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from tunelab.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(UserError):
    """A user-facing configuration problem: one line, names the key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- data
class DedupConfig(_Section):
    exact: bool = True  # data.dedup: drop byte-identical conversations after normalisation
    near: bool = True  # MinHash near-duplicate removal (datasketch)
    threshold: float = Field(0.85, gt=0.0, le=1.0)  # Jaccard similarity above which rows are duplicates
    num_perm: int = Field(64, ge=16, le=512)
    shingle_words: int = Field(5, ge=1, le=20)


class SourceConfig(_Section):
    path: str | None = None  # local file or folder (json, jsonl, yaml, parquet)
    preset: str | None = None  # embedded:sharegpt | embedded:chatterbot | hub dataset id
    format: Literal["auto", "sharegpt", "openai", "alpaca", "prompt_response", "chatterbot"] = "auto"
    split: str = "train"  # for hub datasets
    weight: float = Field(1.0, gt=0.0)  # mixing weight: rows kept = weight x rows available (<=1 subsamples, >1 repeats)
    max_records: int | None = Field(None, gt=0)  # read at most this many records from the source
    keywords: list[str] = []  # keep only conversations mentioning one of these (e.g. a travel slice)
    name: str | None = None  # label used in the report; defaults to path/preset

    @model_validator(mode="after")
    def _one_origin(self) -> SourceConfig:
        if bool(self.path) == bool(self.preset):
            raise ValueError("give exactly one of `path` or `preset`")
        return self

    @property
    def label(self) -> str:
        return self.name or self.preset or Path(self.path or "").name


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(preset="embedded:sharegpt")])
    output_dir: str | None = None  # prepared dataset folder; default: cache keyed by config hash
    normalize: bool = True  # Unicode NFC, whitespace, role names
    min_turns: int = Field(2, ge=1)  # conversations with fewer turns are dropped
    max_turns: int = Field(64, ge=1)
    min_assistant_chars: int = Field(1, ge=0)
    max_record_chars: int = Field(200_000, gt=0)  # longer records are dropped while reading (memory bound)
    truncation: Literal["drop", "truncate"] = "truncate"  # conversations over train.max_seq_len
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)  # by content hash: stable when data is added
    on_error: Literal["skip", "fail"] = "skip"  # per-record problems: count and skip, or stop
    num_proc: int = Field(1, ge=1)


# ---------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    name: str = "embedded:smollm2-135m"  # embedded:*, local HF folder, local .gguf, or Hub id
    revision: str | None = None
    chat_template: str | None = None  # force llama-3.1 | chatml | zephyr | path to a .jinja file
    load_in_4bit: bool = False  # QLoRA (CUDA + bitsandbytes only)
    load_in_8bit: bool = False
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------------------- lora
class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


# ---------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    output_dir: str = "runs/quickstart"  # the run folder
    max_steps: int = Field(60, gt=0)  # optimizer steps
    batch_size: int = Field(4, gt=0)  # conversations per micro-batch
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_seq_len: int = Field(512, ge=16)
    packing: bool = True  # pack a micro-batch into one row with per-sequence attention
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    loss_chunk_tokens: int = Field(256, ge=16)  # LM head + loss computed this many label tokens at a time (memory vs speed)
    compile: bool = Field(
        False, description="torch.compile (inductor) each decoder layer's norms and MLP: fused element-wise kernels; "
        "costs a compilation at the start of a run (see docs/benchmarks.md for when it pays off)",
    )
    save_steps: int = Field(20, gt=0)
    save_total_limit: int = Field(2, gt=0)
    eval_steps: int = Field(20, gt=0)
    logging_steps: int = Field(1, gt=0)
    threads: int | None = Field(None, gt=0)  # intra-op threads; default: all cores
    seed: int = 42


# ----------------------------------------------------------------------------------------- eval
# The demo prompts: `tunelab eval`'s sample generations (default), the export parity check, `tunelab bench infer`.
DEMO_PROMPTS = [
    "Plan a 2-day trip to Lisbon for someone who loves food and museums.",
    "What is the capital of Australia?",
    "Give me three tips for learning a new language.",
    "Write a haiku about the sea.",
]


class EvalConfig(_Section):
    max_val_rows: int | None = Field(None, gt=0)  # cap on held-out rows scored (None: all)
    batch_size: int = Field(8, gt=0)
    prompts: list[str] = Field(default_factory=lambda: list(DEMO_PROMPTS))
    max_new_tokens: int = Field(96, gt=0)


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("data", "model", "lora", "train", "eval", mode="before")
    @classmethod
    def _none_is_default(cls, value: Any) -> Any:
        return {} if value is None else value

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self, *sections: str) -> str:
        """A short stable hash of some sections (e.g. what the prepared data depends on)."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ loading
def _format_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent, key = _lookup_parent(raw, err["loc"])
        hint = ""
        model = _model_at(err["loc"][:-1])
        if model is not None:
            close = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
            if close:
                hint = f" (did you mean `{close[0]}`?)"
        return f"{path}: unknown key{hint}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[err["type"]]
        limit = next(iter(err["ctx"].values()))
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        msg = f"must be {op} {limit}"
    got = err.get("input")
    if err["type"] not in ("missing",) and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    return f"{path}: {msg}"


def _lookup_parent(raw: dict[str, Any], loc: tuple) -> tuple[Any, Any]:
    node: Any = raw
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None, loc[-1]
    return node, loc[-1]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or [])]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(text: str) -> Any:
    """A command-line value (`--set`, `--grid`) as YAML reads it, except that a number in exponent form such as
    `1e-4` is a number (YAML 1.1 keeps it a string); text that is not valid YAML stays text."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4), the value read by parse_value."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value")
    key, _, value = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text}: empty key")
    return parts, parse_value(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise ConfigError(f"--set {item}: `{part}` is not an index of that list (it has {len(node)} items)")
                node = node[int(part)]
                continue
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{origin}: {_format_error(first, raw)}{more}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply `--set` overrides."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise ConfigError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (data, model, lora, train, eval)")
        raw = loaded
    if overrides:
        # Overrides may reach into defaults the file does not spell out (e.g. data.sources.0.max_records).
        raw = apply_overrides(_deep_merge(Config().model_dump(mode="json"), raw), overrides)
    return config_from_dict(raw, origin)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
