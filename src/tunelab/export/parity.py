"""Does the GGUF behave like the merged HF model? Greedy tokens and perplexity, same prompt token ids.

Both sides get exactly the same token ids (the HF tokenizer renders the chat template), so any difference
comes from the weights/kernels, not from templating. f16 must reproduce the fp32 HF greedy tokens; the only
tolerated difference is a near-tie: at the first divergent step the HF logits of the two candidate tokens are
within `tie_margin` (fp16 rounding can legitimately flip such a step). Quantised files report agreement only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunelab.config import DEMO_PROMPTS
from tunelab.errors import UserError

# Perplexity text when the run has no prepared validation split on this machine.
FALLBACK_VAL_CONVERSATIONS = [
    [
        {"role": "user", "content": "How do I boil an egg?"},
        {
            "role": "assistant",
            "content": "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
        },
    ],
    [
        {"role": "user", "content": "Name three primary colours."},
        {"role": "assistant", "content": "Red, yellow and blue are the traditional primary colours."},
    ],
    [{"role": "user", "content": "What is 12 times 12?"}, {"role": "assistant", "content": "12 times 12 is 144."}],
]


class ParityError(UserError):
    """The f16 GGUF does not reproduce the merged model: the export is broken."""


@dataclass
class PromptResult:
    prompt: str
    hf_tokens: list[int]
    gguf_tokens: list[int]
    agreement: float  # common prefix length / longer sequence
    first_divergence: int | None
    near_tie: bool = False


@dataclass
class GgufParity:
    quant: str
    file: str
    exact_matches: int
    prompts: int
    token_agreement: float
    ppl_hf: float
    ppl_gguf: float
    ppl_delta_pct: float
    passed: bool | None  # None: informative only (quantised)
    results: list[PromptResult] = field(default_factory=list)
    decode_tok_s: float = 0.0  # greedy tokens/s over the parity prompts (prompt processing included)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def gguf_greedy(llm, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    out: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in eos_ids or llm.token_eos() == token or len(out) >= max_new_tokens:
            break
        out.append(token)
    return out


def hf_nll(model, sequences: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.inference_mode():
        for seq in sequences:
            ids = torch.tensor([seq])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(seq) - 1
    return total, count


def gguf_nll(llm, sequences: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for seq in sequences:
        llm.reset()
        llm.eval(seq)
        logits = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(seq) - 1), seq[1:]].sum())
        count += len(seq) - 1
    return total, count


def is_near_tie(model, prompt_ids, hf_tokens, gguf_tokens, at: int, tie_margin: float) -> bool:
    """At the first divergence, were the two candidates nearly tied in the fp32 model?"""
    if at >= len(hf_tokens) or at >= len(gguf_tokens):
        return False  # one side stopped (EOS) where the other went on: not a tie we can measure
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + hf_tokens[:at]])).logits[0, -1]
    return float(logits[hf_tokens[at]] - logits[gguf_tokens[at]]) <= tie_margin


def prompt_token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for p in prompts
    ]


def trained_prompt(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """The prompt text and ids training and transformers inference use: the chat template rendered up to the
    assistant header, tokenised without added special tokens (the template writes them)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def llama_cpp_prompt(llm, messages: list[dict]) -> tuple[str, list[int]]:
    """The prompt text and ids llama-cpp-python's chat completion builds from a GGUF's own `tokenizer.chat_template`:
    its Jinja2ChatFormatter with the GGUF's BOS/EOS token texts, then a BOS only when the template wrote none."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""

    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=token_text(llm.token_eos()),
        bos_token=token_text(llm.token_bos()),
    )
    formatted = formatter(messages=messages)
    ids = llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)
    return formatted.prompt, list(ids)


def fallback_val_sequences(tokenizer) -> list[list[int]]:
    return [
        list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])
        for c in FALLBACK_VAL_CONVERSATIONS
    ]


def check_gguf(
    model,
    tokenizer,
    gguf_file: Path,
    quant: str,
    prompts: list[str],
    val_sequences: list[list[int]],
    hf_reference: dict,
    max_new_tokens: int,
    threads: int | None,
    tie_margin: float,
) -> GgufParity:
    from tunelab.models.inference import open_llama, turn_end_ids

    eos_ids = turn_end_ids(model, tokenizer)
    n_ctx = max(len(s) for s in hf_reference["prompt_ids"] + val_sequences) + max_new_tokens + 8
    llm = open_llama(gguf_file, threads=threads, n_ctx=max(n_ctx, 512), logits_all=True)
    results, generated, generating_s = [], 0, 0.0
    for prompt, ids, hf_tokens in zip(prompts, hf_reference["prompt_ids"], hf_reference["tokens"]):
        started = time.perf_counter()
        gguf_tokens = gguf_greedy(llm, ids, max_new_tokens, eos_ids)
        generating_s += time.perf_counter() - started
        generated += len(gguf_tokens)
        prefix = common_prefix(hf_tokens, gguf_tokens)
        same = hf_tokens == gguf_tokens
        results.append(
            PromptResult(
                prompt,
                hf_tokens,
                gguf_tokens,
                prefix / max(len(hf_tokens), len(gguf_tokens), 1),
                None if same else prefix,
                near_tie=not same and is_near_tie(model, ids, hf_tokens, gguf_tokens, prefix, tie_margin),
            )
        )
    total, count = gguf_nll(llm, val_sequences)
    ppl_gguf = math.exp(total / count)
    ppl_hf = hf_reference["ppl"]
    exact = sum(r.first_divergence is None for r in results)
    passed = all(r.first_divergence is None or r.near_tie for r in results) if quant == "f16" else None
    del llm
    return GgufParity(
        quant,
        gguf_file.name,
        exact,
        len(results),
        sum(r.agreement for r in results) / len(results),
        ppl_hf,
        ppl_gguf,
        100.0 * (ppl_gguf - ppl_hf) / ppl_hf,
        passed,
        results,
        decode_tok_s=generated / max(generating_s, 1e-9),
    )


def run_parity(
    merged_dir: Path,
    ggufs: dict[str, Path],
    val_sequences: list[list[int]] | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 48,
    threads: int | None = None,
    tie_margin: float = 0.05,
) -> dict:
    """Compare every GGUF with the merged fp32 HF model; raise ParityError when the f16 file disagrees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.inference import greedy_tokens, turn_end_ids

    prompts = prompts or DEMO_PROMPTS
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    eos_ids = turn_end_ids(model, tokenizer)
    val_source = "val split" if val_sequences else "built-in conversations"
    val_sequences = val_sequences or fallback_val_sequences(tokenizer)
    prompt_ids = prompt_token_ids(tokenizer, prompts)
    total, count = hf_nll(model, val_sequences)
    reference = {
        "prompt_ids": prompt_ids,
        "tokens": [greedy_tokens(model, ids, max_new_tokens, eos_ids)[0] for ids in prompt_ids],
        "ppl": math.exp(total / count),
    }
    rows = [
        check_gguf(
            model, tokenizer, path, quant, prompts, val_sequences, reference, max_new_tokens, threads, tie_margin
        )
        for quant, path in ggufs.items()
    ]
    return {
        "merged": str(merged_dir),
        "max_new_tokens": max_new_tokens,
        "val_source": val_source,
        "val_sequences": len(val_sequences),
        "val_tokens": count,
        "tie_margin": tie_margin,
        "ggufs": [asdict(r) for r in rows],
    }


def parity_table(report: dict) -> str:
    lines = [
        f"parity vs merged HF fp32 ({len(report['ggufs'][0]['results']) if report['ggufs'] else 0} prompts, greedy "
        f"{report['max_new_tokens']} tokens; perplexity on {report['val_sequences']} {report['val_source']} "
        f"sequences, {report['val_tokens']} tokens)",
        f"{'gguf':<8} {'exact':>7} {'agree':>7} {'ppl hf':>9} {'ppl gguf':>9} {'delta':>8}  result",
    ]
    for row in report["ggufs"]:
        result = {True: "PASS", False: "FAIL", None: "info"}[row["passed"]]
        ties = sum(r["near_tie"] for r in row["results"])
        if ties:
            result += f" ({ties} near-tie)"
        lines.append(
            f"{row['quant']:<8} {row['exact_matches']:>3}/{row['prompts']:<3} {100 * row['token_agreement']:>6.1f}% "
            f"{row['ppl_hf']:>9.3f} {row['ppl_gguf']:>9.3f} {row['ppl_delta_pct']:>+7.2f}%  {result}"
        )
    return "\n".join(lines)


def quantisation_warnings(report: dict) -> list[str]:
    """One line per quantised GGUF whose greedy answer leaves the merged model at the very first token on every
    prompt. Ordinary quantisation noise flips a later, close step; a file that never starts like the merged model
    has most likely rounded a small fine-tune away (seen with q4_k_m on a base that was itself a Q4_K_M GGUF)."""
    lines = []
    for row in report["ggufs"]:
        firsts = [r["first_divergence"] for r in row["results"]]
        if row["quant"] != "f16" and firsts and all(first == 0 for first in firsts):
            lines.append(
                f"warning: {row['file']} differs from the merged model from the first greedy token "
                f"on all {len(firsts)} "
                f"parity prompts: {row['quant']} may have rounded the fine-tune away; compare a finer type "
                f"(--gguf q8_0) before shipping it"
            )
    return lines


def raise_if_failed(report: dict) -> None:
    for row in report["ggufs"]:
        if row["passed"] is False:
            bad = next(r for r in row["results"] if r["first_divergence"] is not None and not r["near_tie"])
            raise ParityError(
                f"{row['file']} does not reproduce the merged model: greedy tokens differ from token "
                f"{bad['first_divergence']} on prompt {bad['prompt']!r} ({row['exact_matches']}/{row['prompts']} "
                "prompts match); the GGUF is broken, do not ship it"
            )
