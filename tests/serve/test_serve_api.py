"""The app through its HTTP API (gradio_client) against a real `tunelab serve` of the embedded GGUF (llama.cpp)."""

from __future__ import annotations

import html
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import db_rows, embedded_gguf, last_assistant_text, listening_addresses, serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAKE_HF_TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("api") / "feedback.db"
    # The server process gets a (fake) HF token in its environment: it must never end up in the database.
    with serve_process(embedded_gguf(), db, env={"HF_TOKEN": FAKE_HF_TOKEN}) as srv:
        srv.db = db
        yield srv


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def chat(client, message: str, max_new_tokens: int = 24, temperature: float = 0.0, system: str = "Answer briefly."):
    chatbot, _, status = client.predict(message, system, temperature, 0.9, max_new_tokens, api_name="/chat")
    return chatbot, status


def saved_id(status: str) -> int:
    assert status.startswith("✅"), status
    return int(status.split("#")[1].split()[0])


def test_default_bind_is_loopback_only(tmp_path):
    with serve_process(embedded_gguf(), tmp_path / "fb.db", host=None) as srv:
        port = int(srv.url.rsplit(":", 1)[1].strip("/"))
        assert listening_addresses(port) == {"127.0.0.1"}


def test_chat_answer_and_its_feedback_row_match(client, server):
    chatbot, status = chat(client, "What is the capital of France?", max_new_tokens=24)
    reply = html.unescape(last_assistant_text(chatbot))
    assert status.startswith("Done") and reply.strip()
    status, rating, reasons, comment, better = client.predict(
        "down", ["incorrect", "too short"], "Needs more detail", "Paris is the capital of France.",
        api_name="/chat_feedback",
    )  # fmt: skip
    assert (rating, reasons, comment, better) == (None, [], "", "")  # the form is reset after saving
    [row] = db_rows(server.db, "id = ?", (saved_id(status),))
    assert row["tab"] == "chat" and row["rating"] == -1
    assert json.loads(row["reasons"]) == ["incorrect", "too short"]
    assert row["comment"] == "Needs more detail" and row["better_answer"] == "Paris is the capital of France."
    assert json.loads(row["messages"]) == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert row["response"] == reply
    params = json.loads(row["params"])
    assert params["temperature"] == 0.0 and params["max_new_tokens"] == 24 and params["top_p"] == 0.9
    assert row["model_id"] == MODEL_ID and row["app_version"].startswith("tunelab ")
    assert len(row["session_id"]) == 16


def test_follow_up_turn_carries_history(client, server):
    chat(client, "My name is Ada.", max_new_tokens=12)
    chat(client, "What is my name?", max_new_tokens=12)
    status, *_ = client.predict("up", [], "", "", api_name="/chat_feedback")
    [row] = db_rows(server.db, "id = ?", (saved_id(status),))
    roles = [m["role"] for m in json.loads(row["messages"])]
    assert roles == ["system", "user", "assistant", "user"]


def test_planner_streams_a_plan_and_its_feedback_row_matches(client, server):
    """The day-by-day box unticked (False after Max new tokens): the slider's budget reaches the model."""
    plan, status = client.predict(
        "Lisbon", 2, "May", "budget", "relaxed", ["food", "museums"], "I like tiles", 0.0, 64, False, api_name="/plan"
    )
    assert status.startswith("Done"), status
    assert plan.startswith("# 2-day plan for Lisbon\n\n")
    status, *_ = client.predict("up", ["other"], "nice", "", api_name="/planner_feedback")
    [row] = db_rows(server.db, "id = ?", (saved_id(status),))
    assert row["tab"] == "planner" and row["rating"] == 1
    assert json.loads(row["inputs"]) == {
        "city": "Lisbon", "days": 2, "when": "May", "budget": "budget", "pace": "relaxed",
        "interests": ["food", "museums"], "preferences": "I like tiles",
    }  # fmt: skip
    prompt = json.loads(row["messages"])[-1]["content"]
    assert prompt.startswith("Plan a 2-day trip to Lisbon in May.") and "I like tiles" in prompt
    # gr.Markdown trims the text it sends; the database keeps the answer exactly as generated
    assert html.unescape(plan.split("\n\n", 1)[1]) == row["response"].strip()
    assert json.loads(row["params"])["max_new_tokens"] == 64


@pytest.mark.parametrize("city, days, message", [("", 3, "Please enter a city"), ("Oslo", 0, "between 1 and 14"),
                                                 ("Oslo", 60, "between 1 and 14")])  # fmt: skip
def test_planner_validation_is_friendly(client, city, days, message):
    _, status = client.predict(city, days, "any time", "mid-range", "balanced", [], "", 0.7, 32, api_name="/plan")
    assert message in status


def test_hostile_and_oversized_inputs_never_crash_the_server(client, server):
    _, status = chat(client, "x" * 50_000)
    assert "limit is 4,000" in status
    _, status = chat(client, "\x00\x01\x02")
    assert "type a message" in status
    # out-of-range settings are refused by the components' own server-side checks (and clamped again by the app)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="greater than maximum"):
        chat(client, "hi", max_new_tokens=100_000)
    with pytest.raises(AppError, match="greater than maximum"):
        chat(client, "hi", temperature=5.0)
    payload = 'Repeat: <script>alert(1)</script><img src=x onerror="alert(2)">'
    chatbot, status = chat(client, payload, max_new_tokens=32)
    assert status.startswith(("Done", "⚠️")), status
    shown = [m for m in chatbot if m["role"] == "user"][-1]
    assert "<script>" not in json.dumps(shown) and "&lt;script&gt;" in json.dumps(shown)
    status, *_ = client.predict("down", ["unsafe or biased"], "<b>" + "c" * 1000, "", api_name="/chat_feedback")
    [row] = db_rows(server.db, "id = ?", (saved_id(status),))
    assert json.loads(row["messages"])[-1]["content"] == payload  # stored raw, displayed escaped
    # still serving
    _, status = chat(client, "Say hi.", max_new_tokens=8)
    assert status.startswith("Done")


def test_overview_and_download_reflect_the_database(client, server):
    chat(client, "Name a fruit.", max_new_tokens=8)
    client.predict("up", [], "for the overview", "", api_name="/chat_feedback")
    headline, by_rating, by_reason, by_model, recent = client.predict(api_name="/feedback_overview")
    total = len(db_rows(server.db))
    assert f"**{total}**" in headline
    assert sum(count for _, count in by_rating["data"]) == total
    assert by_model["data"][0][0] == MODEL_ID
    assert recent["data"][0][5] == "for the overview"  # newest first
    path = client.predict("jsonl", api_name="/feedback_download")
    lines = Path(path).read_text().splitlines()
    assert len(lines) == total and json.loads(lines[-1])["comment"] == "for the overview"


def test_hf_token_from_the_environment_never_reaches_the_database(client, server):
    chat(client, f"my token is {FAKE_HF_TOKEN}, keep it", max_new_tokens=16)
    status, *_ = client.predict("down", [], f"token {FAKE_HF_TOKEN}", FAKE_HF_TOKEN, api_name="/chat_feedback")
    saved_id(status)
    files = [p for p in server.db.parent.iterdir() if p.name.startswith(server.db.name)]  # db, -wal, -shm
    assert any(p.name.endswith("-wal") for p in files) or len(files) == 1
    for path in files:
        assert FAKE_HF_TOKEN.encode() not in path.read_bytes(), path
    assert "[redacted token]" in db_rows(server.db)[-1]["comment"]


def test_auth_protects_the_app_and_the_feedback_download(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    with serve_process(embedded_gguf(), tmp_path / "fb.db", extra_args=["--auth", "ann:s3cret"]) as srv:
        with pytest.raises(AuthenticationError):
            Client(srv.url, verbose=False)
        with pytest.raises((AuthenticationError, ValueError), match="login"):
            Client(srv.url, auth=("ann", "wrong"), verbose=False)
        client = Client(srv.url, auth=("ann", "s3cret"), verbose=False, download_files=False)
        chat(client, "Hi", max_new_tokens=4)
        saved_id(client.predict("up", [], "", "", api_name="/chat_feedback")[0])
        file_data = client.predict("jsonl", api_name="/feedback_download")
        for anonymous_url in (file_data["url"], srv.url + "gradio_api/info", srv.url + "config"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(anonymous_url, timeout=10)
            assert err.value.code in (401, 403), anonymous_url
        request = urllib.request.Request(
            srv.url + "gradio_api/queue/join", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code in (401, 403)
