"""The web UI in a real browser: Playwright drives Debian's Chromium (/usr/bin/chromium; `make browser`
installs it, never `playwright install`) against a live app serving the conftest's tiny GPT-2.

    .venv/bin/python -m pytest tests/test_browser.py      # screenshots land in test-artifacts/
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from live_server import LiveApp, SlowStream, write_tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
# The flags OFFLINE.md found to work here; Playwright adds --headless and its own profile directory.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
HF_LABEL = "Tiny transformers GPT-2"

# Records every distinct text the newest assistant message shows, to prove the reply streamed in.
WATCH_REPLY_JS = """() => {
  window.__replyTexts = [];
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const text = bots[bots.length - 1].innerText.trim();
    const seen = window.__replyTexts;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def wait_until(condition, timeout: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def browser_page():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        yield page
        browser.close()


@pytest.fixture
def app(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir):
    # The transformers entry has generation defaults of its own (the settings panel follows the backend).
    config = write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir, max_new_tokens=48,
                               extra="[backends.hf.generation]\ntemperature = 0.3\ntop_p = 0.8\n")
    with LiveApp(config, tmp_path / "chat_history.jsonl") as live:
        yield live


def test_choose_backend_chat_like_and_edit_in_the_browser(app, browser_page):
    # Pieces a little apart, so the page's intermediate states are observable on any machine's speed.
    app.service.slots.factory = SlowStream.factory(delay=0.05)
    page = browser_page
    page.goto(app.url)
    page.wait_for_selector("#message textarea", timeout=30_000)
    wait_until(lambda: "Ready: Tiny native GPT-2" in page.locator("#status").inner_text(),
               what="the default backend to report ready")

    # Switch backend: the model loads in the background and the status line says when it is ready.
    page.locator("#backend input").click()
    page.get_by_role("option", name=HF_LABEL).click()
    wait_until(lambda: f"Ready: {HF_LABEL}" in page.locator("#status").inner_text(),
               what="the transformers backend to load")

    page.evaluate(WATCH_REPLY_JS)
    page.locator("#message textarea").fill("Hello from the browser")
    page.locator("#send").click()
    exchange = wait_until(lambda: app.exchanges(), what="the exchange in the chat log")[0]
    assert exchange["user"] == "Hello from the browser" and exchange["backend"] == "hf"
    reply = exchange["assistant"]
    bot = page.locator("#chatbot [data-testid='bot']").last
    wait_until(lambda: bot.inner_text().strip() == reply, what="the final reply on the page")
    seen = page.evaluate("window.__replyTexts")
    assert len(seen) >= 2 and seen[-1] == reply, seen  # it grew in steps: streamed, not dumped at once
    assert "of 128 tokens used by the prompt" in page.locator("#context-meter").inner_text()

    page.locator("#chatbot button[aria-label='Like']").last.click()
    feedback = wait_until(lambda: app.feedback(), what="the like in the chat log")
    assert [(f["conversation_id"], f["turn"], f["rating"]) for f in feedback] == [
        (exchange["conversation_id"], 0, "like")]
    wait_until(lambda: "1 liked" in page.locator("#stats").inner_text(), what="the stats panel to count it")
    page.locator("#chatbot button[aria-label='Dislike']").last.click()  # a change of mind: the latest counts
    wait_until(lambda: len(app.feedback()) == 2, what="the dislike in the chat log")
    assert app.feedback()[1]["rating"] == "dislike"
    wait_until(lambda: "0 liked · 1 disliked" in page.locator("#stats").inner_text(), what="the new counts")
    page.locator("#chatbot button[aria-label='Like']").last.click()
    wait_until(lambda: "1 liked · 0 disliked" in page.locator("#stats").inner_text(), what="the like again")

    # Correct the reply: the edit is a feedback line carrying the better answer.
    page.locator("#chatbot button[aria-label='Edit']").last.click()
    page.locator("#chatbot textarea.edit-textarea").fill("Hello! How can I help?")
    page.locator("#chatbot button[aria-label='Submit']").click()
    edits = wait_until(lambda: [f for f in app.feedback() if f["edited"]], what="the edit in the chat log")
    assert [f["rating"] for f in app.feedback()] == ["like", "dislike", "like", None]
    assert [(e["turn"], e["rating"], e["edited"]) for e in edits] == [(0, None, "Hello! How can I help?")]
    wait_until(lambda: bot.inner_text().strip() == "Hello! How can I help?", what="the edited reply shown")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-chat.png"), full_page=True)
    assert len(app.exchanges()) == 1  # liking and editing never log a new exchange


def test_sessions_in_two_browser_tabs_never_see_each_others_history(app, browser_page):
    first = browser_page
    second = first.context.browser.new_context().new_page()
    for page, text in ((first, "I am the first tab"), (second, "I am the second tab")):
        page.goto(app.url)
        page.wait_for_selector("#message textarea", timeout=30_000)
        page.locator("#message textarea").fill(text)
        page.locator("#send").click()
    wait_until(lambda: len(app.exchanges()) == 2, what="both exchanges in the log")
    for page, mine, theirs in ((first, "first", "second"), (second, "second", "first")):
        wait_until(lambda p=page: p.locator("#chatbot [data-testid='bot']").count() == 1, what="a reply")
        chat = page.locator("#chatbot").inner_text()
        assert f"I am the {mine} tab" in chat and f"I am the {theirs} tab" not in chat
    assert len({e["conversation_id"] for e in app.exchanges()}) == 2
    assert app.service.slots.sessions_using("native") == 2
    second.close()  # a closed tab no longer keeps its model loaded
    wait_until(lambda: app.service.slots.sessions_using("native") == 1, what="the closed session to be forgotten")


def test_stop_keeps_the_partial_reply_regenerate_replaces_it_clear_starts_over(app, browser_page):
    app.service.slots.factory = SlowStream.factory(delay=0.25)
    page = browser_page
    page.goto(app.url)
    page.wait_for_selector("#message textarea", timeout=30_000)
    page.locator("#message textarea").fill("Tell me a long story")
    page.locator("#message textarea").press("Enter")
    bot = page.locator("#chatbot [data-testid='bot']")
    wait_until(lambda: len(bot.last.inner_text().split()) >= 2 if bot.count() else False,
               what="the reply to start streaming")
    page.locator("#stop").click()
    [stopped] = wait_until(lambda: app.exchanges(), what="the stopped exchange in the log")
    wait_until(lambda: bot.last.inner_text().strip() == stopped["assistant"], what="the page to show the logged text")
    time.sleep(1.5)  # had it not stopped, several more pieces would arrive now
    shown = bot.last.inner_text().strip()
    assert stopped["assistant"] == shown and 0 < len(shown.split()) < 40, stopped["assistant"]
    SlowStream.delay = 0.01  # the rest need no time to press buttons mid-reply

    page.locator("#regenerate").click()
    wait_until(lambda: len(app.exchanges()) == 2, timeout=90, what="the regenerated exchange")
    again = app.exchanges()[1]
    assert (again["user"], again["turn"], again["conversation_id"]) == (
        "Tell me a long story", 0, stopped["conversation_id"])
    wait_until(lambda: bot.count() == 1 and bot.last.inner_text().strip() == again["assistant"],
               what="the new reply in place of the old")
    assert page.locator("#chatbot [data-testid='user']").count() == 1

    page.locator("#clear").click()
    wait_until(lambda: bot.count() == 0, what="an empty chat")
    page.locator("#message textarea").fill("A new start")
    page.locator("#message textarea").press("Enter")
    wait_until(lambda: len(app.exchanges()) == 3, timeout=90, what="the exchange after Clear")
    fresh = app.exchanges()[2]
    assert fresh["turn"] == 0 and fresh["conversation_id"] != stopped["conversation_id"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-after-clear.png"), full_page=True)


def test_reload_button_serves_a_new_checkpoint_and_errors_read_as_sentences(tmp_path, monkeypatch, browser_page,
                                                                            tiny_native_ckpt, tiny_gpt2_hf_dir):
    import json

    def copy_checkpoint(name: str, created: float):
        shutil.copytree(tiny_native_ckpt, models / name)
        meta = json.loads((models / name / "meta.json").read_text())
        (models / name / "meta.json").write_text(json.dumps({**meta, "created": created}))

    models = tmp_path / "models"
    copy_checkpoint("base", 1000.0)
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(models))
    config = write_tiny_config(tmp_path, "latest", tiny_gpt2_hf_dir)
    page = browser_page
    with LiveApp(config, tmp_path / "log.jsonl") as app:
        page.goto(app.url)
        page.wait_for_selector("#message textarea", timeout=30_000)
        status = page.locator("#status")
        wait_until(lambda: "base" in status.inner_text(), what="the base checkpoint to be served")

        copy_checkpoint("finetuned", 2000.0)  # what `python -m training.finetune` leaves behind
        page.locator("#reload-native").click()
        wait_until(lambda: "finetuned" in status.inner_text(), what="the new checkpoint to be served")
        page.locator("#message textarea").fill("Hi")
        page.locator("#message textarea").press("Enter")
        wait_until(lambda: app.exchanges(), what="an exchange")
        assert app.exchanges()[0]["model"].endswith("finetuned")

        # A user message cannot be edited (only replies are training targets): a warning, then the original.
        wait_until(lambda: page.locator("#chatbot [data-testid='bot']").count() == 1, what="the reply")
        page.locator("#chatbot button[aria-label='Edit']").first.click()
        page.locator("#chatbot textarea.edit-textarea").fill("Something else")
        page.locator("#chatbot button[aria-label='Submit']").click()
        wait_until(lambda: "Only the assistant's replies can be edited" in page.content(), what="the warning")
        wait_until(lambda: page.locator("#chatbot [data-testid='user']").first.inner_text().strip() == "Hi",
                   what="the user message restored")
        assert app.feedback() == []

        # Settings that cannot work are refused with a sentence, never a traceback.
        page.get_by_text("Generation settings").click()
        seed = page.get_by_label("Seed")

        def typed_seed() -> bool:  # the controls may still be taking the backend's defaults: type again then
            if seed.input_value() != "not a number":
                seed.fill("not a number")
                return False
            return True

        wait_until(typed_seed, what="the seed box to keep what was typed")
        time.sleep(1)
        wait_until(typed_seed, what="the seed box to keep what was typed")
        page.locator("#message textarea").fill("Again")
        page.locator("#message textarea").press("Enter")
        wait_until(lambda: "Check the generation settings: seed must be a whole number" in page.content(),
                   what="the warning sentence")
        assert "Traceback" not in page.content() and len(app.exchanges()) == 1
        # Nothing is lost: the chat stays as it was and the message waits in the box to be sent again.
        assert page.locator("#message textarea").input_value() == "Again"
        assert page.locator("#chatbot [data-testid='user']").count() == 1

        page.locator("#backend input").click()
        page.get_by_role("option", name=HF_LABEL).click()
        page.locator("#reload-native").click()
        wait_until(lambda: "is not a native checkpoint" in page.content(), what="the reload warning")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-errors.png"), full_page=True)


def test_switching_while_a_model_loads_keeps_the_status_of_the_newest_choice(app, browser_page):
    from backends import create_backend

    def slow_native(key, config):
        if key == "native":
            time.sleep(4)  # a big checkpoint
        return create_backend(key, config)

    app.service.slots.factory = slow_native
    page = browser_page
    page.goto(app.url)
    page.wait_for_selector("#message textarea", timeout=30_000)
    status = page.locator("#status")
    wait_until(lambda: "Loading Tiny native GPT-2" in status.inner_text(), what="the loading status")
    page.locator("#backend input").click()
    page.get_by_role("option", name=HF_LABEL).click()
    wait_until(lambda: f"Ready: {HF_LABEL}" in status.inner_text(), what="the transformers backend")
    # Nobody wants the native model any more: it is released as soon as its load finishes.
    wait_until(lambda: app.service.slots.status("native").state == "idle", what="the slow load to end")
    time.sleep(1.5)  # the old watcher would have written "Ready: Tiny native GPT-2" by now
    assert f"Ready: {HF_LABEL}" in status.inner_text()
    assert app.service.slots.loaded_keys() == ["hf"]


def import_file(page, path) -> None:
    with page.expect_file_chooser() as chooser:
        page.locator("#import").click()
    chooser.value.set_files(str(path))


def test_reopen_a_past_conversation_after_a_reload_continue_it_and_export_import_round_trips(
        app, browser_page, tmp_path):
    page = browser_page
    page.goto(app.url)
    page.wait_for_selector("#message textarea", timeout=30_000)
    page.locator("#message textarea").fill("Where do penguins live?")
    page.locator("#send").click()
    wait_until(lambda: app.exchanges(), what="the first exchange in the log")
    meter = page.locator("#context-meter")
    wait_until(lambda: "tokens/s" in meter.inner_text(), what="the reply's speed in the context meter")
    assert "first token after" in meter.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-speed.png"), full_page=True)

    page.reload()  # the page forgets; the log and the sidebar do not
    page.wait_for_selector("#message textarea", timeout=30_000)
    assert page.locator("#chatbot [data-testid='user']").count() == 0
    entry = page.locator("#conversations label", has_text="Where do penguins live?")
    wait_until(lambda: entry.count() == 1, what="the conversation in the sidebar")
    entry.click()
    first = app.exchanges()[0]
    bot = page.locator("#chatbot [data-testid='bot']")
    wait_until(lambda: bot.count() == 1, what="the reopened turn")
    assert page.locator("#chatbot [data-testid='user']").first.inner_text().strip() == "Where do penguins live?"
    page.locator("#message textarea").fill("And polar bears?")
    page.locator("#send").click()
    wait_until(lambda: len(app.exchanges()) == 2, what="the continued exchange")
    exchanges = app.exchanges()
    assert [(e["conversation_id"], e["turn"]) for e in exchanges] == [(first["conversation_id"], 0),
                                                                       (first["conversation_id"], 1)]
    wait_until(lambda: bot.count() == 2, what="both replies on the page")
    page.get_by_text("Rename or hide this chat").click()
    page.locator("#rename-title textarea").fill("Polar animals")
    page.locator("#rename").click()
    wait_until(lambda: page.locator("#conversations label", has_text="Polar animals").count() == 1,
               what="the new name in the sidebar")
    assert [(r["type"], r["conversation_id"], r["title"]) for r in app.log_lines() if r.get("type")] == [
        ("conversation", first["conversation_id"], "Polar animals")]  # a later line; the exchanges stay as written
    page.screenshot(path=str(ARTIFACTS / "browser-reopened.png"), full_page=True)

    # Export everything as JSON, then import that file into a second app with an empty log.
    page.get_by_text("Export / import").click()
    page.locator("#export-all").click()
    link = page.locator("#export-file a").first
    wait_until(lambda: link.count() == 1, what="the export's download link")
    with page.expect_download() as download:
        link.click()
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    with LiveApp(app.config_path, tmp_path / "second.jsonl") as second:
        page.goto(second.url)
        page.wait_for_selector("#message textarea", timeout=30_000)
        page.get_by_text("Export / import").click()
        import_file(page, exported)
        wait_until(lambda: len(second.exchanges()) == 2, what="the imported exchanges in the second log")
        keys = ("conversation_id", "turn", "user", "assistant", "timestamp")
        assert [{k: e[k] for k in keys} for e in second.exchanges()] == [{k: e[k] for k in keys} for e in exchanges]
        wait_until(lambda: page.locator("#conversations label", has_text="Polar animals").count() == 1,
                   what="the imported conversation, with its name, in the sidebar")
        import_file(page, exported)  # again: nothing is added
        wait_until(lambda: "0 exchanges (2 already in the log)" in page.content(), what="the import summary")
        assert len(second.exchanges()) == 2
        page.screenshot(path=str(ARTIFACTS / "browser-imported.png"), full_page=True)


def test_generation_controls_follow_the_chosen_backends_defaults_until_the_user_changes_one(app, browser_page):
    page = browser_page
    page.goto(app.url)
    page.wait_for_selector("#message textarea", timeout=30_000)
    page.get_by_text("Generation settings").click()
    temperature = page.locator("#temperature input[type=number]")
    note = page.locator("#defaults-note")
    assert temperature.input_value() == "0.7" and "Using the defaults of Tiny native GPT-2" in note.inner_text()

    page.locator("#backend input").click()
    page.get_by_role("option", name=HF_LABEL).click()
    wait_until(lambda: temperature.input_value() == "0.3", what="the transformers entry's temperature")
    assert f"Using the defaults of {HF_LABEL}" in note.inner_text()

    temperature.fill("1.2")  # the user's own choice is kept from now on
    temperature.press("Enter")
    wait_until(lambda: "Your settings apply" in note.inner_text(), what="the note about the user's settings")
    page.locator("#backend input").click()
    page.get_by_role("option", name="Tiny native GPT-2").click()
    wait_until(lambda: "Tiny native GPT-2 has its own defaults" in note.inner_text(), what="the switch")
    assert temperature.input_value() == "1.2"
    page.locator("#message textarea").fill("Hi")
    page.locator("#send").click()
    [exchange] = wait_until(lambda: app.exchanges(), what="the exchange")
    assert exchange["config"]["temperature"] == 1.2 and exchange["backend"] == "native"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-defaults.png"), full_page=True)

    page.locator("#reset-defaults").click()
    wait_until(lambda: temperature.input_value() == "0.7", what="the native defaults back")
    assert "Using the defaults of Tiny native GPT-2" in note.inner_text()
