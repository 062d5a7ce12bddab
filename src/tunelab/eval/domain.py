"""`tunelab eval RUN --prompts travel|FILE.jsonl`: base vs tuned on travel-planning prompts, judged by the rubric.

Each pair of generators answers every prompt with greedy decoding:
- "adapter": the run's base model with the LoRA adapter off (base) and on (tuned), in transformers;
- "gguf-q4_k_m": the base exported to q4_k_m GGUF vs the tuned q4_k_m GGUF the app serves, in llama.cpp
  (only when both files are given: RUN/export/model-q4_k_m.gguf and RUN/export/base-q4_k_m.gguf).
Per prompt the tuned answer wins, ties or loses on its rubric score (tunelab.eval.rubric); per pair the
report has win/tie/loss counts, the win rate over non-tied prompts and the mean score of each criterion.
Everything, answers included, goes to RUN/eval/<name>.json and RUN/eval/<name>.md.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.eval.rubric import CRITERIA, Answer, Scored, TravelPrompt, compare, score_answer
from tunelab.models.inference import greedy_reply, llama_grammar, load_backend, open_llama

Generate = Callable[[TravelPrompt], Answer]


@dataclass(frozen=True)
class Decoding:
    """Greedy decoding settings for the domain eval (the same for base and tuned)."""

    max_new_tokens: int = 384
    repetition_penalty: float = 1.0  # 1.0: plain greedy; the app's default is 1.1 (a decoding lever, reported apart)
    # GGUFs only: constrain prompts with a day count to exactly that many "Day n" sections (`plan_grammar`), with
    # the budget of the longest plan it allows. A decoding lever: it fixes structure, not content.
    day_grammar: bool = False


# ------------------------------------------------------------------------------------ generators
def adapter_generators(run_dir: Path, decoding: Decoding, threads: int | None = None) -> tuple[Generate, Generate]:
    """(base, tuned) from one transformers load of the run: the base is the same model with its adapter off."""
    backend = load_backend(run_dir, threads=threads)
    model, tokenizer = backend.model, backend.tokenizer

    def generate(prompt: TravelPrompt, adapter: bool) -> Answer:
        with contextlib.nullcontext() if adapter else model.disable_adapter():
            text, finished = greedy_reply(
                model, tokenizer, [{"role": "user", "content": prompt.prompt}], decoding.max_new_tokens,
                decoding.repetition_penalty,
            )  # fmt: skip
        return Answer(text, finished=finished)

    return (lambda prompt: generate(prompt, adapter=False)), (lambda prompt: generate(prompt, adapter=True))


def answer_in_llama_cpp(llm, prompt: TravelPrompt, day_grammar: bool, max_new_tokens: int, **sampling) -> Answer:
    """One answer from a llama.cpp model; finished means it stopped at end-of-turn, not at the token limit.

    day_grammar (and a prompt with a day count): decode under the day-plan grammar with the budget of the longest
    plan it allows, so a constrained plan is never cut; otherwise `max_new_tokens`. The app's Travel Planner decodes
    the same way when its "day-by-day format" box is ticked (serve/handlers.planner_decoding; the grammar reaches
    llama.cpp through the same `llama_grammar`)."""
    from tunelab.eval.plan_grammar import day_plan_grammar, token_budget

    constrained = day_grammar and prompt.days is not None
    result = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt.prompt}],
        max_tokens=token_budget(prompt.days) if constrained else max_new_tokens,
        grammar=llama_grammar(day_plan_grammar(prompt.days) if constrained else None),
        **sampling,
    )
    choice = result["choices"][0]
    return Answer((choice["message"].get("content") or "").strip(), finished=choice.get("finish_reason") == "stop")


def gguf_generator(gguf: Path, decoding: Decoding, threads: int | None = None) -> Generate:
    """Greedy answers from a GGUF in llama.cpp."""
    llm = load_backend(gguf, threads=threads).llm

    def generate(prompt: TravelPrompt) -> Answer:
        return answer_in_llama_cpp(llm, prompt, decoding.day_grammar, decoding.max_new_tokens, temperature=0.0, seed=0,
                                   repeat_penalty=decoding.repetition_penalty)  # fmt: skip

    return generate


# -------------------------------------------------------------------------------------- compare
def compare_pair(prompts: list[TravelPrompt], base: Generate, tuned: Generate, log=print, label: str = "") -> dict:
    """Answer every prompt with both generators and score them; per-prompt outcome and per-criterion means."""
    rows = []
    for i, prompt in enumerate(prompts, 1):
        answers = {"base": base(prompt), "tuned": tuned(prompt)}
        scored = {side: score_answer(answer, prompt) for side, answer in answers.items()}
        outcome = compare(scored["base"], scored["tuned"])
        log(
            f"  [{label} {i}/{len(prompts)}] {outcome:4s} base {scored['base'].score:.2f} tuned {scored['tuned'].score:.2f}  {prompt.prompt[:60]}"
        )
        rows.append(
            {
                "prompt": prompt.prompt,
                "city": prompt.city,
                "days": prompt.days,
                "preferences": list(prompt.preferences),
                "outcome": outcome,
                **{side: _answer_record(answers[side], scored[side]) for side in ("base", "tuned")},
            }
        )
    return summarise(rows)


def _answer_record(answer: Answer, scored: Scored) -> dict:
    return {"text": answer.text, "finished": answer.finished, "score": scored.score, "criteria": scored.criteria}


def summarise(rows: list[dict]) -> dict:
    counts = {outcome: sum(r["outcome"] == outcome for r in rows) for outcome in ("win", "tie", "loss")}
    decided = counts["win"] + counts["loss"]
    return {
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "win_rate_non_tied": counts["win"] / decided if decided else None,
        "mean_score": {side: _mean(r[side]["score"] for r in rows) for side in ("base", "tuned")},
        "criteria": {
            name: {side: _mean(r[side]["criteria"][name] for r in rows) for side in ("base", "tuned")}
            for name in CRITERIA
        },
        "answers": rows,
    }


def _mean(values) -> float | None:
    judged = [v for v in values if v is not None]
    return sum(judged) / len(judged) if judged else None


# ------------------------------------------------------------------------------------------ judge
JUDGE_QUESTION = (
    "A traveller asked:\n{request}\n\nPlan A:\n{a}\n\nPlan B:\n{b}\n\n"
    "Which plan answers the request better (right city, right number of days, their interests)? Reply with one letter: A or B."
)


def judge_pairs(judge_gguf: Path, rows: list[dict], threads: int | None = None) -> dict:
    """Pairwise verdicts from a judge model, asked twice with the answers swapped to cancel position bias.

    The tuned answer wins a prompt when the judge prefers it in both orders, loses when it prefers the base
    in both, and ties otherwise.
    """
    llm = open_llama(judge_gguf, threads, n_ctx=4096)

    def prefers_first(request: str, a: str, b: str) -> bool | None:
        reply = (
            llm.create_chat_completion(
                messages=[{"role": "user", "content": JUDGE_QUESTION.format(request=request, a=a[:2000], b=b[:2000])}],
                temperature=0.0,
                max_tokens=4,
                seed=0,
            )["choices"][0]["message"].get("content")
            or ""
        )
        letter = next((c for c in reply.upper() if c in "AB"), None)
        return None if letter is None else letter == "A"

    counts = {"wins": 0, "ties": 0, "losses": 0}
    for row in rows:
        tuned_first = prefers_first(row["prompt"], row["tuned"]["text"], row["base"]["text"])
        base_first = prefers_first(row["prompt"], row["base"]["text"], row["tuned"]["text"])
        if tuned_first is True and base_first is False:
            row["judge"] = "win"
        elif tuned_first is False and base_first is True:
            row["judge"] = "loss"
        else:
            row["judge"] = "tie"
        counts[{"win": "wins", "tie": "ties", "loss": "losses"}[row["judge"]]] += 1
    decided = counts["wins"] + counts["losses"]
    return {"model": str(judge_gguf), **counts, "win_rate_non_tied": counts["wins"] / decided if decided else None}


# ---------------------------------------------------------------------------------------- driver
def evaluate_domain(
    run_dir: str | Path,
    prompts: list[TravelPrompt],
    name: str = "travel",
    decoding: Decoding = Decoding(),
    ggufs: tuple[Path, Path] | None = None,
    judge: Path | None = None,
    adapter: bool = True,
    threads: int | None = None,
    log=print,
) -> dict:
    """Base vs tuned on `prompts`, from the adapter and (when `ggufs` = (base, tuned) is given) the GGUFs."""
    from tunelab.io import atomic_write

    run_dir = Path(run_dir)
    pairs: dict[str, dict] = {}
    if adapter:
        log(
            f"domain eval ({name}, {len(prompts)} prompts): adapter on vs off, greedy, max {decoding.max_new_tokens} new tokens"
        )
        base, tuned = adapter_generators(run_dir, decoding, threads)
        pairs["adapter"] = {
            "base": "adapter off",
            "tuned": "adapter on",
            **compare_pair(prompts, base, tuned, log, "adapter"),
        }
    if ggufs is not None:
        base_gguf, tuned_gguf = ggufs
        log(f"domain eval ({name}): {base_gguf.name} vs {tuned_gguf.name} in llama.cpp")
        pairs["gguf"] = {
            "base": str(base_gguf),
            "tuned": str(tuned_gguf),
            **compare_pair(
                prompts,
                gguf_generator(base_gguf, decoding, threads),
                gguf_generator(tuned_gguf, decoding, threads),
                log,
                "gguf",
            ),
        }
    if judge is not None:
        if not Path(judge).is_file():
            log(f"judge: {judge} not found; skipped")
        else:
            for pair in pairs.values():
                pair["judge"] = judge_pairs(Path(judge), pair["answers"], threads)
    report = {"run_dir": str(run_dir), "prompts": name, "decoding": asdict(decoding), "pairs": pairs}
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    atomic_write(out / f"{name}.json", json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write(out / f"{name}.md", domain_markdown(report))
    log(summary_lines(report) + f"\nanswers and scores: {out / f'{name}.md'}, {out / f'{name}.json'}")
    return report


def summary_lines(report: dict) -> str:
    lines = []
    for label, pair in report["pairs"].items():
        rate = pair["win_rate_non_tied"]
        lines.append(
            f"{label}: tuned wins {pair['wins']}, ties {pair['ties']}, loses {pair['losses']} "
            f"(win rate of non-tied {'n/a' if rate is None else f'{rate:.0%}'}); mean rubric score "
            f"base {pair['mean_score']['base']:.3f} -> tuned {pair['mean_score']['tuned']:.3f}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def domain_markdown(report: dict) -> str:
    lines = [
        f"# Domain evaluation: {report['prompts']} prompts on {report['run_dir']}",
        "",
        f"Greedy decoding, max {report['decoding']['max_new_tokens']} new tokens, repetition penalty "
        f"{report['decoding']['repetition_penalty']}. Rubric: tunelab.eval.rubric (form, not facts).",
        "",
        "| pair | base | tuned | wins | ties | losses | win rate (non-tied) | mean score base | mean score tuned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, pair in report["pairs"].items():
        lines.append(
            f"| {label} | {Path(pair['base']).name} | {Path(pair['tuned']).name} | {pair['wins']} | {pair['ties']} | "
            f"{pair['losses']} | {_fmt(pair['win_rate_non_tied'])} | {_fmt(pair['mean_score']['base'])} | "
            f"{_fmt(pair['mean_score']['tuned'])} |"
        )
        if "judge" in pair:
            judge = pair["judge"]
            lines.append(
                f"| {label}, judge {Path(judge['model']).name} | | | {judge['wins']} | {judge['ties']} | {judge['losses']} | "
                f"{_fmt(judge['win_rate_non_tied'])} | | |"
            )
    for label, pair in report["pairs"].items():
        lines += ["", f"## Mean score per criterion ({label})", "", "| criterion | base | tuned |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(v['base'])} | {_fmt(v['tuned'])} |" for name, v in pair["criteria"].items()]
        lines += ["", f"## Answers ({label})", ""]
        for i, row in enumerate(pair["answers"], 1):
            lines += [f"### {i}. {row['outcome']}: {row['prompt']}", ""]
            for side in ("base", "tuned"):
                answer = row[side]
                ending = {True: "end-of-turn", False: "length limit", None: "?"}[answer["finished"]]
                lines += [f"**{side}** (score {answer['score']:.2f}, {ending}):", "", _quoted(answer["text"]), ""]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text or "(empty)").splitlines())
