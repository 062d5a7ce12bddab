"""Pre-training checks, on the prepared data and the loaded LoRA model (`tunelab doctor CONFIG`, `tunelab train`).

labels         share of rows with no trained token; trained tokens outside the assistant's replies (should be
               none); every reply ends with a trained turn-end token (else the model never learns to stop)
bos token      the prepared rows start with exactly one BOS where the template writes one
pad token      when the pad token is a turn-end token, the batches training builds still train every turn end
template       the configured template has an assistant header; where it is not the tokenizer's own, where the
               two differ on one rendered example
packing        the attention path in use (tunelab's packed attention or the model's own on padded rows) and
               that a micro-batch of two conversations gives the logits each one gives alone
lora           which modules got adapters and which linear layers did not, that one backward step reaches
               every adapter, the trainable parameter count
quantisation   with model.load_in_4bit/8bit: which linear layers are quantised

Every check here costs well under a second on the quickstart model (docs/design.md has the measurement), so
`tunelab train` runs them all before its first step and stops on a failure.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.config import Config
from tunelab.data.masking import IGNORE_INDEX, render
from tunelab.doctor.report import FAIL, PASS, SKIP, WARN, Check, Report, render_report, run_checks
from tunelab.errors import UserError

SAMPLE_ROWS = 256  # prepared rows the data checks read
PROBE_TOKENS = 48  # tokens of each row the packing and LoRA checks run through the model
EXAMPLE = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]

Row = tuple[list[int], list[int]]  # (input_ids, labels)
Collate = Callable[[list[Row]], list[list[int]]]  # rows -> the labels each row trains on, aligned with input_ids


@dataclass
class Preflight:
    """What the pre-training checks look at."""

    cfg: Config
    tokenizer: object
    rows: list[Row]  # a sample of the prepared train split
    messages: list[list[dict]]  # the conversation of each sampled row, as kept
    data_report: dict  # the prepared folder's report.json
    model: object | None  # the PEFT model as training builds it; None when it could not be built
    model_error: str = ""
    own_template: str | None = None  # the tokenizer's own chat template, before model.chat_template applied
    turn_ends: tuple[int, ...] = ()


# ------------------------------------------------------------------------------------------ labels
def check_labels(p: Preflight) -> Check:
    if not p.rows:
        return Check("labels", SKIP, f"objective {p.cfg.train.objective}: no SFT rows to read")
    dropped = p.data_report.get("dropped", {}).get("no_label_tokens", {}).get("count", 0)
    kept = sum(p.data_report.get("splits", {}).get(s, 0) for s in ("train", "val"))
    empty = sum(all(label == IGNORE_INDEX for label in labels) for _, labels in p.rows)
    no_label_share = (dropped + empty) / max(kept + dropped, 1)
    trained = outside = replies = ended = 0
    for (ids, labels), messages in zip(p.rows, p.messages):
        runs = labelled_runs(ids, labels)
        contents = [m["content"] for m in messages if m["role"] == "assistant"]
        replies += len(contents)
        for run, content in zip(runs, contents):
            trained += len(run)
            ends = bool(run) and run[-1] in p.turn_ends
            ended += ends
            outside += tokens_outside_reply(p.tokenizer, run[:-1] if ends else run, content)
        outside += sum(len(run) for run in runs[len(contents) :])  # trained text after the last reply
    outside_share = outside / max(trained, 1)
    end_names = "/".join(p.tokenizer.convert_ids_to_tokens(list(p.turn_ends)))
    evidence = (
        f"{len(p.rows)} rows: {no_label_share:.1%} of rows without a trained token ({dropped} dropped at prepare); "
        f"{outside} of {trained} trained tokens ({outside_share:.1%}) outside the assistant replies; "
        f"{ended}/{replies} replies end with a trained {end_names}"
    )
    if outside or ended < replies:
        return Check(
            "labels",
            FAIL,
            evidence,
            "the chat template must mark where the assistant's turn starts and end it with the turn-end token: "
            "set model.chat_template to chatml, llama-3.1, gemma or zephyr (or fix your .jinja)",
        )
    if no_label_share > 0.05:
        return Check("labels", WARN, evidence, "many conversations teach nothing: check data.truncation and sources")
    return Check("labels", PASS, evidence)


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The token ids of each maximal run of trained positions, in order."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return runs


def tokens_outside_reply(tokenizer, run: list[int], content: str) -> int:
    """How many tokens of a trained run (its turn-end token removed) are not the reply's text: a header or
    another message trained by mistake. Whitespace around the reply counts as part of it."""
    text = tokenizer.decode(run)
    reply = content.strip()
    at = text.find(reply)
    if at < 0:  # a tokenizer that normalises text (NFKC, spaces) decodes the reply as its own round trip
        reply = tokenizer.decode(tokenizer(reply, add_special_tokens=False)["input_ids"]).strip()
        at = text.find(reply)
    if at < 0:
        return len(run)
    before, after = text[:at], text[at + len(reply) :]
    lead = _covering(len(run), lambda j: len(tokenizer.decode(run[:j])), len(before)) if before.strip() else 0
    tail = _covering(len(run), lambda k: len(tokenizer.decode(run[len(run) - k :])), len(after)) if after.strip() else 0
    return lead + tail


def _covering(n: int, length_of: Callable[[int], int], chars: int) -> int:
    """The largest count c in [1, n] of tokens whose decoded text is at most `chars` long (at least 1)."""
    low, high = 1, n
    while low < high:
        mid = (low + high + 1) // 2
        if length_of(mid) <= chars:
            low = mid
        else:
            high = mid - 1
    return low


# ----------------------------------------------------------------------------------- special tokens
def check_bos(p: Preflight) -> Check:
    bos, bos_id = p.tokenizer.bos_token, p.tokenizer.bos_token_id
    if not p.rows or bos is None or bos_id is None:
        return Check(
            "bos token", PASS if bos is None else SKIP, "the tokenizer has no BOS token" if bos is None else "no rows"
        )
    rendered = render(p.tokenizer, [EXAMPLE], add_generation_prompt=True)[0]
    expected = 1 if rendered.startswith(bos) else 0
    leading = Counter(leading_count(ids, bos_id) for ids, _ in p.rows)
    wrong = sum(n for count, n in leading.items() if count != expected)
    shape = ", ".join(f"{n} rows with {count}" for count, n in sorted(leading.items()))
    evidence = f"the template {'writes' if expected else 'writes no'} {bos}; leading {bos} per row: {shape}"
    if wrong:
        return Check(
            "bos token",
            FAIL,
            evidence,
            f"the template writes {bos} more than once at the start: drop the extra `{{{{ bos_token }}}}` (or the "
            "literal BOS text) from model.chat_template",
        )
    return Check("bos token", PASS, evidence)


def leading_count(ids: list[int], token_id: int) -> int:
    n = 0
    while n < len(ids) and ids[n] == token_id:
        n += 1
    return n


def tunelab_collated_labels(pad_id: int) -> Collate:
    """The labels each row trains on in the padded micro-batch training builds (tunelab.train.batching.pad)."""

    def collate(rows: list[Row]) -> list[list[int]]:
        from tunelab.train.batching import pad

        batch = pad(rows, pad_id)
        # targets are shifted (target[t] = label[t + 1]); shift back to align with input_ids
        return [[IGNORE_INDEX] + batch.targets[r, : len(ids) - 1].tolist() for r, (ids, _) in enumerate(rows)]

    return collate


def check_pad(p: Preflight, collate: Collate | None = None) -> Check:
    pad_id = p.tokenizer.pad_token_id
    pad = p.tokenizer.pad_token
    if pad_id not in p.turn_ends:
        return Check("pad token", PASS, f"pad {pad} (id {pad_id}) is not a turn-end token")
    rows = [row for row in p.rows if any(label in p.turn_ends for label in row[1])][:8]
    if not rows:
        return Check("pad token", SKIP, f"pad {pad} is the turn-end token; no trained turn end in the sample")
    collate = collate or tunelab_collated_labels(pad_id)
    wanted = kept = 0
    for (_ids, labels), trained in zip(rows, collate(rows)):
        for i, label in enumerate(labels):
            if label in p.turn_ends:
                wanted += 1
                kept += trained[i] == label
    evidence = f"pad {pad} is the turn-end token; a padded batch of {len(rows)} rows trains {kept}/{wanted} turn ends"
    if kept < wanted:
        return Check(
            "pad token",
            FAIL,
            evidence,
            "the collator masks padding by token id, which also masks every turn end: mask padding by position "
            "(as tunelab's batches do) or give the tokenizer a pad token of its own",
        )
    return Check("pad token", PASS, evidence + " (padding is masked by position)")


# ---------------------------------------------------------------------------------------- template
def check_template(p: Preflight) -> Check:
    configured = p.tokenizer.chat_template
    plain = render(p.tokenizer, [EXAMPLE], add_generation_prompt=False)[0]
    prompted = render(p.tokenizer, [EXAMPLE], add_generation_prompt=True)[0]
    if prompted == plain:
        return Check(
            "template",
            FAIL,
            "add_generation_prompt adds nothing: the template writes no assistant header, so neither training nor "
            "inference can mark where the model's answer starts",
            "set model.chat_template to chatml, llama-3.1, gemma or zephyr (or add an assistant header to your .jinja)",
        )
    name = p.cfg.model.chat_template or "the tokenizer's own"
    if p.own_template is None:
        return Check("template", PASS, f"the tokenizer has no template; {name} is used and saved with the run")
    if p.own_template == configured:
        return Check("template", PASS, "the configured template is the tokenizer's own")
    own = _render_with(p.tokenizer, p.own_template)
    at = next((i for i, (a, b) in enumerate(zip(own, prompted)) if a != b), min(len(own), len(prompted)))
    if own == prompted:
        return Check("template", PASS, f"{name} differs from the tokenizer's own text but renders the same example")
    return Check(
        "template",
        WARN,
        f"{name} differs from the tokenizer's own template at character {at} of one example: "
        f"own {own[max(0, at - 12) : at + 28]!r} vs configured {prompted[max(0, at - 12) : at + 28]!r}",
        "fine when intended: the run's tokenizer, merged model and GGUF carry the configured template; serve it "
        "from those, not from the base model's files",
    )


def _render_with(tokenizer, template: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            EXAMPLE, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # noqa: BLE001 - a template that does not render is reported, not raised
        return f"<cannot render: {type(exc).__name__}>"


# ----------------------------------------------------------------------------------------- packing
def check_packing(p: Preflight) -> Check:
    if p.model is None:
        return Check("packing", SKIP, "the model was not built (see lora)")
    from tunelab.train.architectures import batch_logits_gaps, plan_for

    plan = plan_for(p.model)
    packing = p.cfg.train.packing and plan.fast
    path = (
        "tunelab's packed attention, one row per micro-batch" if packing else "the model's own attention on padded rows"
    )
    rows = probe_rows(p, 2)
    if len(rows) < 2:
        return Check("packing", SKIP, f"{plan.family}: {path}; fewer than 2 rows to compare")
    first, *later = batch_logits_gaps(p.model, rows, packing, p.tokenizer.pad_token_id or 0)
    gap = max(later)
    # The first conversation's gap is the path's own rounding (fp32 ~1e-7; bf16 over 30 layers ~3e-2): a later
    # conversation may differ by a few times that, not by what seeing another conversation does.
    fp32 = next(p.model.parameters()).dtype == torch.float32
    limit, floor = (1e-3, 1e-3) if fp32 else (1e-1, 1e-2)  # `limit`: a first gap beyond it is not rounding
    tolerance = max(floor, 4 * first)
    evidence = (
        f"{plan.family}: {path}; 2 conversations in one micro-batch vs each alone (eager): largest logit gap "
        f"{first:.1e} (first, the path's rounding) and {gap:.1e} (second) of the logit scale, tolerance {tolerance:.1e}"
    )
    if first > limit or gap > tolerance:
        return Check(
            "packing",
            FAIL,
            evidence,
            "the training path does not give each conversation's own logits (conversations seeing each other, or an "
            "attention it does not reproduce): set train.packing: false, or use a family tunelab packs exactly "
            "(docs/design.md, Architectures)",
        )
    return Check("packing", PASS, evidence)


def probe_rows(p: Preflight, n: int) -> list[Row]:
    """The first n sampled rows with a trained token in their first PROBE_TOKENS tokens, cut there."""
    rows = []
    for ids, labels in p.rows:
        if any(label != IGNORE_INDEX for label in labels[:PROBE_TOKENS]):
            rows.append((ids[:PROBE_TOKENS], labels[:PROBE_TOKENS]))
        if len(rows) == n:
            break
    return rows


# -------------------------------------------------------------------------------------------- lora
def check_lora(p: Preflight) -> Check:
    if p.model is None:
        return Check(
            "lora", FAIL, p.model_error, "set lora.target_modules to module names of this model (or all-linear)"
        )
    from tunelab.train.adapters import (
        adapter_modules,
        adapters_without_gradient,
        linear_layers_without_adapter,
        trainable_parameters,
    )
    from tunelab.train.architectures import plan_for
    from tunelab.train.batching import make_batch
    from tunelab.train.loss import masked_lm_loss

    adapted = adapter_modules(p.model)
    bare = linear_layers_without_adapter(p.model)
    trainable, total = trainable_parameters(p.model)
    coverage = (
        f"adapters on {_kinds(adapted) or 'nothing'}; no adapter on {_kinds(bare) or 'no linear layer'}; "
        f"{trainable:,} trainable parameters ({trainable / max(total, 1):.2%})"
    )
    if not adapted or not trainable:
        return Check("lora", FAIL, coverage, "set lora.target_modules to linear layers of this model (or all-linear)")
    rows = probe_rows(p, 1)
    if not rows:
        return Check("lora", SKIP, coverage + "; no row to run a backward step on")
    packing = p.cfg.train.packing and plan_for(p.model).fast
    device = next(p.model.parameters()).device
    was_training = p.model.training
    p.model.train()
    p.model.zero_grad(set_to_none=True)
    try:
        loss, _ = masked_lm_loss(p.model, make_batch(rows, packing, p.tokenizer.pad_token_id or 0).to(device))
        loss.backward()
        silent = adapters_without_gradient(p.model)
    finally:
        p.model.zero_grad(set_to_none=True)
        p.model.train(was_training)
    evidence = f"{coverage}; one backward step: {len(adapted) - len(silent)}/{len(adapted)} adapters get a gradient"
    if silent:
        return Check(
            "lora",
            FAIL,
            evidence + f" (none: {', '.join(silent[:3])}{' ...' if len(silent) > 3 else ''})",
            "these adapters never learn: they are frozen (requires_grad False, e.g. after a dtype cast) or off "
            "the loss's path; check lora.target_modules",
        )
    return Check("lora", PASS, evidence)


def _kinds(names: list[str]) -> str:
    """`q_proj, v_proj (x30 each)`: module names grouped by their last part."""
    counts = Counter(name.rsplit(".", 1)[-1] for name in names)
    if not counts:
        return ""
    parts = [kind if n == 1 else f"{kind} x{n}" for kind, n in counts.items()]
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ quantisation
def check_quantisation(p: Preflight) -> Check:
    model_cfg = p.cfg.model
    if not (model_cfg.load_in_4bit or model_cfg.load_in_8bit):
        return Check("quantisation", PASS, "model.load_in_4bit/8bit off: the base is not quantised")
    if p.model is None:
        return Check("quantisation", SKIP, "the model was not built (see lora)")
    from tunelab.train.adapters import adapter_modules, is_linear
    from tunelab.train.architectures import causal_lm

    wanted = "Linear4bit" if model_cfg.load_in_4bit else "Linear8bitLt"
    adapted = set(adapter_modules(p.model))
    quantised, plain = [], []
    for name, module in causal_lm(p.model).named_modules():
        if ".lora_" in f".{name}" or not is_linear(module):
            continue
        base = getattr(module, "base_layer", None) if name in adapted else module
        (quantised if type(base).__name__ == wanted else plain).append(name)
    evidence = f"{len(quantised)} linear layers are {wanted}; not quantised: {_kinds(plain) or 'none'}"
    if not quantised:
        return Check("quantisation", FAIL, evidence, "bitsandbytes did not quantise the model: check it is installed")
    return Check("quantisation", PASS, evidence)


# ------------------------------------------------------------------------------------------ runner
CHECKS: list[tuple[str, Callable[[Preflight], Check]]] = [
    ("labels", check_labels),
    ("bos token", check_bos),
    ("pad token", check_pad),
    ("template", check_template),
    ("packing", check_packing),
    ("lora", check_lora),
    ("quantisation", check_quantisation),
]


def preflight_of(cfg: Config, data_dir: Path, tokenizer, model, model_error: str = "") -> Preflight:
    """Read the sample of prepared rows, the data report and the tokenizer's own template."""
    from tunelab.data.prepare import load_prepared
    from tunelab.models.inference import turn_end_ids

    train_set, _ = load_prepared(data_dir)
    rows, messages = [], []
    if cfg.train.objective == "sft":
        sample = train_set.select(range(min(SAMPLE_ROWS, len(train_set))))
        rows = list(zip(sample["input_ids"], sample["labels"]))
        messages = [json.loads(m) for m in sample["messages"]]
    report_file = Path(data_dir) / "report.json"
    data_report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    ends = [tokenizer.eos_token_id] if model is None else turn_end_ids(model, tokenizer)
    return Preflight(cfg, tokenizer, rows, messages, data_report, model, model_error, own_template(cfg), tuple(ends))


def own_template(cfg: Config) -> str | None:
    """The chat template the model's tokenizer ships with (None when it has none)."""
    from transformers import AutoTokenizer

    from tunelab.models.loading import resolve_model_path

    path = resolve_model_path(cfg.model.name, cfg.model.revision)
    raw = AutoTokenizer.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    return getattr(raw, "chat_template", None) or None


@contextlib.contextmanager
def rng_untouched():
    """Every random state training draws from (torch CPU and CUDA, Python's `random`, NumPy) as it was before:
    reading the prepared data draws from Python's (datasets' fingerprints), the LoRA check's dropout from torch's."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def pre_training_report(p: Preflight) -> Report:
    """Every pre-training check on `p`."""
    return run_checks(p.cfg.train.output_dir, "before training", [(n, lambda f=f: f(p)) for n, f in CHECKS])


def doctor_config(cfg: Config, log=print) -> Report:
    """`tunelab doctor CONFIG`: prepare (or reuse) the data, build the LoRA model as training would, check both."""
    from tunelab.data.prepare import prepare_dataset
    from tunelab.models import load_tokenizer
    from tunelab.train.precision import precision_for_this_machine
    from tunelab.train.recipe import build_lora_model

    tokenizer = load_tokenizer(cfg.model)
    data_dir = prepare_dataset(cfg, verbose=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, error = None, ""
    try:
        model = build_lora_model(cfg, precision_for_this_machine(cfg.train.precision, device), log)
    except UserError as exc:
        error = str(exc)
    return pre_training_report(preflight_of(cfg, data_dir, tokenizer, model, error))


def pre_training_gate(cfg: Config, data_dir: Path, tokenizer, model, log=print) -> Report:
    """What `tunelab train` runs before its first step: every check, the table, and a UserError on a failure."""
    started = time.perf_counter()
    with rng_untouched():  # a run trains the same with and without the doctor
        report = pre_training_report(preflight_of(cfg, data_dir, tokenizer, model))
    render_report(report)
    log(f"doctor: {len(report.checks)} pre-training checks in {time.perf_counter() - started:.1f} s")
    if report.failed:
        raise UserError(
            f"doctor: {', '.join(c.name for c in report.failed)} failed before training (table above); "
            "fix it, or train anyway with --no-doctor"
        )
    return report
