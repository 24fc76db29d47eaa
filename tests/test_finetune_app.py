"""Fine-tuning from the app: /finetune, /finetune_status, /finetune_cancel on a live app with a tiny model, the
hand-off of the new checkpoint to the native backend, and one sentence for each kind of bad input.

Run: .venv/bin/python -m pytest tests/test_finetune_app.py
"""

from __future__ import annotations

import json
import time

import pytest
from gradio_client import Client
from live_server import LiveApp, write_tiny_config
from training_fixtures import FACTS, fact_log_records, make_template_checkpoint, write_log

from chatapp.finetune_job import FinetuneJob, FinetuneRefused
from chatapp.model_slot import ModelSlots

# The tiny random model learns with full fine-tuning at a high lr; the bundled model uses the auto defaults.
TINY_TRAINING = """
lora_rank = 0
lr = 3e-3
min_lr = 3e-4
epochs = 60
batch_size = 8
block_size = 128
patience = 0
eval_iters = 2
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-app")
    models = root / "models"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOGPT_CHAT_MODELS", str(models))
        mp.setenv("OMP_NUM_THREADS", "1")
        base = make_template_checkpoint(models / "tiny-base")
        (root / "tiny.toml").write_text(TINY_TRAINING)
        config = write_tiny_config(root, "latest", base, default="native", max_new_tokens=24,
                                   extra="").read_text().replace(
            "ready_for_finetune = 3", f"ready_for_finetune = 3\nfinetune_config = {json.dumps(str(root / 'tiny.toml'))}")
        # the transformers entry cannot read the tiny native checkpoint: keep only the native backend
        config = config[:config.index("[backends.hf]")]
        (root / "app.toml").write_text(config)
        records = fact_log_records(12)
        likes = [{"type": "feedback", "conversation_id": r["conversation_id"], "turn": r["turn"], "rating": "like",
                  "edited": None} for r in records]
        log = write_log(root / "chat_history.jsonl", records + likes)
        with LiveApp(root / "app.toml", log) as live:
            live.base = base
            yield live


def ask(client, question: str) -> str:
    return client.predict(question, None, "native", "", 24, 0.0, 0, 1.0, 1.0, None, None, api_name="/chat")


def wait_state(client, states, timeout=240) -> dict:
    deadline = time.time() + timeout
    while True:
        status = client.predict(api_name="/finetune_status")
        if status["state"] in states:
            return status
        assert time.time() < deadline, status
        time.sleep(0.2)


def test_finetune_from_the_api_shows_progress_then_the_native_backend_serves_the_new_checkpoint(app):
    client = Client(app.url, verbose=False)
    assert client.predict(api_name="/finetune_status")["state"] == "idle"
    question, answer = FACTS[0]
    assert answer not in ask(client, question)
    started = client.predict(True, True, api_name="/finetune")
    assert started["state"] == "running"
    with pytest.raises(Exception, match="already running"):  # one run at a time
        client.predict(False, True, api_name="/finetune")
    progress = []
    deadline = time.time() + 240
    while True:
        s = client.predict(api_name="/finetune_status")
        if s["state"] != "running":
            break
        if s["step"]:
            progress.append((s["step"], s["total"], s["train_loss"]))
        assert time.time() < deadline, s
        time.sleep(0.1)
    assert s["state"] == "done", s
    assert progress and all(0 < step <= total for step, total, _ in progress)
    liked = s["report"]["recall"]["liked"]
    assert s["checkpoint"] and liked["total"] > 0 and liked["reproduced"] == liked["total"]
    assert s["report"]["retention"]["questions"] == 12 and s["val_loss"] is not None
    assert ask(client, question).strip() == answer  # no reload call: served on completion
    assert app.service.slots.status("native").message.find(s["checkpoint"]) >= 0


def test_cancel_stops_the_run_and_the_app_keeps_serving(app):
    client = Client(app.url, verbose=False)
    served = app.service.slots.status("native").message
    client.predict(False, False, api_name="/finetune")
    wait_state(client, {"running"})
    deadline = time.time() + 120
    while client.predict(api_name="/finetune_status")["step"] < 1:
        assert time.time() < deadline
        time.sleep(0.1)
    assert "Cancelling" in client.predict(api_name="/finetune_cancel")["message"]
    assert wait_state(client, {"cancelled", "done", "failed"})["state"] == "cancelled"
    assert ask(client, FACTS[1][0])  # still answering, with the model it served before
    assert app.service.slots.status("native").message == served


@pytest.fixture
def job(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(tmp_path / "models"))
    make_template_checkpoint(tmp_path / "models" / "base")
    config = write_tiny_config(tmp_path, "latest", tmp_path, default="native")
    from backends.registry import load_config

    return FinetuneJob(tmp_path / "log.jsonl", ModelSlots(load_config(config)), "native")


def refusal(job, **filters) -> str:
    with pytest.raises(FinetuneRefused) as info:
        job.start(**filters)
    message = str(info.value)
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    return message


def test_bad_input_is_one_sentence_and_nothing_starts(job, tmp_path):
    assert "empty" in refusal(job)
    write_log(job.log_path, fact_log_records(2))
    assert "6 replies" in refusal(job) and "at least 10" in refusal(job)
    records = fact_log_records(6)
    feedback = [{"type": "feedback", "conversation_id": r["conversation_id"], "turn": r["turn"], "rating": "dislike",
                 "edited": None} for r in records]
    write_log(job.log_path, records + feedback)
    assert "Every reply in the chat log is disliked" in refusal(job)
    assert "Every reply in the chat log is disliked" in refusal(job, exclude_disliked=False)
    write_log(job.log_path, records)
    for path in (tmp_path / "models").iterdir():
        (path / "config.json").unlink(missing_ok=True)  # no checkpoint left to start from
    assert "no native checkpoint to start from" in refusal(job)
    assert job.status()["state"] == "idle"


@pytest.mark.slow
@pytest.mark.browser
def test_the_panel_starts_a_run_shows_progress_and_the_report(app):
    from playwright.sync_api import sync_playwright
    from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, wait_until

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(app.url)
        page.get_by_text("Fine-tune on your conversations").click()
        assert "The log holds 36 exchanges in 12 conversations" in page.locator("#finetune-summary").inner_text()
        page.locator("#finetune-start").click()
        wait_until(lambda: page.locator("#finetune-progress").get_attribute("value") not in (None, "0"), 120,
                   "the progress bar to move")
        wait_until(lambda: "done" in page.locator("#finetune-status").inner_text(), 240, "the run to finish")
        wait_until(lambda: "Before → after" in page.locator("#finetune-report").inner_text(), 10, "the report")
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#finetune-panel").screenshot(path=str(ARTIFACTS / "finetune-panel.png"))
        assert "now serves" in page.locator("#finetune-status").inner_text()
        browser.close()
