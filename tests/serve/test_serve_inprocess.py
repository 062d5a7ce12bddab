"""The app served in-process with a scripted backend: Stop, session isolation and the launch defaults (fast)."""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers import GrammarBackend, ScriptedBackend, free_port, listening_addresses, starting_values
from tunelab.serve.app import build_app, launch

pytestmark = pytest.mark.timeout(180)


class SlowBackend(ScriptedBackend):
    """Emits one word every `delay` seconds and counts how many generators were closed."""

    def __init__(self, delay: float = 0.2, words: int = 200):
        super().__init__(reply=" ".join(f"w{i}" for i in range(words)))
        self.delay = delay
        self.closed = threading.Event()
        self.streaming = threading.Event()
        self.few_words_in = threading.Event()  # set after 3 words

    def stream_chat(self, messages, params=None):
        try:
            for i, piece in enumerate(super().stream_chat(messages, params)):
                time.sleep(self.delay)
                self.streaming.set()
                if i == 2:
                    self.few_words_in.set()
                yield piece
        finally:
            self.closed.set()


@pytest.fixture
def served(tmp_path):
    backend = SlowBackend()
    demo = build_app(backend, tmp_path / "fb.db")
    url = launch(demo, port=free_port(), block=False, quiet=True)
    try:
        yield backend, url, demo
    finally:
        demo.close()


def test_launch_binds_loopback_by_default(served):
    _, url, _ = served
    port = int(url.rsplit(":", 1)[1].strip("/"))
    assert listening_addresses(port) == {"127.0.0.1"}
    assert url.startswith("http://127.0.0.1:")


def test_stop_frees_the_model_for_the_next_request(served):
    from gradio_client import Client

    backend, url, _ = served
    client = Client(url, verbose=False)
    job = client.submit("long please", "", 0.5, 0.9, 200, api_name="/chat")
    assert backend.streaming.wait(timeout=60) and backend.few_words_in.wait(timeout=60)
    job.cancel()
    assert backend.closed.wait(timeout=30), "the backend generator was not closed after Stop"
    backend.delay = 0.0
    backend.reply = "short reply"
    _, _, status = client.predict("next", "", 0.5, 0.9, 16, api_name="/chat")
    assert status.startswith("Done")  # the single model slot was released


def test_sessions_do_not_share_conversations(served):
    from gradio_client import Client

    backend, url, demo = served
    backend.delay = 0.0
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    alice.predict("I am Alice", "", 0.5, 0.9, 16, api_name="/chat")
    bob.predict("I am Bob", "", 0.5, 0.9, 16, api_name="/chat")
    status, *_ = bob.predict("up", [], "bob's", "", api_name="/chat_feedback")
    assert status.startswith("✅")
    [row] = demo.tunelab_app.store.rows()
    assert [m["content"] for m in row["messages"]] == ["I am Bob"]
    chatbot, _, _ = alice.predict("again", "", 0.5, 0.9, 16, api_name="/chat")
    assert "Bob" not in str(chatbot) and "I am Alice" in str(chatbot)
    alice.predict("down", [], "alice's", "", api_name="/chat_feedback")
    bob_row, alice_row = demo.tunelab_app.store.rows()
    assert [m["content"] for m in alice_row["messages"]][-1] == "again"
    assert bob_row["session_id"] != alice_row["session_id"]  # anonymous, but one id per browser session


def test_feedback_with_the_same_submission_id_is_stored_once(served):
    from gradio_client import Client

    backend, url, demo = served
    backend.delay = 0.0
    client = Client(url, verbose=False)
    client.predict("hello", "", 0.5, 0.9, 16, api_name="/chat")
    replies = [client.predict("up", [], "once", "", "sub-42", api_name="/chat_feedback")[0] for _ in range(3)]
    assert len(set(replies)) == 1 and replies[0].startswith("✅")
    assert [r["comment"] for r in demo.tunelab_app.store.rows()] == ["once"]
    client.predict("up", [], "no key", "", api_name="/chat_feedback")  # the key is optional
    assert len(demo.tunelab_app.store.rows()) == 2


def test_the_planner_day_format_box_reaches_the_backend_through_the_api(tmp_path):
    """/plan takes the box after Max new tokens; clients that leave it out (9 arguments) get its default: ticked
    for a model that takes a grammar (the app's measured default decoding), unticked for one that cannot."""
    from gradio_client import Client

    from tunelab.eval.plan_grammar import day_plan_grammar

    backend = GrammarBackend()
    demo = build_app(backend, tmp_path / "fb.db")
    url = launch(demo, port=free_port(), block=False, quiet=True)
    try:
        assert starting_values(demo)["planner-day-format"] is True
        client = Client(url, verbose=False)
        trip = ("Porto", 2, "any time", "budget", "relaxed", [], "", 0.0, 16)
        _, status = client.predict(*trip, False, api_name="/plan")
        assert status.startswith("Done") and backend.grammars == [None]
        _, status = client.predict(*trip, api_name="/plan")
        assert status.startswith("Done") and backend.grammars[-1] == day_plan_grammar(2)
        client.predict(*trip[:-2], 0.7, 16, True, api_name="/plan_compare")
        assert backend.grammars[-2:] == [day_plan_grammar(2)] * 2
    finally:
        demo.close()
    without_grammars = build_app(SlowBackend(), tmp_path / "fb2.db")
    try:
        # unticked: no "planned without the day-by-day format" notice on every plan
        assert starting_values(without_grammars)["planner-day-format"] is False
    finally:
        without_grammars.close()


def test_a_taken_port_is_a_user_error(tmp_path):
    import socket

    from tunelab.errors import UserError

    demo = build_app(SlowBackend(), tmp_path / "fb.db")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}"):
            launch(demo, port=port, block=False, quiet=True)
    demo.close()
