"""`tunelab bench serve`: N concurrent users against the Gradio app (a real `tunelab serve` subprocess on loopback).

After one warm-up chat and plan (not counted), each user is its own gradio_client session and runs a bounded
loop: a chat message and a travel plan, each followed by a feedback submission with a unique submission_id.
Reported: time to first token (TTFT, from submit to the first non-empty answer, so it includes the wait in
Gradio's queue: what a user feels), decode tokens/s per answer and in total, errors, and whether every
submitted feedback row is in the SQLite file.

Queue behaviour (serve/app.py): every model event shares one concurrency group, of size 1 for llama.cpp in the
app's process (not thread-safe: answers one at a time, first come first served, a waiting page shows its place
in the queue) and of the slot count for llama-server (`--engine`, `--parallel`: that many decoded together);
feedback events run beside them (limit 8). The queue holds at most 128 waiting events (`demo.queue(max_size=128)`,
all event types together); past that Gradio refuses a new event at once (gradio/queueing.py `push`: "queue_full",
HTTP 503): the browser shows "This application is currently busy. Please try again." on that output and
gradio_client raises QueueError("Queue is full! Please try again."). Nothing already queued is dropped, and the
user's typed input stays in the page.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import UserError

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me one tip for learning Python.",
    "Name three fruits.",
    "How do I boil an egg?",
)
CITIES = ("Paris", "Rome", "Lisbon", "Kyoto", "Berlin")


@dataclass
class Answer:
    tab: str
    user: int
    ttft_s: float
    total_s: float
    submission_id: str
    tokens: int = 0  # filled from the stored response (exact model output) after the run


@dataclass
class LoadResult:
    users: int
    rounds: int
    max_new_tokens: int
    threads: int
    wall_s: float
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    feedback_submitted: int = 0
    feedback_stored: int = 0
    skipped_by_deadline: int = 0
    unit: str = "tok"  # "words" for a folder model (no GGUF vocabulary to count tokens with)
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-min load at start and end: the machine may be shared
    engine: str = "auto"  # `tunelab serve --engine` for a GGUF
    parallel: int | None = None  # `tunelab serve --parallel` (llama-server slots); None: the engine's default
    slots: int | None = None  # the slots the app's llama-server ran with (its log); None: no llama-server

    def summary(self) -> dict:
        ttft = sorted(a.ttft_s for a in self.answers)
        rates = sorted(a.tokens / (a.total_s - a.ttft_s) for a in self.answers if a.total_s > a.ttft_s and a.tokens)
        tokens = sum(a.tokens for a in self.answers)
        return {
            "answers": len(self.answers),
            "errors": len(self.errors),
            "feedback_submitted": self.feedback_submitted,
            "feedback_stored": self.feedback_stored,
            "skipped_by_deadline": self.skipped_by_deadline,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p95_s": percentile(ttft, 95),
            "decode_tok_s_p50": percentile(rates, 50),
            "decode_tok_s_p5": percentile(rates, 5),
            "total_tokens": tokens,
            "aggregate_tok_s": tokens / self.wall_s if self.wall_s else 0.0,
            "wall_s": self.wall_s,
            "load_average_start_end": self.load_average,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every reported value is a measured one)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


# ------------------------------------------------------------------------------------- the server
def start_app(
    model: Path, db: Path, port: int, threads: int, workdir: Path, engine: str = "auto", parallel: int | None = None
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", str(model), "--port", str(port), "--feedback-db", str(db),
           "--threads", str(threads), "--engine", engine]  # fmt: skip
    if parallel is not None:
        cmd += ["--parallel", str(parallel)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(workdir)}
    log = (workdir / "server.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the app exited with code {proc.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise UserError(f"the app did not answer on {url} within {timeout_s:.0f} s")


def stop_app(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: only the app and its children
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------- the users
def timed_stream(job, answer_of) -> tuple[float, float, tuple]:
    """(seconds to the first non-empty answer, seconds to the end, final outputs) of a gradio_client job."""
    start = time.monotonic()
    first = None
    for outputs in job:
        if first is None and answer_of(outputs):
            first = time.monotonic() - start
    final = job.result()  # the last output; raises what the server reported (e.g. a refused input, queue full)
    total = time.monotonic() - start
    return (first if first is not None else total), total, final


def chat_text(outputs) -> str:
    chatbot = outputs[0] if outputs else None
    for message in reversed(chatbot or []):
        if message.get("role") == "assistant":
            content = message.get("content")
            return content if isinstance(content, str) else "".join(p.get("text", "") for p in content or [])
    return ""


def plan_text(outputs) -> str:
    """The plan's model text: the output starts with its "# N-day plan" title before any token arrives."""
    markdown = str(outputs[0]) if outputs else ""
    return markdown.split("\n\n", 1)[1].strip() if "\n\n" in markdown else ""


def run_user(url: str, user: int, rounds: int, max_new_tokens: int, temperature: float, deadline: float,
             result: LoadResult, lock) -> None:  # fmt: skip
    from gradio_client import Client

    client = Client(url, verbose=False)
    for round_ in range(rounds):
        for tab in ("chat", "planner"):
            if time.monotonic() > deadline:
                with lock:
                    result.skipped_by_deadline += 1
                continue
            try:
                answer = one_answer(client, tab, user, round_, max_new_tokens, temperature)
                status = client.predict("up", [], f"load user {user} round {round_}", "", answer.submission_id,
                                        api_name=f"/{tab}_feedback")[0]  # fmt: skip
                with lock:
                    result.feedback_submitted += 1
                if not status.startswith("✅"):
                    raise RuntimeError(f"feedback not saved: {status}")
                with lock:
                    result.answers.append(answer)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, none stops the run
                with lock:
                    result.errors.append(f"user {user} {tab} round {round_}: {type(exc).__name__}: {exc}")


def one_answer(client, tab: str, user: int, round_: int, max_new_tokens: int, temperature: float) -> Answer:
    if tab == "chat":
        prompt = CHAT_PROMPTS[(user + round_) % len(CHAT_PROMPTS)]
        job = client.submit(prompt, "Answer briefly.", temperature, 0.9, max_new_tokens, api_name="/chat")
        ttft, total, final = timed_stream(job, chat_text)
    else:
        city = CITIES[(user + round_) % len(CITIES)]
        # The day-by-day box unticked: every plan is bounded by --max-new-tokens, as the bench's figures assume
        # (under the grammar a plan takes the budget of the longest plan the format allows).
        job = client.submit(city, 2, "spring", "mid-range", "balanced", ["food"], "", temperature, max_new_tokens,
                            False, api_name="/plan")  # fmt: skip
        ttft, total, final = timed_stream(job, plan_text)
    status = final[-1] if final else ""  # both tabs end their outputs with the status line
    if not str(status).startswith("Done"):
        raise RuntimeError(f"{tab} answer did not finish: {status!r}")
    return Answer(tab, user, ttft, total, submission_id=f"load-{uuid.uuid4().hex}")


def warm_up(url: str, max_new_tokens: int) -> None:
    """One chat and one plan before the clock starts: the first answers page the GGUF in from disk and warm
    Gradio up (tens of seconds on a busy machine), which is start-up cost, not serving cost. No feedback."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    for tab in ("chat", "planner"):
        one_answer(client, tab, user=0, round_=0, max_new_tokens=max_new_tokens, temperature=0.0)


# --------------------------------------------------------------------------------------- the run
def run_serve_load(
    model: Path, *, users: int = 20, rounds: int = 1, max_new_tokens: int = 32, threads: int = 2,
    temperature: float = 0.7, time_limit_s: float = 900, startup_timeout_s: float = 300, workdir: Path | None = None,
    engine: str = "auto", parallel: int | None = None,
) -> LoadResult:  # fmt: skip
    if not model.exists():
        raise UserError(f"{model}: model not found")
    if parallel is not None and parallel < 1:
        raise UserError(f"--parallel: must be >= 1 (got {parallel})")
    if users < 1 or rounds < 1:
        raise UserError("--users and --rounds: must be >= 1")
    if not 16 <= max_new_tokens <= 1024:
        raise UserError(f"--max-new-tokens: the app accepts 16..1024 for the planner (got {max_new_tokens})")
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="tunelab-bench-serve-")
        if workdir is None
        else nullcontext(workdir) as folder
    ):
        folder = Path(folder)
        db, port = folder / "feedback.db", free_port()
        proc = start_app(model, db, port, threads, folder, engine, parallel)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_until_up(url, proc, startup_timeout_s)
            warm_up(url, max_new_tokens)
            result = LoadResult(users, rounds, max_new_tokens, threads, wall_s=0.0, engine=engine, parallel=parallel)
            lock = threading.Lock()
            load_start = os.getloadavg()[0]
            start = time.monotonic()
            deadline = start + time_limit_s
            workers = [
                threading.Thread(
                    target=run_user, args=(url, u, rounds, max_new_tokens, temperature, deadline, result, lock)
                )
                for u in range(users)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            result.wall_s = time.monotonic() - start
            result.load_average = (load_start, os.getloadavg()[0])
        finally:
            stop_app(proc)
        result.slots = logged_slots((folder / "server.log").read_text(errors="replace"))
        check_feedback_rows(db, result, model)
    return result


def logged_slots(app_log: str) -> int | None:
    """The slot count of the app's llama-server, from the line `tunelab serve` prints when it starts one."""
    found = re.search(r"llama-server: (\d+) slots", app_log)
    return int(found.group(1)) if found else None


def check_feedback_rows(db: Path, result: LoadResult, model: Path) -> None:
    """Count the stored rows of this run and fill each answer's token count from its stored response."""
    from llama_cpp import Llama

    conn = sqlite3.connect(db)
    try:
        stored = dict(conn.execute("SELECT submission_id, response FROM feedback WHERE submission_id LIKE 'load-%'"))
    finally:
        conn.close()
    result.feedback_stored = len(stored)
    missing = [a.submission_id for a in result.answers if a.submission_id not in stored]
    if missing:
        result.errors.append(f"{len(missing)} feedback row(s) confirmed to the user but missing from the database")
    vocab = Llama(model_path=str(model), vocab_only=True, verbose=False) if model.suffix == ".gguf" else None
    for answer in result.answers:
        text = stored.get(answer.submission_id, "")
        if vocab is not None:
            answer.tokens = len(vocab.tokenize(text.encode(), add_bos=False, special=False))
        else:
            answer.tokens = len(text.split())  # a folder model: words, labelled as such in the report
            result.unit = "words"


def report(result: LoadResult) -> str:
    s, unit = result.summary(), result.unit
    return "\n".join([
        f"engine {result.engine} ({result.slots or 'no'} llama-server slots): "
        f"users {result.users} x rounds {result.rounds} x (chat + planner), "
        f"max_new_tokens {result.max_new_tokens}, app threads {result.threads}; "
        f"1-min load average {result.load_average[0]:.1f} -> {result.load_average[1]:.1f}",
        f"| answers | errors | feedback submitted / stored | TTFT p50 s | TTFT p95 s | decode {unit}/s p50 "
        f"| decode {unit}/s p5 | aggregate {unit}/s | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['answers']} | {s['errors']} | {s['feedback_submitted']} / {s['feedback_stored']} "
        f"| {s['ttft_p50_s']:.2f} | {s['ttft_p95_s']:.2f} | {s['decode_tok_s_p50']:.1f} | {s['decode_tok_s_p5']:.1f} "
        f"| {s['aggregate_tok_s']:.1f} | {s['wall_s']:.1f} |",
    ])  # fmt: skip


def engine_ratios(runs: dict[str, dict[str, dict]], baseline: str, candidate: str) -> dict[str, float]:
    """candidate / baseline for the crowd's aggregate rate and TTFT p95 and the lone user's decode rate."""
    crowd_b, crowd_c = runs[baseline]["crowd"], runs[candidate]["crowd"]
    alone_b, alone_c = runs[baseline]["single_user"], runs[candidate]["single_user"]
    return {
        "aggregate_tok_s": crowd_c["aggregate_tok_s"] / crowd_b["aggregate_tok_s"],
        "ttft_p95_s": crowd_c["ttft_p95_s"] / crowd_b["ttft_p95_s"],
        "single_user_decode_tok_s": alone_c["decode_tok_s_p50"] / alone_b["decode_tok_s_p50"],
    }


def bench_serve_cmd(
    model: Annotated[Path, typer.Argument(help="A .gguf file (or a run/merged folder: rates in words/s) for the app.")],
    users: Annotated[int, typer.Option(help="Concurrent users (each its own session).")] = 20,
    rounds: Annotated[int, typer.Option(help="Chat + planner rounds per user (the loop bound).")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 32,
    threads: Annotated[int, typer.Option(help="llama.cpp threads in the app.")] = 2,
    time_limit: Annotated[float, typer.Option(help="Seconds after which users start no new request.")] = 900,
    engines: Annotated[
        str,
        typer.Option(
            help="Comma-separated `tunelab serve --engine` values, each measured with the crowd and with one "
            "user, in this order (the first is the baseline of the ratios)."
        ),
    ] = "auto",
    parallel: Annotated[
        int | None,
        typer.Option(help="`tunelab serve --parallel`: llama-server slots (default: the engine's, 4 per core, <= 16)."),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the results as JSON here.")] = None,
) -> None:
    """N concurrent users (chat + planner) against the app: TTFT p50/p95, tokens/s, errors, feedback rows kept."""
    from tunelab.bench.commands import write_results
    from tunelab.bench.machine import run_header

    names = [e.strip() for e in engines.split(",") if e.strip()]
    if not names:
        raise UserError("--engines: name at least one engine")
    results: list[LoadResult] = []
    runs: dict[str, dict[str, dict]] = {}
    for engine in names:
        crowd = run_serve_load(model, users=users, rounds=rounds, max_new_tokens=max_new_tokens, threads=threads,
                               time_limit_s=time_limit, engine=engine, parallel=parallel)  # fmt: skip
        results.append(crowd)
        runs[engine] = {"crowd": crowd.summary()}
        if len(names) > 1:
            alone = run_serve_load(model, users=1, rounds=rounds, max_new_tokens=max_new_tokens, threads=threads,
                                   time_limit_s=time_limit, engine=engine, parallel=parallel)  # fmt: skip
            results.append(alone)
            runs[engine]["single_user"] = alone.summary()
    ratios = {e: engine_ratios(runs, names[0], e) for e in names[1:]}
    payload = {**run_header(threads=threads), "model": str(model), "parallel": parallel, "engines": runs,
               "ratios_vs_first": ratios, "results": [asdict(r) for r in results]}  # fmt: skip
    write_results(output, payload)
    typer.echo(f"model: {model.name}")
    for result in results:
        typer.echo(report(result))
    for engine, ratio in ratios.items():
        typer.echo(
            f"{engine} / {names[0]}: aggregate {ratio['aggregate_tok_s']:.2f}x, TTFT p95 {ratio['ttft_p95_s']:.2f}x, "
            f"single-user decode {ratio['single_user_decode_tok_s']:.2f}x"
        )
    errors = [e for r in results for e in r.errors]
    for error in errors[:20]:
        typer.echo(f"error: {error}", err=True)
    if errors or any(r.feedback_stored != r.feedback_submitted for r in results):
        raise typer.Exit(1)
