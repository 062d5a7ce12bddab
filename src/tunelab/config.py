"""One YAML file per run, validated into pydantic models.

Every YAML key maps to exactly one field below, and each field's `description` says what it means (unit,
range); `tunelab config show CONFIG --explain` prints them. Train keys that may change when a run is resumed
are marked on the field (`json_schema_extra={"resume_safe": True}`). Errors are reported as one line naming the key path
(`train.lr: must be > 0`) through `ConfigError`; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import UserError

# The shipped quickstart config (`tunelab quickstart`; the default job of `tunelab bench train` and `bench infer`).
QUICKSTART_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


class ConfigError(UserError):
    """A user-facing configuration problem: one line, names the key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- data
class DedupConfig(_Section):
    exact: bool = Field(True, description="Drop byte-identical conversations (after normalisation).")
    near: bool = Field(True, description="Drop near-duplicate conversations (MinHash LSH, datasketch).")
    threshold: float = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description="Estimated Jaccard similarity of word shingles above which two conversations are "
        "near-duplicates (0-1].",
    )
    num_perm: int = Field(
        64,
        ge=16,
        le=512,
        description="MinHash permutations per conversation (16-512): more = a sharper estimate, slower.",
    )
    shingle_words: int = Field(5, ge=1, le=20, description="Words per shingle for near-duplicate detection (1-20).")


class SourceConfig(_Section):
    path: str | None = Field(
        None, description="A local file or folder (json, jsonl, yaml, parquet); give this or `preset`."
    )
    preset: str | None = Field(
        None,
        description="embedded:sharegpt | embedded:chatterbot | embedded:travel-plans | a Hugging Face Hub dataset id; "
        "give this or `path`.",
    )
    format: Literal["auto", "sharegpt", "openai", "alpaca", "prompt_response", "chatterbot"] = Field(
        "auto", description="Record format; auto = recognised from the records themselves."
    )
    split: str = Field("train", description="Split to read from a Hub dataset.")
    streaming: bool = Field(
        False,
        description="Hub dataset sources: read records as they stream in (datasets streaming) instead of downloading "
        "the whole dataset first (bounded memory); an error mid-stream keeps the records before it and is reported "
        "as `stream_error` at its index.",
    )
    weight: float = Field(
        1.0, gt=0.0, description="Mixing weight: rows kept = weight x rows available (<1 subsamples, >1 repeats)."
    )
    max_records: int | None = Field(
        None, gt=0, description="Read at most this many records from the source (none: all)."
    )
    keywords: list[str] = Field(
        [], description="Keep only conversations mentioning one of these words (e.g. a travel slice); empty: keep all."
    )
    name: str | None = Field(None, description="Label in the data report; default: the path's file name or the preset.")

    @model_validator(mode="after")
    def _one_origin(self) -> SourceConfig:
        if bool(self.path) == bool(self.preset):
            raise ValueError("give exactly one of `path` or `preset`")
        return self

    @property
    def label(self) -> str:
        return self.name or self.preset or Path(self.path or "").name


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(preset="embedded:sharegpt")],
        description="The data sources, mixed by their weights.",
    )
    output_dir: str | None = Field(
        None,
        description="Prepared dataset folder; default: a cache folder keyed by a hash of everything the data "
        "depends on.",
    )
    normalize: bool = Field(
        True, description="Normalize text (Unicode NFC, whitespace) and role names before filtering."
    )
    min_turns: int = Field(
        2,
        ge=1,
        description="Drop conversations with fewer user + assistant messages (a system message is not counted).",
    )
    max_turns: int = Field(64, ge=1, description="Drop conversations with more user + assistant messages.")
    min_assistant_chars: int = Field(
        1, ge=0, description="Drop conversations with an assistant reply shorter than this (characters)."
    )
    max_record_chars: int = Field(
        200_000, gt=0, description="Drop records longer than this while reading (characters; bounds memory)."
    )
    truncation: Literal["drop", "truncate"] = Field(
        "truncate",
        description="Conversations longer than train.max_seq_len tokens: drop them, or keep the longest run of "
        "whole user->assistant exchanges that fits.",
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near-duplicate removal.")
    val_fraction: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="Share of conversations held out for validation (0-1), chosen by content hash: "
        "stable when data is added.",
    )
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="A bad record: count it in the report and skip it, or stop with an error naming it."
    )


# ---------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    name: str = Field(
        "embedded:smollm2-135m",
        description="Base model: embedded:smollm2-135m, embedded:gemma3-270m (extra `gemma`), a local HF folder, "
        "a local .gguf file or a Hub id.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a Hub model.")
    chat_template: str | None = Field(
        None,
        description="Force a chat template: llama-3.1 | chatml | zephyr | gemma | a .jinja file; default: the "
        "tokenizer's own (gemma for embedded:gemma3-270m).",
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: load the frozen base in 4-bit (bitsandbytes, on a CPU or a CUDA GPU); its compute dtype "
        "follows train.precision.",
    )
    load_in_8bit: bool = Field(
        False, description="Load the frozen base in 8-bit (bitsandbytes LLM.int8, on a CPU or a CUDA GPU)."
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="With load_in_4bit: the 4-bit data type, nf4 (NormalFloat, QLoRA's) or fp4."
    )
    bnb_4bit_use_double_quant: bool = Field(
        True,
        description="With load_in_4bit: quantise the per-block scales too (double quantisation, ~0.4 bit/weight less).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the Hub repo to run (only for models you trust)."
    )

    @model_validator(mode="after")
    def _one_quantisation(self) -> ModelConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive: set one of them")
        return self


# ----------------------------------------------------------------------------------------- lora
class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank: the inner dimension of each adapter.")
    alpha: float = Field(32, gt=0, description="LoRA alpha: the adapter's output is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input during training [0-1).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names that get adapters (e.g. [q_proj, v_proj]), "
        "or all-linear (every linear layer but the LM head).",
    )


# ---------------------------------------------------------------------------------------- train
def _resume_safe(description: str) -> dict:
    """Field kwargs of a train key that may change when a run is resumed (it does not change the maths)."""
    return {"description": description, "json_schema_extra": {"resume_safe": True}}


class TrainConfig(_Section):
    output_dir: str = Field(
        "runs/quickstart", **_resume_safe("The run folder (config.yaml, adapter/, checkpoints/, metrics.jsonl, ...).")
    )
    max_steps: int = Field(
        60,
        gt=0,
        description="Optimizer steps in the whole run "
        "(the schedule depends on it: a resume may raise it only with --extend).",
    )
    batch_size: int = Field(4, gt=0, description="Conversations per micro-batch (per process).")
    grad_accum: int = Field(
        1, gt=0, description="Micro-batches per optimizer step: a step sees batch_size x grad_accum conversations."
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW), reached after the warm-up.")
    warmup_steps: int = Field(5, ge=0, description="Optimizer steps of linear warm-up from 0 to lr.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after the warm-up: linear or cosine to 0 at max_steps, or constant."
    )
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw (torch, fused) or adamw_8bit (bitsandbytes: 8-bit optimizer states, CPU or CUDA)."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay on the adapter weights.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (none: no clipping).")
    max_seq_len: int = Field(512, ge=16, description="Longest conversation in tokens (see data.truncation).")
    packing: bool = Field(
        True, description="Pack a micro-batch into one row with per-conversation attention (no compute on padding)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, more compute per step."
    )
    release_memory: bool = Field(
        False,
        **_resume_safe(
            "Hand freed activation memory back to the OS (glibc: blocks >= 1 MiB mmapped, the heap trimmed "
            "after every step): a lower peak RSS, but every step faults its pages in again (slower on CPU; figures in "
            "docs/benchmarks.md). With gradient_checkpointing: the leanest run."
        ),
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Compute precision: auto (bf16 where native: CPU avx512_bf16/AMX, GPU compute capability >= 8.0; "
        "fp16 with loss scaling on older GPUs; else fp32), or force fp32, bf16 or fp16.",
    )
    loss_chunk_tokens: int = Field(
        256, ge=16, **_resume_safe("Label tokens per chunk of the LM head + loss (memory vs speed; same result).")
    )
    compile: bool = Field(
        False,
        **_resume_safe(
            "torch.compile (inductor) each decoder layer's norms and MLP: fused element-wise kernels; "
            "costs a compilation at the start of a run (see docs/benchmarks.md for when it pays off)."
        ),
    )
    fused_layers: bool = Field(
        True,
        **_resume_safe(
            "Run the LoRA linears, Llama RMSNorms and SwiGLU MLPs through tunelab's hand-written autograd functions "
            "(train/fused_layers.py: the same numbers up to rounding, ~10 % lower peak RSS on CPU); false keeps "
            "PEFT's and transformers' own modules. Ignored when train.compile is on (inductor fuses instead)."
        ),
    )
    save_steps: int = Field(
        20, gt=0, **_resume_safe("Write a checkpoint every this many optimizer steps (and at the end).")
    )
    save_total_limit: int = Field(2, gt=0, **_resume_safe("Keep this many newest checkpoints."))
    eval_steps: int = Field(20, gt=0, **_resume_safe("Held-out loss every this many optimizer steps (and at the end)."))
    logging_steps: int = Field(1, gt=0, **_resume_safe("Write a metrics.jsonl line every this many optimizer steps."))
    threads: int | None = Field(
        None, gt=0, **_resume_safe("CPU intra-op threads; default: every core this process may use.")
    )
    seed: int = Field(42, description="Seeds the data order and the LoRA initialisation.")
    objective: Literal["sft", "dpo", "kto"] = Field(
        "sft",
        description="sft: imitate assistant replies; dpo: prefer `chosen` over `rejected` (pairs); "
        "kto: unpaired thumbs (`completion` + `label`).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo/kto: β, how far the policy may move from the reference (base model, adapter off); "
        "larger = closer.",
    )
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="dpo loss variant, as TRL's loss_type: sigmoid (DPO), ipo (IPO, per-token averaged), hinge (SLiC).",
    )
    kto_desirable_weight: float = Field(
        1.0, gt=0, description="kto: weight of thumbs-up (label true) losses, to balance unequal counts."
    )
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of thumbs-down (label false) losses.")


# ----------------------------------------------------------------------------------------- eval
# The demo prompts: `tunelab eval`'s sample generations (default), the export parity check, `tunelab bench infer`.
DEMO_PROMPTS = [
    "Plan a 2-day trip to Lisbon for someone who loves food and museums.",
    "What is the capital of Australia?",
    "Give me three tips for learning a new language.",
    "Write a haiku about the sea.",
]


class EvalConfig(_Section):
    max_val_rows: int | None = Field(
        None, gt=0, description="Score at most this many held-out conversations (none: all)."
    )
    batch_size: int = Field(
        8, gt=0, description="Held-out conversations per forward pass (the loss does not depend on it)."
    )
    prompts: list[str] = Field(
        default_factory=lambda: list(DEMO_PROMPTS),
        description="Prompts answered by base and tuned model in `tunelab eval`.",
    )
    max_new_tokens: int = Field(96, gt=0, description="Longest sample answer in tokens (greedy).")


class PromoteConfig(_Section):
    """Gates of `tunelab promote CANDIDATE --over CURRENT`: every measured gate must pass to promote."""

    max_val_loss_regression: float = Field(
        0.01,
        ge=0.0,
        description="Largest allowed rise of held-out val loss, as a fraction of the current model's (0.01 = 1 %).",
    )
    min_regression_win_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Smallest share of feedback regression prompts where the candidate gives the reference answer "
        "a higher log-prob.",
    )
    min_rubric_win_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Smallest lower end of the 95 % bootstrap interval of the candidate's travel-rubric win rate over "
        "the current model, among non-tied prompts (when the rubric is available): 0.5 asks for a detectable "
        "improvement, not a lucky point estimate.",
    )
    max_latency_regression: float = Field(
        0.25,
        ge=0.0,
        description="Largest allowed drop of q4_k_m decode tokens/s, as a fraction of the current model's "
        "(CPU timings are noisy).",
    )
    max_val_rows: int | None = Field(64, gt=0, description="Held-out rows scored for the val-loss gate (None: all).")
    rubric_prompts: int = Field(
        48,
        gt=0,
        description="Shipped travel prompts answered by both q4_k_m exports for the rubric gate (an interval from "
        "fewer prompts is wide: 12 prompts can hardly show any difference).",
    )
    rubric_max_new_tokens: int = Field(
        256,
        gt=0,
        description="Longest answer in tokens for the rubric gate (a prompt with a day count decodes under the app's "
        "day-plan grammar, with the grammar's budget).",
    )
    rubric_samples: int = Field(
        2,
        ge=0,
        description="Sampled answers per prompt and model for the rubric gate besides the greedy one (the app's "
        "temperature, fixed seeds); a prompt scores the mean of its answers.",
    )
    latency_max_new_tokens: int = Field(
        32, gt=0, description="Tokens generated per prompt when timing the q4_k_m exports."
    )
    latency_repeats: int = Field(2, ge=1, description="Timed runs per prompt (the first is a warm-up when > 1).")


class Config(_Section):
    data: DataConfig = Field(
        default_factory=DataConfig, description="Where the conversations come from and how they are cleaned."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model and how it is loaded.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapters.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training run.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="`tunelab eval` and the held-out loss.")
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description="Gates of `tunelab promote`.")

    @field_validator("data", "model", "lora", "train", "eval", "promote", mode="before")
    @classmethod
    def _none_is_default(cls, value: Any) -> Any:
        return {} if value is None else value

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def explain(cfg: Config) -> str:
    """The resolved config as YAML with each field's description as a comment above it (`config show --explain`)."""
    lines: list[str] = []

    def walk(section: BaseModel, pad: str, first_pad: str | None = None) -> None:
        for name, field in type(section).model_fields.items():
            value = getattr(section, name)
            lead = pad if first_pad is None else first_pad
            first_pad = None
            lines.append(f"{lead}# {field.description}")
            lead = pad
            if isinstance(value, BaseModel):
                lines.append(f"{lead}{name}:")
                walk(value, pad + "  ")
            elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
                lines.append(f"{lead}{name}:")
                for item in value:
                    walk(item, pad + "    ", first_pad=pad + "  - ")
            else:
                lines.append(f"{lead}{name}: {json.dumps(value, ensure_ascii=False)}")  # JSON is YAML flow syntax

    walk(cfg, "")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ loading
def _format_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        key = err["loc"][-1]
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
