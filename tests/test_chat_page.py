"""The chat page at GET / (frugallm/infer/static/chat.html), driven in headless Chromium with Playwright's sync
API against a real `frugallm serve` on the session's tiny run.

A reply streams into the page in several pieces and ends "done"; the conversation keeps every turn and sends
them back with the next message (with the key, the model id from /v1/models and only the settings filled in);
Stop aborts a long reply, which stays in the page marked "stopped", and the server frees its slot; a missing or
wrong key shows the 401 message and focuses the key box; the key survives a reload, and outlives the tab
only with "remember" ticked (off by default); the server's error messages
(a refused request's, and an error event's mid-stream) show in the page. Test 1 saves a screenshot of its
conversation (to benchmarks/results/chat_page.png with FRUGALLM_SCREENSHOT=1). Needs the `playwright` package and a Chromium binary (Debian's
`chromium`); skipped without them. The tests take about 5 s here, plus the server's start (~3-10 s) and, when
first in the session, the tiny run's training.
"""

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import serve_process

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="the chat page test needs the playwright package")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt install chromium)")

KEY = "sk-chat-page"
NAME = "tiny-chat"
# FRUGALLM_SCREENSHOT=1 refreshes the kept screenshot; otherwise it goes to a temporary file (a test run
# leaves the source tree as it was)
SCREENSHOT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "chat_page.png"
LAST_REPLY = "#messages .msg.assistant:last-child"

# Records what the page shows after each batch of DOM changes (a MutationObserver callback runs once per task
# that changed the DOM, so one network read of the stream gives one record).
OBSERVE = """() => {
    window.__seen = [];
    new MutationObserver(() => {
        const m = document.querySelector('#messages .msg.assistant:last-child');
        if (m) window.__seen.push({state: m.dataset.state, text: m.querySelector('.text').textContent,
                                   t: performance.now()});
    }).observe(document.getElementById('messages'),
               {childList: true, subtree: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def server(tiny_run):
    with serve_process(tiny_run, KEY, "--model-name", NAME, "--slots", "2") as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # Chromium's sandbox refuses to start as root (containers, CI)
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 900, "height": 700})  # a fresh localStorage per test
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors = []
    pg.on("pageerror", lambda e: errors.append(e))
    pg.goto(server[0] + "/")
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _texts(page, selector: str) -> list[str]:
    return page.locator(selector).evaluate_all("els => els.map(e => e.textContent)")


def _health(base: str, key: str = KEY) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/health", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, json.loads(r.read())


def _chat_requests(page) -> list:
    """The chat requests the page sends from now on, as Playwright Request objects."""
    seen = []
    page.on("request", lambda r: seen.append(r) if r.url.endswith("/v1/chat/completions") else None)
    return seen


def test_a_reply_streams_in_pieces_and_the_conversation_keeps_every_turn(page, server, tmp_path):
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")  # what leaving the box does: fetch the model id with the key
    sync_api.expect(page.locator("#model")).to_have_text(NAME)
    sync_api.expect(page.locator("#notice")).to_be_hidden()
    page.click("#settings summary")
    page.fill("#max-tokens", "64")
    page.fill("#seed", "3")
    page.fill("#system", "Be brief.")
    requests = _chat_requests(page)
    page.evaluate(OBSERVE)

    t0 = time.time()
    page.fill("#prompt", "the cat sat on the mat")
    page.click("#send")
    sync_api.expect(page.locator(LAST_REPLY)).to_have_attribute("data-state", "done")
    first_reply = page.locator(LAST_REPLY + " .text").text_content()
    seen = page.evaluate("window.__seen")
    streaming = [s["text"] for s in seen if s["state"] == "streaming" and s["text"]]
    assert len(set(streaming)) >= 2, f"the reply did not arrive in pieces: {seen}"
    assert all(b.startswith(a) for a, b in zip(streaming, streaming[1:])), "the streamed text should only grow"
    assert first_reply.strip() and first_reply.startswith(streaming[-1])
    print(f"\nchat page: a 64-token reply in {time.time() - t0:.2f} s, shown in {len(set(streaming))} steps")

    body = requests[0].post_data_json
    assert requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert body["model"] == NAME and body["stream"] is True
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.7, 1, 64, 3)
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "the cat sat on the mat"}]
    assert page.is_enabled("#send") and page.is_disabled("#stop")

    # Shift+Enter is a new line, Enter sends; an emptied setting is not sent
    page.fill("#seed", "")
    page.click("#prompt")
    page.keyboard.type("a dog")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("ran")
    assert page.input_value("#prompt") == "a dog\nran" and page.locator(".msg").count() == 2
    page.keyboard.press("Enter")
    sync_api.expect(page.locator(".msg")).to_have_count(4)
    sync_api.expect(page.locator(LAST_REPLY)).to_have_attribute("data-state", "done")
    assert page.input_value("#prompt") == ""
    classes = page.locator("#messages .msg").evaluate_all("els => els.map(e => e.className)")
    assert classes == ["msg user", "msg assistant", "msg user", "msg assistant"]
    assert _texts(page, ".msg.user .text") == ["the cat sat on the mat", "a dog\nran"]
    replies = _texts(page, ".msg.assistant .text")
    assert replies[0] == first_reply and replies[1].strip()
    body = requests[1].post_data_json
    assert body["messages"] == [  # the first exchange goes back with the second message
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat on the mat"},
        {"role": "assistant", "content": first_reply}, {"role": "user", "content": "a dog\nran"}]
    assert "seed" not in body and body["max_tokens"] == 64

    page.click("#settings summary")  # closed, so the conversation fills the screenshot
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT if os.environ.get("FRUGALLM_SCREENSHOT") == "1" else tmp_path / "chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0

    page.click("#new-chat")  # clears the view and what is sent next
    sync_api.expect(page.locator(".msg")).to_have_count(0)


def test_stop_keeps_the_partial_reply_and_frees_the_server(page, server):
    base, _ = server
    page.fill("#api-key", KEY)
    page.click("#settings summary")
    page.fill("#max-tokens", "2000")
    page.fill("#temperature", "1")
    page.fill("#seed", "1")
    page.fill("#prompt", "the dog ran to the park")
    page.click("#send")
    page.wait_for_function("""() => { const m = document.querySelector('#messages .msg.assistant:last-child');
                                      return m && (m.dataset.state !== 'streaming'
                                                   || m.querySelector('.text').textContent.length > 20); }""")
    assert page.get_attribute(LAST_REPLY, "data-state") == "streaming", "the reply ended before Stop could be tried"
    assert page.is_disabled("#send") and page.is_enabled("#stop")
    page.click("#stop")
    reply = page.locator(LAST_REPLY)
    sync_api.expect(reply).to_have_attribute("data-state", "stopped")
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    text = page.locator(LAST_REPLY + " .text").text_content()
    assert len(text) > 20 and "stopped" in reply.locator(".note").text_content()
    page.wait_for_timeout(500)
    assert page.locator(LAST_REPLY + " .text").text_content() == text, "the reply kept growing after Stop"

    # the hang-up cancelled the generation: the server is healthy and its slot free again
    t0 = time.time()
    while True:
        status, h = _health(base)
        assert status == 200
        if h["active"] == h["queued"] == 0:
            break
        assert time.time() - t0 < 3, f"the stopped request still runs on the server: {h}"
        time.sleep(0.05)


def test_a_missing_or_wrong_key_asks_for_it_and_server_errors_show(page, server):
    notice = page.locator("#notice")
    # no key: loading the model list gets 401
    sync_api.expect(notice).to_be_visible()
    sync_api.expect(notice).to_contain_text("API key")
    sync_api.expect(page.locator("#api-key")).to_be_focused()

    page.fill("#api-key", "sk-wrong")
    page.fill("#prompt", "hello")
    page.click("#send")
    reply = page.locator(LAST_REPLY)
    sync_api.expect(reply).to_have_attribute("data-state", "error")
    sync_api.expect(notice).to_contain_text("API key")
    sync_api.expect(page.locator("#api-key")).to_be_focused()
    assert page.input_value("#prompt") == "hello", "the unsent message should be back in the box to retry"
    assert page.is_enabled("#send") and page.is_disabled("#stop")

    # the key is kept in this tab: after a reload it is still there, and it works
    page.fill("#api-key", KEY)
    page.reload()
    assert page.input_value("#api-key") == KEY
    sync_api.expect(page.locator("#model")).to_have_text(NAME)
    sync_api.expect(notice).to_be_hidden()

    # a request the server refuses: its error message shows in the page
    page.click("#settings summary")
    page.fill("#max-tokens", "5000")
    page.fill("#prompt", "hello")
    page.click("#send")
    sync_api.expect(page.locator(LAST_REPLY)).to_have_attribute("data-state", "error")
    sync_api.expect(notice).to_contain_text("maximum context length")
    sync_api.expect(page.locator(LAST_REPLY + " .note")).to_contain_text("maximum context length")


def test_an_error_event_mid_stream_shows_and_keeps_the_partial_reply(page):
    # The one canned answer here: what the server sends when a stream runs past --request-timeout
    # (tests/test_server_load.py provokes the real one; a second server just for this takes ~10 s to start).
    def chunk(delta):
        return "data: " + json.dumps({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0,
                                      "model": NAME, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                                  "finish_reason": None}], "usage": None})
    error = {"error": {"message": "The request did not finish within this server's timeout of 1 s "
                                  "(--request-timeout); retry later or ask for fewer tokens.",
                       "type": "server_error", "param": None, "code": "timeout"}}
    events = [chunk({"role": "assistant", "content": ""}), chunk({"content": "the cat"}),
              chunk({"content": " sat é"}), "data: " + json.dumps(error), "data: [DONE]"]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body="".join(e + "\n\n" for e in events)))
    page.fill("#api-key", KEY)
    page.fill("#prompt", "the ball")
    page.click("#send")
    sync_api.expect(page.locator(LAST_REPLY)).to_have_attribute("data-state", "error")
    assert page.locator(LAST_REPLY + " .text").text_content() == "the cat sat é"
    sync_api.expect(page.locator("#notice")).to_contain_text("--request-timeout")
    sync_api.expect(page.locator(LAST_REPLY + " .note")).to_contain_text("did not finish within")
    assert page.is_enabled("#send") and page.is_disabled("#stop")


def test_the_key_outlives_the_tab_only_when_remembered(page, server):
    """By default the key lives in the tab's sessionStorage (a reload keeps it; a new tab, or the browser
    after the tab closed, does not have it); "remember" puts it in localStorage until unticked."""
    assert not page.is_checked("#remember-key")
    page.fill("#api-key", KEY)
    assert page.evaluate("localStorage.getItem('frugallm.apiKey')") is None
    page.reload()
    assert page.input_value("#api-key") == KEY
    other = page.context.new_page()  # a new tab of the same browser profile: its own sessionStorage
    other.goto(server[0] + "/")
    assert other.input_value("#api-key") == ""
    page.check("#remember-key")
    assert page.evaluate("localStorage.getItem('frugallm.apiKey')") == KEY
    other.reload()
    assert other.input_value("#api-key") == KEY and other.is_checked("#remember-key")
    page.uncheck("#remember-key")
    assert page.evaluate("localStorage.getItem('frugallm.apiKey')") is None
    other.close()
