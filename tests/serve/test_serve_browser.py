"""The app in a real headless browser (Debian's chromium via Playwright) against the real embedded GGUF.

Chat -> streamed answer -> thumbs-down with a reason -> the DB row; the planner with validation; HTML/JS typed
into prompts, comments and city names shows as text and never runs. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import ARTIFACTS, db_rows, embedded_gguf, serve_process
from tunelab.eval.plan_grammar import token_budget

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
XSS_MESSAGE = 'Hi <img src=x onerror="window.__xss=1"> <b>bold</b> <script>window.__xss=2</script> say hello'
XSS_COMMENT = '<i>too</i> short <img src=z onerror="window.__xss=4">'
XSS_CITY = 'Lisbon <img src=y onerror="window.__xss=3">'


def letters(text: str) -> str:
    return re.sub(r"[^A-Za-z]", "", text)


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: install Debian's chromium (`make browser`)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.dialogs = []
            page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
            yield page
        finally:
            browser.close()


def wait_until_mounted(page, locator) -> None:
    """Wait for a component that a tab or closed accordion kept unmounted, and for Gradio to finish mounting it.

    Gradio mounts what an unselected tab or a closed accordion holds only when it first opens, then, one animation
    frame later, pushes the components' initial values into them once more (`render_previously_invisible_children`).
    A value typed inside that frame is overwritten (CI sent temperature 0.7 after the slider had shown 0; a
    script doing the same reproduces it every time). Two frames and a task later that push is done.
    """
    from playwright.sync_api import expect

    expect(locator).to_be_visible(timeout=30_000)
    page.evaluate(
        "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(done))))"
    )


def set_slider(page, elem_id: str, value: int) -> None:
    """Set a slider through its range input once it is mounted; the DB rows' params prove what the server received."""
    from playwright.sync_api import expect

    slider = page.locator(f"#{elem_id} input[type=range]")
    wait_until_mounted(page, slider)
    slider.fill(str(value))  # sets the value and dispatches input + change at once (no blur to race)
    expect(slider).to_have_value(str(value), timeout=10_000)
    expect(page.locator(f"#{elem_id} input[type=number]")).to_have_value(str(value), timeout=10_000)


def send_feedback(page, tab: str, rating: str, reasons: list[str], comment: str) -> str:
    page.locator(f"#{tab}-rating label", has_text=rating).click()
    for reason in reasons:
        page.locator(f"#{tab}-reasons label", has_text=reason).click()
    page.locator(f"#{tab}-comment textarea").fill(comment)
    page.locator(f"#{tab}-send-feedback").click()
    status = page.locator(f"#{tab}-feedback-status")
    status.get_by_text("saved").wait_for(timeout=30_000)
    return status.inner_text()


def assert_no_script_ran(page) -> None:
    assert page.evaluate("window.__xss") is None
    assert page.dialogs == []


def test_chat_feedback_planner_and_overview_in_a_real_browser(tmp_path, page):
    ARTIFACTS.mkdir(exist_ok=True)
    db = tmp_path / "feedback.db"
    with serve_process(embedded_gguf(), db) as server:
        page.goto(server.url)
        page.locator("#chat-message textarea").wait_for(timeout=60_000)

        # ---- chat: a streamed answer, with HTML/JS in the prompt
        page.get_by_text("Settings").first.click()
        set_slider(page, "chat-temperature", 0)  # greedy: the same answer on every run
        set_slider(page, "chat-max-tokens", 48)
        page.locator("#chat-message textarea").fill(XSS_MESSAGE)
        page.locator("#chat-send").click()
        page.locator("#chat-status").get_by_text("Done").wait_for(timeout=180_000)
        chat_text = page.locator("#chatbot").inner_text()
        assert "<b>bold</b>" in chat_text and "<script>" in chat_text  # shown as text...
        assert page.locator("#chatbot img[src=x]").count() == 0  # ...not turned into elements
        assert page.locator("#chatbot script").count() == 0

        # ---- the thumbs-down under the answer, a reason (and HTML in the comment)
        page.locator('#chatbot button[aria-label="Dislike"]').last.click()
        page.locator("#chat-feedback-status").get_by_text("Rating answer 1").wait_for(timeout=30_000)
        assert page.locator("#chat-rating input[value=down]").is_checked()
        page.locator("#chat-reasons label", has_text="incorrect").click()
        page.locator("#chat-comment textarea").fill(XSS_COMMENT)
        page.locator("#chat-send-feedback").click()
        page.locator("#chat-feedback-status").get_by_text("saved").wait_for(timeout=30_000)
        status = page.locator("#chat-feedback-status").inner_text()
        feedback_id = int(re.search(r"#(\d+)", status).group(1))
        [row] = db_rows(db, "id = ?", (feedback_id,))
        assert row["tab"] == "chat" and row["rating"] == -1
        assert json.loads(row["reasons"]) == ["incorrect"] and row["comment"] == XSS_COMMENT
        assert json.loads(row["messages"])[-1] == {"role": "user", "content": XSS_MESSAGE}
        assert json.loads(row["params"]) == {
            "temperature": 0.0,
            "top_p": 0.9,
            "max_new_tokens": 48,
            "repetition_penalty": 1.1,
            "seed": None,
        }  # what the sliders said
        assert row["response"].strip() and letters(row["response"])[:20] in letters(chat_text)
        assert row["model_id"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
        page.screenshot(path=str(ARTIFACTS / "app-chat.png"), full_page=True)

        # ---- planner: friendly validation, then a streamed plan for a city with HTML in its name
        page.get_by_role("tab", name="Travel Planner").click()
        wait_until_mounted(page, page.locator("#planner-city textarea"))
        page.locator("#planner-city textarea").fill(XSS_CITY)
        page.locator("#planner-days input").fill("60")
        page.locator("#planner-go").click()
        page.locator("#planner-status").get_by_text("between 1 and 14 days").wait_for(timeout=30_000)
        page.locator("#planner-days input").fill("2")
        page.locator("#planner-interests label", has_text="food").click()
        page.locator("#planner-preferences textarea").fill("<script>window.__xss=5</script> vegetarian")
        page.get_by_text("Settings").nth(1).click()
        set_slider(page, "planner-temperature", 0)
        set_slider(page, "planner-max-tokens", 96)
        # a GGUF plans under the day-by-day grammar unless the user unticks it: the box starts ticked
        assert page.locator("#planner-day-format input").is_checked()
        page.locator("#planner-go").click()
        page.locator("#planner-status").get_by_text("Done").wait_for(timeout=180_000)
        heading = page.locator("#planner-plan h1").inner_text()
        assert heading == f"2-day plan for {XSS_CITY}"
        assert page.locator("#planner-plan img").count() == 0
        send_feedback(page, "planner", "👍", [], "nice plan")
        planner_row = db_rows(db, "tab = 'planner'")[-1]
        assert json.loads(planner_row["inputs"])["city"] == XSS_CITY and planner_row["rating"] == 1
        planner_params = json.loads(planner_row["params"])  # what the sliders said, as the server received it
        # under the grammar the plan's budget is the longest plan the format allows, not the slider's
        assert (planner_params["temperature"], planner_params["day_grammar"]) == (0.0, True)
        assert planner_params["max_new_tokens"] == token_budget(2)
        page.screenshot(path=str(ARTIFACTS / "app-planner.png"), full_page=True)

        # ---- overview: counts and the recent comment, as text
        page.get_by_role("tab", name="Feedback overview").click()
        wait_until_mounted(page, page.locator("#feedback-refresh"))
        page.locator("#feedback-refresh").click()
        recent = page.locator("#feedback-recent")
        recent.get_by_text("nice plan").wait_for(timeout=30_000)
        assert "<i>too</i> short" in recent.inner_text()
        assert recent.locator("i", has_text="too").count() == 0
        page.screenshot(path=str(ARTIFACTS / "app-overview.png"), full_page=True)

        assert_no_script_ran(page)
        assert len(db_rows(db)) == 2
    shutil.copy(server.log_path, ARTIFACTS / "app-browser-server.log")
