"""The chat page of `localmix serve`, driven in a real headless Chromium (Debian's `chromium`
and `chromium-driver`, through Selenium) against a real server on the tiny Mixtral: the page
loads and shows the model; a reply streams in several steps; Stop frees the slot (the server's
/metrics counts the cancelled sequence); Regenerate, Edit-and-resend, the keyboard, a reload
that keeps the conversations, a conversation that does not fit the context; `--api-key`;
`--no-webui`; the security headers; a phone-sized window.

The tiny model says random tokens, so it cannot be made to say `<script>`: the hostile reply is
streamed to the same page by a scripted server (the real page router, a fake
`/v1/chat/completions` that sends the reply in pieces), and an imported conversation holding it
goes through the same rendering. One browser and one server per module keep the file short.

`LOCALMIX_WEBUI_SCREENSHOT=docs/images/webui.png pytest -n 0 tests/test_webui.py -k screenshot`
rewrites the screenshot that docs/serve.md shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO
from server_util import Server, free_port

WAIT = 60  # seconds any one wait in the page may take


def find_browser() -> tuple[str, str]:
    """Chromium and its driver, or a skip (a failure under CI=true) naming what is missing."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",
                                                               "/usr/lib/chromium/chromedriver") if Path(p).exists()),
                                                  None)
    if not browser or not driver:
        pytest.skip("the browser tests need chromium and chromedriver (scripts/setup --test installs Debian's "
                    "chromium and chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="the browser tests need selenium (pip install -e '.[test]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--disable-extensions", "--no-first-run", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_page_load_timeout(WAIT)
    d.set_script_timeout(WAIT)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def web(converted, tmp_path_factory):
    """`localmix serve` on the tiny Mixtral, no API key, 2 slots of 2048 tokens."""
    path = converted("mixtral", "Q8_0")
    s = Server(path, "--parallel", "2", "--ctx", "2048", key=None,
               log=tmp_path_factory.mktemp("serve") / "server.log")
    s.model = path.stem
    yield s
    assert s.stop() == 0, s.log_text()
    assert "Traceback" not in s.log_text()


@pytest.fixture
def page(browser, web):
    """The browser on `web`'s page, connected (the tests below go on from where the last one left it)."""
    if not browser.current_url.startswith(web.url + "/"):
        open_page(browser, web.url + "/")
    connected(browser, web.model)
    return browser


# ---- driving the page ----------------------------------------------------------------------

def wait(d, condition, what: str, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: condition(), message=what)


def css(d, selector: str):
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, selector)


def state(d) -> str:
    return d.execute_script("return document.body.dataset.state || ''")


def open_page(d, url: str) -> None:
    d.get(url)
    wait(d, lambda: state(d) == "idle", "the page did not start")


def connected(d, model: str) -> None:
    wait(d, lambda: css(d, "#model-name")[0].text == model, "the page did not show the model's name")


def set_field(d, field: str, value) -> None:
    """A setting typed in the settings panel (opened if closed)."""
    if not css(d, "#settings")[0].is_displayed():
        css(d, "#settings-toggle")[0].click()
    box = css(d, f"#{field}")[0]
    box.clear()
    box.send_keys(str(value))


def new_chat(d) -> None:
    css(d, "#new-chat")[0].click()
    wait(d, lambda: not css(d, "#messages .msg"), "New chat left messages on the page")


def start_chat(d, max_tokens: int, text: str | None = None) -> None:
    """A reply length set, a new conversation, and (with `text`) its first message sent."""
    set_field(d, "max_tokens", max_tokens)
    new_chat(d)
    if text is not None:
        type_message(d, text)


def edit_first(d, keys) -> None:
    """The conversation's first user message edited to `keys` (typed: a newline or ENTER sends)."""
    css(d, "#messages .msg.user")[0].find_element("xpath", ".//button[text()='Edit']").click()
    edit = css(d, "#messages textarea.edit")[0]
    edit.clear()
    edit.send_keys(*keys)


def type_message(d, text: str, send: bool = True) -> None:
    from selenium.webdriver.common.keys import Keys

    box = css(d, "#input")[0]
    box.send_keys(text)
    if send:
        box.send_keys(Keys.ENTER)


def replies(d) -> list:
    return css(d, "#messages .msg.assistant")


def finished(d) -> None:
    wait(d, lambda: state(d) == "idle" and replies(d) and replies(d)[-1].find_elements("css selector", ".stats")
         and replies(d)[-1].find_element("css selector", ".stats").text, "the reply did not finish")


def messages(d) -> list[tuple[str, str]]:
    return [(m.get_attribute("data-role"), m.find_element("css selector", ".content").text)
            for m in css(d, "#messages .msg")]


def console_errors(d) -> list[str]:
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


# ---- the server side -----------------------------------------------------------------------

def test_the_page_and_its_files_carry_the_security_headers(web):
    for path in ("/", "/ui/app.js", "/ui/vendor/purify.min.js", "/ui/style.css"):
        r = httpx.get(web.url + path, timeout=10)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "access-control-allow-origin" not in r.headers  # same origin: no CORS
    assert httpx.get(web.url + "/ui/app.js", timeout=10).headers["content-type"].startswith("text/javascript")
    page = httpx.get(web.url + "/", timeout=10).text
    assert "<script>" not in page and "http://" not in page and "https://" not in page  # no inline script, no CDN
    for path in ("/ui/missing.js", "/ui/../webui.py", "/ui/%2e%2e/webui.py", "/ui/"):
        r = httpx.get(web.url + path, timeout=10)
        assert r.status_code == 404 and "error" in r.json(), path


def test_props_says_what_the_page_shows(web):
    props = httpx.get(web.url + "/props", timeout=10).json()
    assert props["model"] == web.model and props["n_ctx"] == 2048 and props["total_slots"] == 2
    assert props["default_generation_settings"]["temperature"] == 0.8
    assert props["default_generation_settings"]["max_tokens"] == 1024


def test_no_webui_turns_the_page_off(converted, tmp_path):
    s = Server(converted("mixtral", "Q8_0"), "--parallel", "1", "--ctx", "256", "--no-webui", key=None,
               log=tmp_path / "server.log")
    try:
        for path in ("/", "/ui/app.js", "/ui/index.html"):
            r = httpx.get(s.url + path, timeout=10)
            assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found", path
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 200
        assert "chat page" not in s.log_text().splitlines()[0]
    finally:
        assert s.stop() == 0


# ---- the page ------------------------------------------------------------------------------

def test_the_page_loads_and_shows_the_model_and_the_servers_defaults(browser, web):
    open_page(browser, web.url + "/")
    connected(browser, web.model)
    props = css(browser, "#model-props")[0].text
    assert "context 2,048 tokens" in props and "2 slots" in props
    assert css(browser, "#temperature")[0].get_attribute("placeholder") == "0.8"
    assert css(browser, "#top_p")[0].get_attribute("placeholder") == "0.95"
    assert css(browser, "#max_tokens")[0].get_attribute("placeholder") == "1024"
    assert css(browser, "#seed")[0].get_attribute("placeholder") == "random"
    assert console_errors(browser) == []


def test_a_reply_streams_in_several_steps_and_ends_with_its_stats(page, web):
    browser = page
    start_chat(browser, 600, "Tell me a story.")  # seconds of streaming on a CPU, still a few tenths on a fast GPU
    seen = []  # the reply's length, read while the page says it is streaming
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        streaming = state(browser) == "streaming"
        text = browser.execute_script("const r = document.querySelectorAll('#messages .msg.assistant .content');"
                                      "return r.length ? r[r.length - 1].textContent : ''")
        if not streaming:
            break
        if text and (not seen or len(text) > seen[-1]):
            seen.append(len(text))
        time.sleep(0.05)
    assert len(seen) >= 2, f"the reply did not grow while streaming: {seen}"
    finished(browser)
    stats = replies(browser)[-1].find_element("css selector", ".stats").text
    assert re.fullmatch(r"\d+ prompt tokens · (\d+) reply tokens · [\d.]+ tok/s · first token [\d.]+ s"
                        r"( · cut at max tokens or the context's end)?", stats), stats
    assert 1 < int(re.search(r"(\d+) reply", stats)[1]) <= 600
    assert messages(browser)[0] == ("user", "Tell me a story.")


def test_stop_cancels_the_reply_and_the_server_frees_the_slot(page, web):
    browser = page
    before = web.metrics()["cancelled_total"]
    start_chat(browser, 1500, "Count to a thousand.")
    wait(browser, lambda: replies(browser) and len(replies(browser)[-1].text) > 20, "no reply text")
    assert state(browser) == "streaming"
    css(browser, "#stop")[0].click()
    wait(browser, lambda: state(browser) == "idle", "Stop did not stop the reply")
    assert replies(browser)[-1].find_element("css selector", ".stopped").text == "Stopped."
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = web.metrics()
        if m["cancelled_total"] == before + 1 and m["active_sequences"] == 0:
            break
        time.sleep(0.1)
    assert m["cancelled_total"] == before + 1 and m["active_sequences"] == 0, m


def test_escape_stops_a_reply(page, web):
    browser = page
    from selenium.webdriver.common.keys import Keys

    start_chat(browser, 1500, "Again.")
    wait(browser, lambda: replies(browser) and len(replies(browser)[-1].text) > 20, "no reply text")
    css(browser, "#input")[0].send_keys(Keys.ESCAPE)
    wait(browser, lambda: state(browser) == "idle", "Esc did not stop the reply")
    assert replies(browser)[-1].find_elements("css selector", ".stopped")


def test_regenerate_replaces_the_last_reply(page, web):
    browser = page
    start_chat(browser, 12, "Hello")
    finished(browser)
    requests = web.metrics()["requests_total"]
    replies(browser)[-1].find_element("xpath", ".//button[text()='Regenerate']").click()
    wait(browser, lambda: web.metrics()["requests_total"] == requests + 1, "Regenerate sent no request")
    finished(browser)
    assert [role for role, _ in messages(browser)] == ["user", "assistant"]
    assert "12 reply tokens" in replies(browser)[-1].find_element("css selector", ".stats").text


def test_edit_and_resend_with_the_keyboard(page, web):
    browser = page
    from selenium.webdriver.common.keys import Keys

    start_chat(browser, 8)
    box = css(browser, "#input")[0]
    box.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.NULL, "line two")  # Shift+Enter: a new line
    assert state(browser) == "idle" and not css(browser, "#messages .msg")
    box.send_keys(Keys.ENTER)
    finished(browser)
    type_message(browser, "second turn")
    finished(browser)
    assert [role for role, _ in messages(browser)] == ["user", "assistant"] * 2
    assert messages(browser)[0][1] == "line one\nline two"
    edit_first(browser, ("edited", Keys.ENTER))
    finished(browser)
    assert [(role, text if role == "user" else "") for role, text in messages(browser)] == [
        ("user", "edited"), ("assistant", "")]


def test_a_reload_keeps_the_conversations_and_a_rename(page, web):
    browser = page
    from selenium.webdriver.common.keys import Keys

    start_chat(browser, 8, "Remember me")
    finished(browser)
    reply = messages(browser)[-1][1]
    current = css(browser, "#conversations li.current")[0]
    current.find_element("css selector", "button[title='Rename']").click()
    name = css(browser, "#conversations input.rename")[0]
    name.send_keys(Keys.CONTROL, "a", Keys.NULL, "Kept across reloads", Keys.ENTER)
    browser.refresh()
    wait(browser, lambda: state(browser) == "idle", "the page did not start again")
    titles = [b.text for b in css(browser, "#conversations button.title")]
    assert "Kept across reloads" in titles, titles
    assert messages(browser) == [("user", "Remember me"), ("assistant", reply)]
    assert css(browser, "#max_tokens")[0].get_attribute("value") == "8"  # the settings too


def test_a_conversation_over_the_context_says_so(page, web):
    browser = page
    new_chat(browser)
    browser.execute_script("document.getElementById('input').value = 'word '.repeat(2500)")
    type_message(browser, "end")
    wait(browser, lambda: state(browser) == "idle" and replies(browser)
         and replies(browser)[-1].find_elements("css selector", ".error"), "no error shown")
    error = replies(browser)[-1].find_element("css selector", ".error").text
    assert error.startswith("The conversation does not fit: the prompt has") and "context holds 2048" in error
    set_field(browser, "max_tokens", 4)  # shortened, the message goes through
    edit_first(browser, ("short\n",))
    finished(browser)
    assert not css(browser, "#messages .error")


def test_delete_asks_then_removes(page, web):
    browser = page
    start_chat(browser, 4, "Delete me")
    finished(browser)

    def titles():
        return [b.text for b in css(browser, "#conversations button.title")]

    assert "Delete me" in titles()
    css(browser, "#conversations li.current button[title='Delete']")[0].click()
    browser.switch_to.alert.dismiss()  # asked, and kept
    assert "Delete me" in titles()
    css(browser, "#conversations li.current button[title='Delete']")[0].click()
    browser.switch_to.alert.accept()
    wait(browser, lambda: "Delete me" not in titles(), "the conversation was not deleted")


def test_a_phone_sized_window(page, web):
    browser = page
    browser.set_window_size(390, 844)
    try:
        browser.refresh()
        wait(browser, lambda: state(browser) == "idle", "the page did not start")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        assert not css(browser, "#conversations li")[0].is_displayed() or \
            css(browser, "#sidebar")[0].location["x"] < 0
        assert css(browser, "#input")[0].is_displayed() and css(browser, "#send")[0].is_displayed()
        css(browser, "#open-sidebar")[0].click()
        wait(browser, lambda: css(browser, "#sidebar")[0].location["x"] >= 0, "the list did not slide in")
        css(browser, "#conversations button.title")[0].click()
        wait(browser, lambda: css(browser, "#sidebar")[0].location["x"] < 0, "the list did not slide out")
    finally:
        browser.set_window_size(1200, 900)


def test_api_key(browser, server):
    """With --api-key the page asks for the key, refuses a wrong one, then works; the key stays
    in the tab (sessionStorage), never in localStorage."""
    model = json.loads(httpx.get(server.url + "/props", headers=server.headers, timeout=10).text)["model"]
    assert httpx.get(server.url + "/props", timeout=10).status_code == 401
    open_page(browser, server.url + "/")
    wait(browser, lambda: css(browser, "#key-form")[0].is_displayed(), "the page did not ask for the key")
    assert "needs an API key" in css(browser, "#notice")[0].text
    css(browser, "#key")[0].send_keys("wrong\n")
    wait(browser, lambda: "refused" in css(browser, "#notice")[0].text, "a wrong key was not refused")
    css(browser, "#key")[0].send_keys(server.key + "\n")
    connected(browser, model)
    assert not css(browser, "#key-form")[0].is_displayed() and not css(browser, "#notice")[0].is_displayed()
    set_field(browser, "max_tokens", 6)
    type_message(browser, "Hi")
    finished(browser)
    assert browser.execute_script("return sessionStorage.getItem('localmix.apiKey')") == server.key
    stored = browser.execute_script("return JSON.stringify(Object.assign({}, localStorage))")
    assert server.key not in stored


# ---- a hostile reply, and a server that goes away ------------------------------------------

HOSTILE = ("Look: <img src=x onerror=\"window.pwned=1\"> and\n\n<script>window.pwned=2</script>\n\n"
           "<iframe src=\"/\"></iframe> [link](javascript:window.pwned=3) ![pic](x \"t\")\n\n"
           "```python\ndef f(x):\n    return x < 1\n```\n")


@pytest.fixture(scope="module")
def scripted():
    """The real page router beside a fake OpenAI endpoint that streams HOSTILE in small pieces
    (a tag split between events), on uvicorn in a thread."""
    import asyncio

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from localmix.frontends.server import webui

    app = FastAPI()
    app.include_router(webui.router())

    @app.get("/props")
    async def props():
        return {"model": "scripted", "status": "ok", "n_ctx": 512, "total_slots": 1,
                "default_generation_settings": {"temperature": 0.8, "top_p": 0.95, "max_tokens": 64, "seed": None}}

    @app.post("/v1/chat/completions")
    async def chat():
        async def events():
            pieces = [HOSTILE[i:i + 7] for i in range(0, len(HOSTILE), 7)]
            for piece in pieces:
                delta = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield f"data: {json.dumps(delta)}\n\n"
                await asyncio.sleep(0.01)
            yield 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
            usage = {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield server, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def assert_harmless(d) -> None:
    """HOSTILE as the page shows it: no element of those kinds, nothing ran, the code highlighted."""
    shown = css(d, "#messages .msg.assistant .content")[-1]
    for tag in ("img", "script", "iframe"):
        assert not shown.find_elements("css selector", tag), tag
    assert not css(d, "#messages img, #messages script, #messages iframe, #messages [onerror]")
    assert d.execute_script("return window.pwned === undefined")
    text = shown.text
    assert '<img src=x onerror="window.pwned=1">' in text and "<script>window.pwned=2</script>" in text
    hrefs = [a.get_attribute("href") for a in shown.find_elements("css selector", "a")]
    assert not any(h and h.startswith("javascript:") for h in hrefs), hrefs
    assert shown.find_elements("css selector", "pre code.hljs.language-python .hljs-keyword")


def test_a_hostile_reply_is_shown_as_text_and_runs_nothing(browser, scripted):
    _, url = scripted
    open_page(browser, url + "/")
    connected(browser, "scripted")
    type_message(browser, "Say something dangerous.")
    finished(browser)
    assert_harmless(browser)
    assert "prompt tokens" in replies(browser)[-1].find_element("css selector", ".stats").text
    assert not [e for e in console_errors(browser) if "Content Security Policy" in e]


def test_an_imported_conversation_is_rendered_as_safely(browser, scripted, tmp_path):
    _, url = scripted
    open_page(browser, url + "/")
    exported = {"format": "localmix-conversations", "version": 1, "conversations": [
        {"id": "x1", "title": "Imported <b>title</b>", "system": "", "messages": [
            {"role": "user", "content": "<img src=x onerror=\"window.pwned=4\">"},
            {"role": "assistant", "content": HOSTILE}]}]}
    file = tmp_path / "conversations.json"
    file.write_text(json.dumps(exported))
    browser.execute_script("document.getElementById('import-file').hidden = false")
    css(browser, "#import-file")[0].send_keys(str(file))
    wait(browser, lambda: "Imported 1 conversation" in css(browser, "#notice")[0].text, "the import failed")
    assert css(browser, "#conversations li.current button.title")[0].text == "Imported <b>title</b>"
    assert messages(browser)[0] == ("user", '<img src=x onerror="window.pwned=4">')
    assert_harmless(browser)
    exported = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        URL.createObjectURL = (blob) => { blob.text().then(done); return "#"; };
        HTMLAnchorElement.prototype.click = function () {};
        document.getElementById("export").click();""")
    exported = json.loads(exported)
    assert exported["format"] == "localmix-conversations"
    assert exported["conversations"][0]["messages"][1]["content"] == HOSTILE


def test_a_server_that_is_gone_is_said_so(browser, scripted):
    server, url = scripted
    open_page(browser, url + "/")
    connected(browser, "scripted")
    server.should_exit = True
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/props", timeout=1)
        except httpx.HTTPError:
            break
        time.sleep(0.1)
    new_chat(browser)
    type_message(browser, "Are you there?")
    wait(browser, lambda: "does not answer" in css(browser, "#notice")[0].text, "no message that the server is gone")
    assert state(browser) == "idle"


# ---- the screenshot ------------------------------------------------------------------------

def test_screenshot_of_a_two_turn_conversation(browser, web, tmp_path):
    """The picture in docs/serve.md; written there with LOCALMIX_WEBUI_SCREENSHOT set."""
    browser.set_window_size(1200, 760)
    open_page(browser, web.url + "/")
    connected(browser, web.model)
    set_field(browser, "max_tokens", 30)
    set_field(browser, "seed", 6)
    css(browser, "#settings-toggle")[0].click()  # closed again
    new_chat(browser)
    type_message(browser, "Hello! What can you do?")
    finished(browser)
    type_message(browser, "Show me a Python function.")
    finished(browser)
    assert len(replies(browser)) == 2
    out = Path(os.environ.get("LOCALMIX_WEBUI_SCREENSHOT") or tmp_path / "webui.png")
    if not out.is_absolute():
        out = REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    browser.set_window_size(1200, 900)
