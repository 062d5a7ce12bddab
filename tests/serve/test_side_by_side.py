"""Side-by-side mode: two answers per prompt (two seeds of one model, or current vs candidate), the pick stored as a
pairwise record naming the model behind each side; the events through the Gradio API; the serve options."""

from __future__ import annotations

import collections
import random

import pytest
from typer.testing import CliRunner

import tunelab.models.inference as backends_module
import tunelab.serve.app as app_module
from tests.helpers import ScriptedBackend, free_port
from tunelab.cli import app as cli_app
from tunelab.serve.app import build_app, launch
from tunelab.serve.feedback_store import FeedbackStore
from tunelab.serve.handlers import ChatApp
from tunelab.serve.pointer import point_to
from tunelab.serve.side_by_side import SideBySide

pytestmark = pytest.mark.timeout(180)


class SeededBackend(ScriptedBackend):
    """Answers with the seed it was given, so two samples are told apart by their text."""

    def stream_chat(self, messages, params=None):
        self.calls.append((messages, params))
        yield f"{self.model_id} answer with seed {params.seed}"


def last(generator):
    tail = collections.deque(generator, maxlen=1)
    return tail[0] if tail else None


@pytest.fixture
def store(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    yield store
    store.close()


def test_two_samples_of_one_model_with_different_seeds(store):
    backend = SeededBackend(model_id="current.gguf")
    sbs = SideBySide(ChatApp(backend, store, model_hash="sha256:cur"))
    update = last(sbs.compare_chat("Where to eat in Porto?", "Be brief.", 0.8, 0.9, 32, []))
    pair = update.pair
    a, b = pair["answers"]
    assert a["params"]["seed"] != b["params"]["seed"]
    assert a["response"] == f"current.gguf answer with seed {a['params']['seed']}" and a["response"] in update.answer_a
    assert (a["model_id"], a["model_hash"], b["model_id"], b["model_hash"]) == ("current.gguf", "sha256:cur") * 2
    assert [m["content"] for m in backend.calls[0][0]] == ["Be brief.", "Where to eat in Porto?"]

    result = sbs.submit_pick("b", ["too long", "bogus"], "B is concrete", pair, "pick-1")
    assert result.status.startswith("✅")
    [row] = store.pairwise_rows()
    assert (row["pick"], row["reasons"], row["comment"], row["answer_b"]) == (
        "b",
        ["too long"],
        "B is concrete",
        b["response"],
    )
    assert (row["params_a"]["seed"], row["params_b"]["seed"]) == (a["params"]["seed"], b["params"]["seed"])
    assert sbs.submit_pick("b", [], "", pair, "pick-1").status == result.status  # a retried submit is stored once
    assert len(store.pairwise_rows()) == 1
    assert "**1** side-by-side pick(s)" in sbs.app.overview().headline


def test_one_model_at_temperature_zero_cannot_give_two_samples(store):
    sbs = SideBySide(ChatApp(SeededBackend(), store))
    assert "temperature above 0" in last(sbs.compare_chat("hi", "", 0.0, 0.9, 32, [])).status


def test_current_vs_candidate_same_seed_and_both_orders(store):
    current, candidate = SeededBackend(model_id="current.gguf"), SeededBackend(model_id="candidate.gguf")
    sbs = SideBySide(ChatApp(current, store, model_hash="sha256:cur"), candidate, "sha256:cand")
    sbs._rng = random.Random(0)  # deterministic draws for the test
    orders = set()
    for _ in range(12):
        a, b = last(sbs.compare_chat("hi", "", 0.7, 0.9, 32, [])).pair["answers"]
        assert a["params"]["seed"] == b["params"]["seed"]
        assert {(a["model_id"], a["model_hash"]), (b["model_id"], b["model_hash"])} == {
            ("current.gguf", "sha256:cur"), ("candidate.gguf", "sha256:cand"),
        }  # fmt: skip
        orders.add(a["model_id"])
    assert orders == {"current.gguf", "candidate.gguf"}  # the left side is not always the current model


def test_planner_pair_and_bad_picks(store):
    sbs = SideBySide(ChatApp(SeededBackend(), store))
    update = last(sbs.compare_plans("Porto", 2, "any time", "mid-range", "balanced", ["food"], "", 0.7, 64))
    assert update.answer_a.startswith("# 2-day plan for Porto") and update.pair["inputs"]["city"] == "Porto"
    assert "no pair" in sbs.submit_pick("a", [], "", None).status
    assert "Pick A, B or both bad" in sbs.submit_pick(None, [], "", update.pair).status
    assert sbs.submit_pick("both_bad", ["incorrect"], "", update.pair).status.startswith("✅")
    assert store.pairwise_rows()[0]["tab"] == "planner"
    assert "city" in last(sbs.compare_plans("", 2, "any time", "mid-range", "balanced", [], "", 0.7, 64)).status


class SeededGrammarBackend(SeededBackend):
    kind = "llama.cpp"
    takes_grammar = True

    def stream_chat(self, messages, params=None, grammar=None):
        self.calls.append((messages, params, grammar))
        yield f"{self.model_id} answer with seed {params.seed}"


def test_planner_pair_with_the_day_format_uses_the_grammar_on_both_sides_or_on_neither(store):
    from tunelab.eval.plan_grammar import day_plan_grammar

    trip = ("Porto", 2, "any time", "mid-range", "balanced", ["food"], "", 0.7, 64)
    current = SeededGrammarBackend(model_id="current.gguf")
    update = last(SideBySide(ChatApp(current, store)).compare_plans(*trip, day_format=True))
    assert [call[2] for call in current.calls] == [day_plan_grammar(2)] * 2 and update.status.startswith("Done")
    assert all(answer["params"]["day_grammar"] for answer in update.pair["answers"])

    candidate = SeededBackend(model_id="candidate")  # cannot take a grammar: neither side gets one (a fair pick)
    current.calls.clear()
    update = last(SideBySide(ChatApp(current, store), candidate).compare_plans(*trip, day_format=True))
    assert [call[2] for call in current.calls] == [None] and len(candidate.calls) == 1
    assert "the scripted backend cannot take a grammar" in update.status and "\n" not in update.status
    assert not any("day_grammar" in answer["params"] for answer in update.pair["answers"])


def test_side_by_side_events_through_the_gradio_api(tmp_path):
    from gradio_client import Client

    demo = build_app(SeededBackend(model_id="current.gguf"), tmp_path / "fb.db", model_hash="sha256:cur",
                     candidate=SeededBackend(model_id="candidate.gguf"), candidate_hash="sha256:cand")  # fmt: skip
    url = launch(demo, port=free_port(), block=False, quiet=True)
    try:
        client = Client(url, verbose=False)
        answer_a, answer_b, status = client.predict("Hello?", "", 0.7, 0.9, 32, api_name="/chat_compare")
        assert "answer with seed" in answer_a and "answer with seed" in answer_b and status.startswith("Done")
        pick_status = client.predict("a", ["too short"], "A wins", "", api_name="/chat_pick")[0]
        assert pick_status.startswith("✅")
        plan_a, plan_b, _ = client.predict(
            "Rome", 2, "any time", "budget", "relaxed", [], "", 0.7, 64, api_name="/plan_compare"
        )
        assert plan_a.startswith("# 2-day plan for Rome")
        assert client.predict("b", [], "", "", api_name="/planner_pick")[0].startswith("✅")
        # the single-answer chat still records which weights answered
        client.predict("Hi", "", 0.7, 0.9, 32, api_name="/chat")
        assert client.predict("up", [], "", "", "", api_name="/chat_feedback")[0].startswith("✅")
    finally:
        demo.close()
    rows = FeedbackStore(tmp_path / "fb.db").pairwise_rows()
    picked = rows[0]["answer_a"] if rows[0]["pick"] == "a" else rows[0]["answer_b"]
    assert [r["pick"] for r in rows] == ["a", "b"] and picked == answer_a
    assert {rows[0]["model_a_id"], rows[0]["model_b_id"]} == {"current.gguf", "candidate.gguf"}
    [thumb] = FeedbackStore(tmp_path / "fb.db").rows()
    assert (thumb["model_id"], thumb["model_hash"]) == ("current.gguf", "sha256:cur")


def test_serve_options_candidate_side_by_side_and_pointer(monkeypatch, tmp_path):
    seen: dict = {}
    monkeypatch.setattr(backends_module, "load_backend", lambda path, threads=None: ScriptedBackend(model_id=path.name))
    monkeypatch.setattr(
        app_module, "build_app", lambda backend, db, **kw: seen.update(backend=backend, **kw) or object()
    )
    monkeypatch.setattr(app_module, "launch", lambda demo, **kw: None)
    current, candidate = tmp_path / "current.gguf", tmp_path / "candidate.gguf"
    current.write_bytes(b"GGUF current")
    candidate.write_bytes(b"GGUF candidate")
    serve_dir = tmp_path / "serve"
    point_to(serve_dir, current, None, None)
    result = CliRunner().invoke(cli_app, [
        "serve", str(serve_dir), "--candidate", str(candidate), "--side-by-side",
        "--feedback-db", str(tmp_path / "fb.db"), "--engine", "llama-cpp-python",  # the faked in-process backend
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["backend"].model_id == "current.gguf" and seen["candidate"].model_id == "candidate.gguf"
    assert seen["side_by_side"] is True
    import hashlib

    assert seen["model_hash"] == "sha256:" + hashlib.sha256(b"GGUF current").hexdigest()
    assert seen["candidate_hash"] == "sha256:" + hashlib.sha256(b"GGUF candidate").hexdigest()
