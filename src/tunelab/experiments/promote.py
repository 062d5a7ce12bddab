"""`tunelab promote CANDIDATE --over CURRENT`: measure both models, write a decision report, promote only on pass.

Checks (each is a row of the report; one that cannot be measured says why and is not a gate this time):
- val_loss:   held-out loss of both adapters on the CURRENT run's held-out split (the trainer's own assistant-token
              loss, train/heldout.heldout_loss): the candidate must not forget what the current model does well.
              Gate: candidate <= current x (1 + promote.max_val_loss_regression).
- regression: the feedback regression set (`tunelab feedback export DB --format evalset`): for every prompt with a
              reference answer (a better answer or a side-by-side winner), which model gives the reference the
              higher log-probability per token. Win rate = (wins + ties/2) / prompts. Gate: >= min_regression_win_rate.
- rubric:     the travel rubric (eval/rubric.py + eval/domain.py) on the first promote.rubric_prompts shipped
              travel prompts, current vs candidate q4_k_m exports (two runs exported with --adapter-gguf from one
              base: both adapters on that base in one llama-server), the greedy answer and promote.rubric_samples
              sampled ones per prompt; per prompt win/tie/loss on the mean rubric score. Gate: the lower end of the
              95 % bootstrap interval of the win rate among non-tied prompts >= min_rubric_win_rate (eval/stats.py).
- latency:    decode tokens/s of both q4_k_m exports (RUN/export/model-q4_k_m.gguf, or the .gguf given), measured by
              the inference benchmark's function in child processes. Gate: drop <= max_latency_regression.
Run folders must share the base model for val_loss / regression (one base in memory, two adapters on it).
Gates come from the candidate's config (`promote:` section; defaults for a .gguf) plus `--set promote.KEY=VALUE`.

Promotion writes the report, then points `SERVE_DIR/current.json` at the candidate (serve/pointer.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.config import PromoteConfig
from tunelab.errors import UserError
from tunelab.experiments.travel_eval import SHIPPED_QUANT, tuned_gguf_path


@dataclass
class Check:
    name: str
    current: float | None
    candidate: float | None
    gate: str  # the rule, in words
    passed: bool | None  # None: not measured (see note), not a gate this time
    note: str = ""


@dataclass
class Decision:
    candidate: str
    current: str
    checks: list[Check]
    promote: bool
    reason: str
    gates: dict[str, Any]
    decided_at: str


# ---------------------------------------------------------------------------------- the models
def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def shipped_gguf(model: Path) -> Path | None:
    """The q4_k_m file this model ships as (what the app and the Space serve), if there is one."""
    if is_gguf(model):
        return model
    path = tuned_gguf_path(model)
    return path if path.is_file() else None


def served_run(serve_dir: Path) -> Path:
    """What SERVE_DIR serves now, as the run folder behind it when it is a run's q4_k_m export (scorable)."""
    from tunelab.models.runs import is_run_dir
    from tunelab.serve.pointer import read_pointer, resolve_model

    read_pointer(serve_dir)
    model = resolve_model(serve_dir)
    if is_gguf(model) and model.parent.name == "export" and is_run_dir(model.parent.parent):
        return model.parent.parent
    return model


def check_model(path: Path, flag: str) -> Path:
    from tunelab.models.runs import is_run_dir

    path = Path(path).expanduser()
    if not (is_gguf(path) or is_run_dir(path)):
        raise UserError(f"{flag} {path}: not a run folder (adapter/ + config.yaml) or a .gguf file")
    return path


def gates_for(candidate: Path, overrides: list[str]) -> PromoteConfig:
    from tunelab.config import apply_overrides, config_from_dict
    from tunelab.models.runs import run_config

    raw = run_config(candidate).model_dump(mode="json") if not is_gguf(candidate) else {}
    if overrides:
        bad = [o for o in overrides if not o.startswith("promote.")]
        if bad:
            raise UserError(f"--set {bad[0]}: tunelab promote takes only promote.* keys")
        raw = apply_overrides(
            {**raw, "promote": raw.get("promote") or PromoteConfig().model_dump(mode="json")}, overrides
        )
    return config_from_dict(raw, str(candidate)).promote


# ------------------------------------------------------------------------------ the measurements
def nll_per_row(model, rows, pad_id, precision) -> list[float]:
    """Mean negative log-likelihood per assistant token of each (input_ids, labels) row."""
    import torch

    from tunelab.train.heldout import heldout_loss

    return [heldout_loss(model, [row], 1, False, pad_id, precision, torch.device("cpu")) for row in rows]


def reference_rows(tokenizer, records: list[dict], max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Each regression prompt's conversation + its reference answer, tokenised with assistant-only labels."""
    from tunelab.data.masking import Encoded, encode_conversations

    conversations = [[*r["messages"], {"role": "assistant", "content": r["reference"]}] for r in records]
    encoded, _ = encode_conversations(
        tokenizer, conversations, [f"evalset:{i}" for i in range(len(records))], max_seq_len, "truncate"
    )
    return [(e.input_ids, e.labels) for e in encoded if isinstance(e, Encoded) and any(x != -100 for x in e.labels)]


def adapter_checks(candidate: Path, current: Path, gates: PromoteConfig, evalset: Path | None, log) -> list[Check]:
    """val_loss and regression: one base model, the two adapters switched on it."""
    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.models.runs import load_run_model, run_config
    from tunelab.serve.evalset import read_evalset
    from tunelab.train.heldout import heldout_loss_per_adapter, per_adapter
    from tunelab.train.precision import Precision, precision_for_this_machine
    from tunelab.train.recipe import rows_of

    cand_cfg, cur_cfg = run_config(candidate), run_config(current)
    if cand_cfg.model.name != cur_cfg.model.name:
        note = f"different base models ({cur_cfg.model.name} vs {cand_cfg.model.name})"
        return [_unmeasured("val_loss", note), _unmeasured("regression", note)]
    precision = precision_for_this_machine(cur_cfg.train.precision, "cpu")
    if cur_cfg.model.load_in_4bit or cur_cfg.model.load_in_8bit:
        precision = Precision("fp32", "QLoRA run on a CPU: its base is reloaded unquantised in fp32")
    # One base in memory: the current run's adapter is "default", the candidate's is loaded next to it.
    model, tokenizer = load_run_model(current, dtype=precision.dtype, cfg=cur_cfg)
    model.load_adapter(str(candidate / "adapter"), adapter_name="candidate")
    model.eval()
    pad_id = tokenizer.pad_token_id
    adapters = {"current": "default", "candidate": "candidate"}

    def each_adapter(measure: Callable[[], Any]) -> dict[str, Any]:
        return per_adapter(model, adapters, measure)

    log(f"val loss: scoring both adapters on {current}'s held-out split")
    _, val_set = load_prepared(prepare_dataset(cur_cfg))
    val_rows = rows_of(val_set)[: gates.max_val_rows or None]
    losses = heldout_loss_per_adapter(
        model, val_rows, adapters, batch_size=cur_cfg.eval.batch_size, pad_id=pad_id, precision=precision, device=_cpu()
    )
    limit = losses["current"] * (1 + gates.max_val_loss_regression)
    checks = [Check(
        "val_loss", losses["current"], losses["candidate"],
        f"candidate <= current x {1 + gates.max_val_loss_regression:g}",
        losses["candidate"] <= limit, f"{len(val_rows)} held-out rows of the current run",
    )]  # fmt: skip
    checks.append(
        _regression_check(
            evalset,
            read_evalset,
            tokenizer,
            cur_cfg.train.max_seq_len,
            each_adapter,
            model,
            pad_id,
            precision,
            gates,
            log,
        )
    )
    return checks


def _regression_check(
    evalset, read_evalset, tokenizer, max_seq_len, each_adapter, model, pad_id, precision, gates, log
) -> Check:
    if evalset is None:
        return _unmeasured(
            "regression", "no regression set given (--evalset FILE from `tunelab feedback export --format evalset`)"
        )
    frozen = read_evalset(evalset)
    with_reference = [r for r in frozen.records if r.get("reference")]
    rows = reference_rows(tokenizer, with_reference, max_seq_len)
    if not rows:
        return _unmeasured("regression", f"{evalset.name}: no prompt with a reference answer")
    log(f"regression set {frozen.version}: log-prob of {len(rows)} reference answer(s) under both adapters")
    nll = each_adapter(lambda: nll_per_row(model, rows, pad_id, precision))
    wins = sum(c < k for c, k in zip(nll["candidate"], nll["current"]))
    ties = sum(c == k for c, k in zip(nll["candidate"], nll["current"]))
    win_rate = (wins + ties / 2) / len(rows)
    return Check(
        "regression",
        0.5,
        win_rate,
        f"candidate win rate >= {gates.min_regression_win_rate:g}",
        win_rate >= gates.min_regression_win_rate,
        f"evalset {frozen.version}: {wins} wins, {ties} ties, {len(rows) - wins - ties} losses "
        f"over {len(rows)} references"
        f" ({len(frozen.records) - len(with_reference)} prompts without a reference not scored); "
        "current column = chance",
    )


def rubric_check(candidate: Path, current: Path, gates: PromoteConfig, threads: int, log) -> Check:
    """The travel rubric (eval/rubric.py) on the shipped travel prompts, current vs candidate: the greedy answer and
    promote.rubric_samples sampled ones per prompt, with the statistics of eval/stats.py. Two runs exported with
    --adapter-gguf from one base answer from one llama-server (serve/llama_server.adapter_backends); otherwise each
    q4_k_m export is loaded on its own."""
    from tunelab.eval.domain import compare_pair, gguf_generator, sides_fit_side_by_side
    from tunelab.eval.rubric import load_travel_prompts
    from tunelab.eval.stats import describe
    from tunelab.experiments.travel_eval import planner_decoding
    from tunelab.serve.llama_server import adapter_backends

    prompts = load_travel_prompts("travel")[: gates.rubric_prompts]
    decoding = planner_decoding(gates.rubric_max_new_tokens, gates.rubric_samples)  # what users would get
    with contextlib.ExitStack() as stack:
        # Two runs exported with --adapter-gguf from one base: one llama-server, the base once, adapters per request
        models = adapter_backends(stack, [current, candidate], parallel=1, threads=threads, log=log)
        served = "one base GGUF + the two adapter GGUFs on one llama-server" if models else f"{SHIPPED_QUANT} exports"
        if models is None:
            models = [shipped_gguf(current), shipped_gguf(candidate)]
            missing = [name for name, path in zip(("current", "candidate"), models) if path is None]
            if missing:
                return _unmeasured(
                    "rubric",
                    f"no {SHIPPED_QUANT} export for the {' and '.join(missing)} model (run `tunelab export RUN`)",
                )
        # Two files in this process answer side by side when each model's threads fit cores of their own; the
        # server's two adapters share one base model, so they answer one after the other.
        side_by_side = isinstance(models[0], Path) and sides_fit_side_by_side(threads)
        served += f", side by side on {threads} thread(s) each" if side_by_side else ""
        grammar = ", under the day-plan grammar" if decoding.day_grammar else ""
        log(f"rubric: {len(prompts)} travel prompts, current vs candidate ({served}, greedy + {decoding.samples} "
            f"sampled{grammar})")  # fmt: skip
        summary = compare_pair(
            prompts, *(gguf_generator(model, decoding, threads) for model in models),
            log=log, label="rubric", decoding=decoding, side_by_side=side_by_side,
        )  # fmt: skip
    means = summary["mean_score"]
    return Check(
        "rubric",
        means["base"],
        means["tuned"],
        f"lower end of the candidate's 95 % win-rate interval >= {gates.min_rubric_win_rate:g}",
        rubric_passes(summary, gates.min_rubric_win_rate),
        f"{describe(summary)}; over {len(prompts)} shipped travel prompts, {served}{grammar}, {threads} thread(s); "
        "columns = mean rubric score",
    )


def rubric_passes(comparison: dict, min_win_rate: float) -> bool:
    """Whether the lower end of the 95 % interval of the candidate's win rate among non-tied prompts reaches
    `min_win_rate` (eval/stats.paired_comparison): the decision rests on what the prompts can show, not on the
    point estimate. No decided prompt at all shows nothing: not passed."""
    interval = comparison.get("win_rate_interval")
    return interval is not None and interval[0] >= min_win_rate


def latency_check(candidate: Path, current: Path, gates: PromoteConfig, threads: int, log) -> Check:
    from tunelab.bench.infer import run_bench

    files = {"current": shipped_gguf(current), "candidate": shipped_gguf(candidate)}
    missing = [
        f"{name} ({path})" for name, path in (("current", current), ("candidate", candidate)) if files[name] is None
    ]
    if missing:
        return _unmeasured("latency", f"no {SHIPPED_QUANT} export for {', '.join(missing)} (run `tunelab export RUN`)")
    log(f"latency: timing both {SHIPPED_QUANT} exports ({threads} thread(s))")
    report = run_bench(
        [files["current"], files["candidate"]], threads, gates.latency_max_new_tokens, gates.latency_repeats
    )
    rates = [r.get("decode_tok_s") for r in report["results"]]
    if any(not rate for rate in rates):
        return _unmeasured("latency", f"decode speed not measured ({[r.get('error') for r in report['results']]})")
    current_rate, candidate_rate = rates
    floor = current_rate * (1 - gates.max_latency_regression)
    return Check(
        "latency",
        current_rate,
        candidate_rate,
        f"candidate >= current x {1 - gates.max_latency_regression:g}",
        candidate_rate >= floor,
        f"q4_k_m, {threads} thread(s), {gates.latency_max_new_tokens} new tokens",
    )


def _unmeasured(name: str, note: str) -> Check:
    return Check(name, None, None, "-", None, note)


def _cpu():
    import torch

    return torch.device("cpu")


# -------------------------------------------------------------------------------- the decision
def decide(checks: list[Check]) -> tuple[bool, str]:
    failed = [c.name for c in checks if c.passed is False]
    measured = [c for c in checks if c.passed is not None]
    if failed:
        return False, f"gate(s) failed: {', '.join(failed)}"
    if not measured:
        return False, "no gate could be measured"
    return True, f"all {len(measured)} measured gate(s) passed"


def compare(
    candidate: Path, current: Path, gates: PromoteConfig, evalset: Path | None, threads: int, log=print
) -> Decision:
    checks: list[Check] = []
    if is_gguf(candidate) or is_gguf(current):
        note = "needs two run folders (a .gguf has no adapter to score)"
        checks += [_unmeasured("val_loss", note), _unmeasured("regression", note)]
    else:
        checks += adapter_checks(candidate, current, gates, evalset, log)
    checks.append(rubric_check(candidate, current, gates, threads, log))
    checks.append(latency_check(candidate, current, gates, threads, log))
    ok, reason = decide(checks)
    return Decision(
        str(candidate), str(current), checks, ok, reason, gates.model_dump(mode="json"),
        datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip


def report_markdown(decision: Decision) -> str:
    verdict = "PROMOTE" if decision.promote else "KEEP CURRENT"
    lines = [
        f"# Promotion decision: {verdict}",
        "",
        f"- candidate: `{decision.candidate}`",
        f"- current: `{decision.current}`",
        f"- decided: {decision.decided_at}",
        f"- reason: {decision.reason}",
        "",
        "| check | current | candidate | gate | result | note |",
        "|---|---|---|---|---|---|",
    ]
    for c in decision.checks:
        result = {True: "pass", False: "FAIL", None: "not measured"}[c.passed]
        lines.append(f"| {c.name} | {_fmt(c.current)} | {_fmt(c.candidate)} | {c.gate} | {result} | {c.note} |")
    lines += ["", "Gates (`promote:` config):", "", "```json", json.dumps(decision.gates, indent=2), "```", ""]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_report(decision: Decision, out_dir: Path) -> Path:
    from tunelab.io import atomic_write

    stamp = decision.decided_at.replace(":", "").replace("-", "")
    atomic_write(out_dir / f"decision-{stamp}.json", json.dumps(asdict(decision), indent=2, ensure_ascii=False) + "\n")
    return atomic_write(out_dir / f"decision-{stamp}.md", report_markdown(decision))


def promote(
    candidate: Path, current: Path, serve_dir: Path | None = None, overrides: list[str] | None = None,
    evalset: Path | None = None, threads: int = 2, log=print,
) -> Decision:  # fmt: skip
    """Compare, write the report (in SERVE_DIR/decisions, else next to the candidate), and point SERVE_DIR at the
    candidate's shipped model when every measured gate passes."""
    from tunelab.serve.fingerprint import model_fingerprint
    from tunelab.serve.pointer import point_to

    candidate, current = check_model(candidate, "CANDIDATE"), check_model(current, "--over")
    if evalset is not None and not Path(evalset).is_file():
        raise UserError(f"--evalset {evalset}: file not found")
    gates = gates_for(candidate, overrides or [])
    decision = compare(candidate, current, gates, Path(evalset) if evalset else None, threads, log)
    report_dir = (
        (serve_dir / "decisions") if serve_dir else (candidate.parent if is_gguf(candidate) else candidate) / "promote"
    )
    report = write_report(decision, report_dir)
    log(report_markdown(decision))
    log(f"report: {report} (+ .json)")
    if decision.promote and serve_dir is not None:
        served = shipped_gguf(candidate) or candidate
        point_to(serve_dir, served, model_fingerprint(served), report)
        log(f"promoted: {serve_dir / 'current.json'} -> {served}")
    return decision
