"""Checks on a run folder after training or export (`tunelab doctor RUN`).

adapter changes answers   greedy answers of base and tuned (the adapter disabled / enabled) on the eval prompts
held-out loss moved       the trainer's held-out loss, base vs tuned (tunelab.train.heldout)
merged = adapter          RUN/export/merged gives the adapter's greedy tokens
gguf template             every RUN/export/*.gguf carries the chat template the run trained with
llama.cpp tokens          llama.cpp renders and tokenises a conversation to the ids training used
stops at turn end         llama.cpp's chat completion ends its turn within the token budget
quant <type>              greedy agreement of each GGUF with the merged model (tunelab.export.parity), and the
                          export's "quantisation erased the fine-tune" warning
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from tunelab.config import DEMO_PROMPTS
from tunelab.doctor.report import FAIL, PASS, SKIP, WARN, Check, Report, run_checks

PROMPTS = 3  # eval prompts the greedy checks answer
GREEDY_TOKENS = 32
STOP_BUDGET = 256  # new tokens a turn has to end within
HELDOUT_ROWS, HELDOUT_TOKENS = 8, 256  # validation rows (their first tokens) the held-out loss is compared on
STOP_PROMPTS = ["What is the capital of Australia?", "Write a haiku about the sea."]
CONVERSATION = [
    {"role": "system", "content": "You plan trips."},
    {"role": "user", "content": "Two days in Porto?"},
    {"role": "assistant", "content": "Day 1: Ribeira.\nDay 2: Foz."},
    {"role": "user", "content": "And Braga?"},
]


class RunState:
    """The run folder and what several checks share, loaded once when first needed."""

    def __init__(self, run_dir: Path, threads: int | None = None):
        from tunelab.models.runs import run_config

        self.run_dir = Path(run_dir)
        self.cfg = run_config(self.run_dir)
        self.threads = threads
        self.export_dir = self.run_dir / "export"
        self.merged_dir = self.export_dir / "merged"

    @cached_property
    def loaded(self):
        from tunelab.models.runs import load_run_model

        return load_run_model(self.run_dir)

    @property
    def model(self):
        return self.loaded[0]

    @property
    def tokenizer(self):
        return self.loaded[1]

    @cached_property
    def turn_ends(self) -> list[int]:
        from tunelab.models.inference import turn_end_ids

        return turn_end_ids(self.model, self.tokenizer)

    @cached_property
    def prompts(self) -> list[str]:
        return (self.cfg.eval.prompts or DEMO_PROMPTS)[:PROMPTS]

    @cached_property
    def prompt_ids(self) -> list[list[int]]:
        from tunelab.export.parity import prompt_token_ids

        return prompt_token_ids(self.tokenizer, self.prompts)

    @cached_property
    def tuned_answers(self) -> list[list[int]]:
        from tunelab.models.inference import greedy_tokens

        return [greedy_tokens(self.model, ids, GREEDY_TOKENS, self.turn_ends)[0] for ids in self.prompt_ids]

    @cached_property
    def base_answers(self) -> list[list[int]]:
        from tunelab.models.inference import greedy_tokens

        with self.model.disable_adapter():
            return [greedy_tokens(self.model, ids, GREEDY_TOKENS, self.turn_ends)[0] for ids in self.prompt_ids]

    @cached_property
    def ggufs(self) -> dict[str, Path]:
        """{quant type: file} of RUN/export/model-<type>.gguf, in the order the export lists its types."""
        from tunelab.export.gguf import QUANT_TYPES

        found = {p.stem.removeprefix("model-"): p for p in sorted(self.export_dir.glob("model-*.gguf"))}
        return {q: found[q] for q in sorted(found, key=lambda q: QUANT_TYPES.index(q) if q in QUANT_TYPES else 99)}

    @cached_property
    def heldout_rows(self) -> tuple[list[tuple[list[int], list[int]]], str]:
        """(input_ids, labels) rows of the run's validation split, or of the parity's built-in conversations."""
        from tunelab.export.merge import val_rows

        rows = [
            (r["input_ids"][:HELDOUT_TOKENS], r["labels"][:HELDOUT_TOKENS])
            for r in val_rows(self.run_dir, HELDOUT_ROWS)
        ]
        if rows:
            return rows, f"{len(rows)} validation rows"
        from tunelab.data.masking import Encoded, encode_conversations
        from tunelab.export.parity import FALLBACK_VAL_CONVERSATIONS

        encoded, _ = encode_conversations(
            self.tokenizer, FALLBACK_VAL_CONVERSATIONS, ["built-in"] * 3, self.cfg.train.max_seq_len, "truncate"
        )
        rows = [(e.input_ids, e.labels) for e in encoded if isinstance(e, Encoded)]
        return rows, f"{len(rows)} built-in conversations (no prepared validation split here)"

    @cached_property
    def parity(self) -> dict:
        from tunelab.export.parity import run_parity

        return run_parity(
            self.merged_dir,
            self.ggufs,
            [ids[:256] for ids, _ in self.heldout_rows[0]],
            prompts=self.prompts,
            max_new_tokens=GREEDY_TOKENS,
            threads=self.threads,
        )


# ------------------------------------------------------------------------------------------- adapter
def check_adapter_changes_answers(s: RunState) -> Check:
    differ = sum(t != b for t, b in zip(s.tuned_answers, s.base_answers))
    with torch.inference_mode():
        ids = torch.tensor([s.prompt_ids[0]])
        tuned = s.model(input_ids=ids).logits[0, -1]
        with s.model.disable_adapter():
            base = s.model(input_ids=ids).logits[0, -1]
    gap = float((tuned - base).abs().max())
    evidence = (
        f"greedy answers differ from the base model's on {differ}/{len(s.prompts)} prompts "
        f"({GREEDY_TOKENS} tokens); largest next-token logit change {gap:.2e}"
    )
    if gap == 0.0:
        return Check(
            "adapter changes answers",
            FAIL,
            evidence,
            "the adapter has no effect (its weights are still at their zero init): check the training loss moved",
        )
    if differ == 0:
        return Check("adapter changes answers", WARN, evidence, "a small fine-tune: train longer or raise train.lr")
    return Check("adapter changes answers", PASS, evidence)


def check_heldout_loss(s: RunState) -> Check:
    from tunelab.train.heldout import heldout_loss

    rows, source = s.heldout_rows
    if not rows:
        return Check("held-out loss moved", SKIP, "no held-out rows")
    pad_id = s.tokenizer.pad_token_id or 0
    tuned = heldout_loss(s.model, rows, batch_size=1, pad_id=pad_id)
    with s.model.disable_adapter():
        base = heldout_loss(s.model, rows, batch_size=1, pad_id=pad_id)
    evidence = f"base {base:.4f} -> tuned {tuned:.4f} on {source}"
    if abs(tuned - base) <= 1e-6 * max(abs(base), 1.0):
        return Check("held-out loss moved", FAIL, evidence, "training did not change the model: check train.lr/steps")
    if tuned > base:
        return Check("held-out loss moved", WARN, evidence + " (higher)", "over-fitting or a too high train.lr")
    return Check("held-out loss moved", PASS, evidence)


# -------------------------------------------------------------------------------------------- merged
def check_merged(s: RunState) -> Check:
    from transformers import AutoModelForCausalLM

    from tunelab.export.parity import common_prefix, is_near_tie
    from tunelab.models.inference import greedy_tokens

    if not (s.merged_dir / "config.json").is_file():
        return Check("merged = adapter", SKIP, f"no {s.merged_dir} yet", f"tunelab export {s.run_dir}")
    merged = AutoModelForCausalLM.from_pretrained(str(s.merged_dir), dtype=torch.float32).eval()
    same, bad = 0, []
    for prompt, ids, want in zip(s.prompts, s.prompt_ids, s.tuned_answers):
        got = greedy_tokens(merged, ids, GREEDY_TOKENS, s.turn_ends)[0]
        at = common_prefix(want, got)
        # a near-tie in the merged model's own logits (its pick first) is rounding, not a different model
        if got == want or is_near_tie(merged, ids, got, want, at, tie_margin=1e-3):
            same += 1
        else:
            bad.append(f"{prompt[:30]!r} from token {at}")
    evidence = f"merged model gives the adapter's greedy tokens on {same}/{len(s.prompts)} prompts"
    if bad:
        return Check(
            "merged = adapter",
            FAIL,
            evidence + f" (differs on {'; '.join(bad)})",
            f"the merge is not the adapter: re-run tunelab export {s.run_dir}",
        )
    return Check("merged = adapter", PASS, evidence)


# ---------------------------------------------------------------------------------------------- gguf
def _no_gguf(name: str, s: RunState) -> Check:
    return Check(name, SKIP, f"no GGUF in {s.export_dir}", f"tunelab export {s.run_dir} --gguf q4_k_m")


def check_gguf_template(s: RunState) -> Check:
    from tunelab.export.gguf import gguf_metadata

    if not s.ggufs:
        return _no_gguf("gguf template", s)
    trained = s.tokenizer.chat_template
    wrong = []
    for path in s.ggufs.values():
        carried = gguf_metadata(path).get("tokenizer.chat_template")
        if carried != trained:
            at = next((i for i, (a, b) in enumerate(zip(carried or "", trained)) if a != b), len(carried or ""))
            wrong.append(f"{path.name} (none)" if carried is None else f"{path.name} (differs at character {at})")
    names = ", ".join(p.name for p in s.ggufs.values())
    if wrong:
        return Check(
            "gguf template",
            FAIL,
            f"not the run's training template: {', '.join(wrong)}",
            f"re-export from this run (tunelab export {s.run_dir}) so the GGUF carries RUN/tokenizer's template",
        )
    return Check("gguf template", PASS, f"{names} carry the run's training template")


def check_llama_cpp_tokens(s: RunState) -> Check:
    from tunelab.export.parity import common_prefix, llama_cpp_prompt, trained_prompt
    from tunelab.models.inference import open_llama

    if not s.ggufs:
        return _no_gguf("llama.cpp tokens", s)
    _, trained_ids = trained_prompt(s.tokenizer, CONVERSATION)
    wrong = []
    for path in s.ggufs.values():
        llm = open_llama(path, threads=s.threads, n_ctx=512)
        try:
            _, cpp_ids = llama_cpp_prompt(llm, CONVERSATION)
        finally:
            llm.close()
        if cpp_ids != trained_ids:
            at = common_prefix(cpp_ids, trained_ids)
            wrong.append(f"{path.name} from token {at} ({cpp_ids[at : at + 3]} vs trained {trained_ids[at : at + 3]})")
    if wrong:
        return Check(
            "llama.cpp tokens",
            FAIL,
            f"llama.cpp's prompt differs from the trained ids: {'; '.join(wrong)}",
            "the GGUF's template or BOS handling is not the training one: re-export from this run",
        )
    return Check(
        "llama.cpp tokens",
        PASS,
        f"a {len(CONVERSATION)}-message conversation: llama.cpp gives the {len(trained_ids)} trained ids in "
        f"{len(s.ggufs)} GGUF(s)",
    )


def check_stops(s: RunState) -> Check:
    from tunelab.models.inference import open_llama

    if not s.ggufs:
        return _no_gguf("stops at turn end", s)
    counts = []
    stopped_all = total_all = 0
    for path in s.ggufs.values():
        llm = open_llama(path, threads=s.threads, n_ctx=1024, chat_format=None)
        try:
            stopped = 0
            for prompt in STOP_PROMPTS:
                reply = llm.create_chat_completion(
                    messages=[{"role": "user", "content": prompt}], max_tokens=STOP_BUDGET, temperature=0.0, seed=0
                )
                stopped += reply["choices"][0]["finish_reason"] == "stop"
        finally:
            llm.close()
        counts.append(f"{path.stem.removeprefix('model-')} {stopped}/{len(STOP_PROMPTS)}")
        stopped_all += stopped
        total_all += len(STOP_PROMPTS)
    evidence = f"greedy replies that end their turn within {STOP_BUDGET} tokens: {', '.join(counts)}"
    if stopped_all == 0:
        return Check(
            "stops at turn end",
            FAIL,
            evidence,
            "the model never ends its turn: check that the labels check passes (the turn-end token is trained)",
        )
    if stopped_all < total_all:
        return Check(
            "stops at turn end", WARN, evidence, "some answers run long; train on shorter replies or more steps"
        )
    return Check("stops at turn end", PASS, evidence)


def quant_check(quant: str):
    def check(s: RunState) -> Check:
        from tunelab.export.parity import quantisation_warnings

        name = f"quant {quant}"
        if not (s.merged_dir / "config.json").is_file():
            return Check(name, SKIP, f"no {s.merged_dir} to compare with", f"tunelab export {s.run_dir}")
        row = next(r for r in s.parity["ggufs"] if r["quant"] == quant)
        evidence = (
            f"{row['file']}: {row['exact_matches']}/{row['prompts']} greedy answers equal to the merged model's, "
            f"{row['token_agreement']:.0%} token agreement, perplexity {row['ppl_delta_pct']:+.1f}%"
        )
        warnings = quantisation_warnings({"ggufs": [row]})
        if row["passed"] is False:
            return Check(name, FAIL, evidence, "the f16 file does not reproduce the merged model: re-export")
        if warnings:
            return Check(
                name,
                FAIL,
                evidence + "; every answer leaves the merged model at its first token",
                "this file is not the fine-tune (quantisation erased it, or it is another model's file): "
                "ship a finer type (--gguf q8_0) or re-export",
            )
        return Check(name, PASS, evidence)

    return check


def after_checks(s: RunState) -> list[tuple[str, object]]:
    checks = [
        ("adapter changes answers", check_adapter_changes_answers),
        ("held-out loss moved", check_heldout_loss),
        ("merged = adapter", check_merged),
        ("gguf template", check_gguf_template),
        ("llama.cpp tokens", check_llama_cpp_tokens),
        ("stops at turn end", check_stops),
    ]
    checks += [(f"quant {q}", quant_check(q)) for q in s.ggufs]
    return [(name, lambda f=f: f(s)) for name, f in checks]


def doctor_run(run_dir: Path, threads: int | None = None) -> Report:
    """`tunelab doctor RUN`: every after-training check on the run folder (GGUF checks when it was exported)."""
    state = RunState(run_dir, threads)
    return run_checks(str(run_dir), "after training", after_checks(state))
