"""`tunelab eval RUN --prompts travel|FILE.jsonl`: base vs tuned on travel-planning prompts, judged by the rubric.

Each pair of generators answers every prompt with greedy decoding and, with `Decoding.samples` = k > 0, k more
sampled answers at the app's temperature from fixed seeds (seed, seed + 1, ...):
- "adapter": the run's base model with the LoRA adapter off (base) and on (tuned), in transformers;
- "gguf-q4_k_m": the base exported to q4_k_m GGUF vs the tuned q4_k_m GGUF the app serves, in llama.cpp
  (only when both files are given: RUN/export/model-q4_k_m.gguf and RUN/export/base-q4_k_m.gguf).
A prompt's score on each side is the mean rubric score (tunelab.eval.rubric) of its answers, so one greedy path
that a thread count or a CPU kernel tips one way does not decide the prompt alone. Per prompt the tuned side wins,
ties or loses on that score; per pair the report has the counts, the win rate over non-tied prompts, the mean
score of each criterion, and how sure the comparison is (eval/stats.py: sign test p-value, bootstrap intervals
of the win rate and of the mean score difference, verdict). The thread count, k, the temperature and the seeds
are recorded with it. Everything, answers included, goes to RUN/eval/<name>.json and RUN/eval/<name>.md.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path

from tunelab.eval.rubric import CRITERIA, Answer, TravelPrompt, score_answer
from tunelab.eval.stats import describe, outcome, paired_comparison, sign_test_p, verdict
from tunelab.hardware import usable_cores
from tunelab.models.inference import (
    GenerationParams,
    greedy_reply,
    llama_grammar,
    load_backend,
    open_llama,
    takes_grammar,
)

# generate(prompt, seed): the greedy answer for seed None, else one sampled at Decoding.temperature with that seed.
Generate = Callable[[TravelPrompt, "int | None"], Answer]


@dataclass(frozen=True)
class Decoding:
    """Decoding settings for the domain eval (the same for base and tuned)."""

    max_new_tokens: int = 384
    repetition_penalty: float = 1.0  # 1.0: plain greedy; the app's default is 1.1 (a decoding lever, reported apart)
    # GGUFs only: constrain prompts with a day count to exactly that many "Day n" sections (`plan_grammar`), with
    # the budget of the longest plan it allows. A decoding lever: it fixes structure, not content.
    day_grammar: bool = False
    samples: int = 0  # k sampled answers per prompt and side besides the greedy one (0: greedy only)
    temperature: float = GenerationParams.temperature  # of the sampled answers: the app's
    top_p: float = GenerationParams.top_p
    seed: int = 0  # sampled answer i uses seed + i, on both sides

    def seeds(self) -> list[int | None]:
        """None (the greedy answer), then one seed per sampled answer."""
        return [None, *range(self.seed, self.seed + self.samples)]


# ------------------------------------------------------------------------------------ generators
def adapter_generators(run_dir: Path, decoding: Decoding, threads: int | None = None) -> tuple[Generate, Generate]:
    """(base, tuned) from one transformers load of the run: the base is the same model with its adapter off."""
    backend = load_backend(run_dir, threads=threads)
    model, tokenizer = backend.model, backend.tokenizer

    def generate(prompt: TravelPrompt, seed: int | None, adapter: bool) -> Answer:
        sampling = {} if seed is None else {"seed": seed, "temperature": decoding.temperature, "top_p": decoding.top_p}
        with contextlib.nullcontext() if adapter else model.disable_adapter():
            text, finished = greedy_reply(
                model, tokenizer, [{"role": "user", "content": prompt.prompt}], decoding.max_new_tokens,
                decoding.repetition_penalty, **sampling,
            )  # fmt: skip
        return Answer(text, finished=finished)

    return (lambda prompt, seed: generate(prompt, seed, adapter=False)), (
        lambda prompt, seed: generate(prompt, seed, adapter=True)
    )


def answer_in_llama_cpp(llm, prompt: TravelPrompt, day_grammar: bool, max_new_tokens: int, **sampling) -> Answer:
    """One answer from a llama.cpp model; finished means it stopped at end-of-turn, not at the token limit.

    `llm`: a llama_cpp.Llama in this process, or a model on llama.cpp's server that takes the same
    `create_chat_completion` call with the grammar as GBNF text (`takes_grammar`: serve/llama_server.py).

    day_grammar (and a prompt with a day count): decode under the day-plan grammar with the budget of the longest
    plan it allows, so a constrained plan is never cut; otherwise `max_new_tokens`. The app's Travel Planner decodes
    the same way when its "day-by-day format" box is ticked (serve/handlers.planner_decoding; the grammar reaches
    llama.cpp through the same `llama_grammar`)."""
    from tunelab.eval.plan_grammar import day_plan_grammar, token_budget

    constrained = day_grammar and prompt.days is not None
    gbnf = day_plan_grammar(prompt.days) if constrained else None
    result = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt.prompt}],
        max_tokens=token_budget(prompt.days) if constrained else max_new_tokens,
        grammar=gbnf if takes_grammar(llm) else llama_grammar(gbnf),
        **sampling,
    )
    choice = result["choices"][0]
    return Answer((choice["message"].get("content") or "").strip(), finished=choice.get("finish_reason") == "stop")


def gguf_generator(gguf, decoding: Decoding, threads: int | None = None) -> Generate:
    """Greedy (seed None) or sampled answers from a GGUF file in llama.cpp in this process, or from a model already
    on llama.cpp's server (a LlamaServerBackend: one adapter on a base GGUF shared with other adapters). A file is
    loaded at its first answer, so a side whose answers are all kept (`remembered`) never loads it."""

    @cache
    def model():
        return load_backend(gguf, threads=threads).llm if isinstance(gguf, str | Path) else gguf

    def generate(prompt: TravelPrompt, seed: int | None) -> Answer:
        sampling = (
            {"temperature": 0.0, "seed": 0}
            if seed is None
            else {"temperature": decoding.temperature, "top_p": decoding.top_p, "seed": seed}
        )
        return answer_in_llama_cpp(model(), prompt, decoding.day_grammar, decoding.max_new_tokens,
                                   repeat_penalty=decoding.repetition_penalty, **sampling)  # fmt: skip

    return generate


def remembered(generate: Generate, store: Path, model: Path, decoding: Decoding, threads: int | None) -> Generate:
    """`generate` (answers from the GGUF `model`) with its answers kept in the JSON file `store`, so that a sweep's
    runs of one base model answer the base side once instead of once per run. An answer is reused only for the
    same prompt and seed, the same file (path, size, modification time), decoding, thread count and llama.cpp
    version: llama.cpp repeats its answers exactly under those (docs/experiments.md, "Thread count did not move
    a single answer"), so a reused answer is the one a new call would give."""
    import llama_cpp

    from tunelab.io import atomic_write

    stat = model.stat()
    identity = json.dumps(
        [str(model.resolve()), stat.st_size, stat.st_mtime_ns, asdict(decoding), threads, llama_cpp.__version__]
    )
    kept = json.loads(store.read_text()) if store.is_file() else {}

    def generate_once(prompt: TravelPrompt, seed: int | None) -> Answer:
        key = json.dumps([identity, prompt.prompt, prompt.days, seed])
        if key not in kept:
            answer = generate(prompt, seed)
            kept[key] = {"text": answer.text, "finished": answer.finished}
            atomic_write(store, json.dumps(kept, ensure_ascii=False))
        return Answer(kept[key]["text"], kept[key]["finished"])

    return generate_once


# -------------------------------------------------------------------------------------- compare
def compare_pair(
    prompts: list[TravelPrompt],
    base: Generate,
    tuned: Generate,
    log=print,
    label: str = "",
    decoding: Decoding = Decoding(),
    side_by_side: bool = False,
) -> dict:
    """Answer every prompt on both sides (the greedy answer, then one per sampled seed) and score the answers; a
    prompt's score per side is the mean over its answers. Per-prompt outcome, per-criterion means, statistics.

    side_by_side: answer a prompt's two sides at once, in two Python threads. Only for generators that share no
    model (two llama.cpp models): llama.cpp releases the GIL while it computes, so each side gets its own core."""
    rows = []
    with ThreadPoolExecutor(max_workers=2) if side_by_side else contextlib.nullcontext() as pool:
        answer_sides = pool.map if pool else map
        for i, prompt in enumerate(prompts, 1):
            base_record, tuned_record = answer_sides(partial(_answer_record, prompt, decoding=decoding), (base, tuned))
            rows.append(_prompt_row(prompt, base_record, tuned_record, log, f"{label} {i}/{len(prompts)}"))
    return summarise(rows)


def _prompt_row(prompt: TravelPrompt, base: dict, tuned: dict, log, where: str) -> dict:
    result = outcome(base["score"], tuned["score"])
    log(f"  [{where}] {result:4s} base {base['score']:.2f} tuned {tuned['score']:.2f}  {prompt.prompt[:60]}")
    return {
        "prompt": prompt.prompt,
        "city": prompt.city,
        "days": prompt.days,
        "preferences": list(prompt.preferences),
        "outcome": result,
        "base": base,
        "tuned": tuned,
    }


def sides_fit_side_by_side(threads: int | None) -> bool:
    """Whether two llama.cpp models of `threads` threads each fit this process's cores at once. Never when they
    would share cores: llama.cpp's threads spin while they wait for each other, and two models on the same cores
    slow each other down far more than running them one after the other."""
    return threads is not None and 2 * threads <= usable_cores()


def _answer_record(prompt: TravelPrompt, generate: Generate, decoding: Decoding) -> dict:
    """The greedy answer (text, finished, its own score) and the sampled ones; `score` and `criteria` are the
    means over all of them (a criterion's mean over the answers it judged)."""
    answers = [(seed, generate(prompt, seed)) for seed in decoding.seeds()]
    scored = [score_answer(answer, prompt) for _, answer in answers]
    greedy, greedy_scored = answers[0][1], scored[0]
    return {
        "text": greedy.text,
        "finished": greedy.finished,
        "greedy_score": greedy_scored.score,
        "score": sum(s.score for s in scored) / len(scored),
        "criteria": {name: _mean(s.criteria[name] for s in scored) for name in CRITERIA},
        "samples": [
            {"seed": seed, "text": answer.text, "finished": answer.finished, "score": result.score}
            for (seed, answer), result in zip(answers[1:], scored[1:])
        ],
    }


def summarise(rows: list[dict]) -> dict:
    stats = paired_comparison([r["base"]["score"] for r in rows], [r["tuned"]["score"] for r in rows])
    return {
        **{key: value for key, value in stats.items() if key != "prompts"},
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
    "Which plan answers the request better (right city, right number of days, their interests)? "
    "Reply with one letter: A or B."
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
    return {
        "model": str(judge_gguf),
        **counts,
        "win_rate_non_tied": counts["wins"] / decided if decided else None,
        "sign_test_p": sign_test_p(counts["wins"], counts["losses"]),
        "verdict": verdict(counts["wins"], counts["losses"]),
    }


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
    base_answers: Path | None = None,
) -> dict:
    """Base vs tuned on `prompts`, from the adapter and (when `ggufs` = (base, tuned) is given) the GGUFs;
    `base_answers`: a file that keeps the base GGUF's answers for reuse (`remembered`)."""
    from tunelab.io import atomic_write

    run_dir = Path(run_dir)
    pairs: dict[str, dict] = {}
    side_by_side = sides_fit_side_by_side(threads)  # the GGUF pair only: the adapter pair shares one model
    if adapter:
        log(f"domain eval ({name}, {len(prompts)} prompts): adapter on vs off, {_decodes(decoding)}")
        base, tuned = adapter_generators(run_dir, decoding, threads)
        pairs["adapter"] = {
            "base": "adapter off",
            "tuned": "adapter on",
            **compare_pair(prompts, base, tuned, log, "adapter", decoding),
        }
    if ggufs is not None:
        base_gguf, tuned_gguf = ggufs
        at_once = f", both sides at once on {threads} thread(s) each" if side_by_side else ""
        log(f"domain eval ({name}): {base_gguf.name} vs {tuned_gguf.name} in llama.cpp, {_decodes(decoding)}{at_once}")
        base = gguf_generator(base_gguf, decoding, threads)
        if base_answers is not None:
            base = remembered(base, base_answers, base_gguf, decoding, threads)
        pairs["gguf"] = {
            "base": str(base_gguf),
            "tuned": str(tuned_gguf),
            **compare_pair(
                prompts,
                base,
                gguf_generator(tuned_gguf, decoding, threads),
                log,
                "gguf",
                decoding,
                side_by_side,
            ),
        }
    if judge is not None:
        if not Path(judge).is_file():
            log(f"judge: {judge} not found; skipped")
        else:
            for pair in pairs.values():
                pair["judge"] = judge_pairs(Path(judge), pair["answers"], threads)
    report = {
        "run_dir": str(run_dir),
        "prompts": name,
        "decoding": asdict(decoding),
        "threads": threads,  # None: every core llama.cpp / torch chose to use
        "gguf_sides_at_once": side_by_side and ggufs is not None,
        "pairs": pairs,
    }
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    atomic_write(out / f"{name}.json", json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write(out / f"{name}.md", domain_markdown(report))
    log(summary_lines(report) + f"\nanswers and scores: {out / f'{name}.md'}, {out / f'{name}.json'}")
    return report


def _decodes(decoding: Decoding) -> str:
    text = f"greedy, max {decoding.max_new_tokens} new tokens"
    if decoding.samples:
        text += (
            f" + {decoding.samples} sampled answer(s) per prompt (temperature {decoding.temperature}, top_p "
            f"{decoding.top_p}, seeds {decoding.seed}..{decoding.seed + decoding.samples - 1}); "
            "a prompt scores the mean"
        )
    return text


def summary_lines(report: dict) -> str:
    lines = []
    for label, pair in report["pairs"].items():
        lines.append(
            f"{label}: tuned vs base: {describe(pair)}; mean rubric score "
            f"base {pair['mean_score']['base']:.3f} -> tuned {pair['mean_score']['tuned']:.3f}"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(interval: list[float] | None) -> str:
    return "" if not interval else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def domain_markdown(report: dict) -> str:
    lines = [
        f"# Domain evaluation: {report['prompts']} prompts on {report['run_dir']}",
        "",
        f"Decoding: {_decodes(Decoding(**report['decoding']))}, repetition penalty "
        f"{report['decoding']['repetition_penalty']}; threads {report.get('threads') or 'default'}. "
        "Rubric: tunelab.eval.rubric. Intervals: 95 % bootstrap over prompts (eval/stats.py).",
        "",
        "| pair | base | tuned | wins | ties | losses | win rate (non-tied) [95 % CI] | mean score base | "
        "mean score tuned | difference [95 % CI] | sign test p | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, pair in report["pairs"].items():
        lines.append(
            f"| {label} | {Path(pair['base']).name} | {Path(pair['tuned']).name} | {pair['wins']} | {pair['ties']} | "
            f"{pair['losses']} | {_fmt(pair['win_rate_non_tied'])} {_interval(pair.get('win_rate_interval'))} | "
            f"{_fmt(pair['mean_score']['base'])} | {_fmt(pair['mean_score']['tuned'])} | "
            f"{_fmt(pair.get('mean_difference'))} {_interval(pair.get('mean_difference_interval'))} | "
            f"{_fmt(pair.get('sign_test_p'), 3)} | {pair.get('verdict', '—')} |"
        )
        if "judge" in pair:
            judge = pair["judge"]
            lines.append(
                f"| {label}, judge {Path(judge['model']).name} | | | {judge['wins']} | {judge['ties']} "
                f"| {judge['losses']} | "
                f"{_fmt(judge['win_rate_non_tied'])} | | | | {_fmt(judge.get('sign_test_p'), 3)} | "
                f"{judge.get('verdict', '—')} |"
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
                heading = f"**{side}** (score {answer['score']:.2f}, {ending}):"
                if answer.get("samples"):
                    heading = (
                        f"**{side}** (mean score {answer['score']:.2f} over {1 + len(answer['samples'])} answers; "
                        f"below the greedy one, {answer['greedy_score']:.2f}, {ending}; the others in the .json):"
                    )
                lines += [heading, "", _quoted(answer["text"]), ""]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text or "(empty)").splitlines())
