"""The app's named API (/chat, /stats, /backends) against a live server on loopback, through gradio_client.

Fast tests use the conftest's tiny random GPT-2 (native and transformers forms of the same weights); the
slow ones chat with the real configured backends (the bundled SmolLM2) from configs/app.toml.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import LiveApp, SlowStream, write_tiny_config

HF_DEFAULTS = "[backends.hf.generation]\ntemperature = 0.3\ntop_k = 0\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_native_ckpt, tiny_gpt2_hf_dir):
    """One app for the module (starting one costs seconds); each test sees only its own log lines."""
    directory = tmp_path_factory.mktemp("ui-api")
    # The transformers entry has generation defaults of its own; the native one falls back to [generation].
    config = write_tiny_config(directory, tiny_native_ckpt, tiny_gpt2_hf_dir, extra=HF_DEFAULTS)
    with LiveApp(config, directory / "chat_history.jsonl") as live:
        yield live


@pytest.fixture
def app(server):
    server.mark_log()
    return server


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def test_only_the_named_endpoints_are_public(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/chat", "/stats", "/backends", "/finetune", "/finetune_status", "/finetune_cancel"}


def test_backends_lists_configured_keys_labels_and_the_default(client):
    backends = client.predict(api_name="/backends")
    assert [(b["key"], b["label"], b["kind"], b["default"]) for b in backends] == [
        ("native", "Tiny native GPT-2", "native", True), ("hf", "Tiny transformers GPT-2", "hf", False)]


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_chat_replies_on_each_backend_and_logs_the_call_as_one_exchange(app, client, backend):
    reply = client.predict("Hello there", backend=backend, seed=7, api_name="/chat")
    assert isinstance(reply, str) and reply
    [exchange] = app.exchanges()
    assert exchange["user"] == "Hello there" and exchange["assistant"] == reply
    assert exchange["backend"] == backend and exchange["turn"] == 0
    assert exchange["system_prompt"] == "Be brief."  # the config's default
    assert exchange["config"]["max_new_tokens"] == 8 and exchange["config"]["seed"] == 7


def test_native_and_transformers_give_the_same_greedy_reply_through_the_api(client):
    native = client.predict("Tell me a story", backend="native", temperature=0, api_name="/chat")
    hf = client.predict("Tell me a story", backend="hf", temperature=0, api_name="/chat")
    assert native == hf


def test_chat_streams_a_growing_reply_whose_last_value_is_the_final_text(app, client):
    job = client.submit("Stream this", temperature=0, max_new_tokens=12, api_name="/chat")
    partials = list(job)
    final = job.outputs()[-1]
    assert len(partials) >= 2 and final == partials[-1]
    assert all(final.startswith(p) for p in partials)
    assert [e["assistant"] for e in app.exchanges()] == [final]


def test_chat_uses_history_system_prompt_and_every_setting(app, client):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    client.predict("And now?", history=history, backend="hf", system_prompt="Answer in French.",
                   max_new_tokens=5, temperature=0.5, top_k=10, top_p=0.9, repetition_penalty=1.3,
                   stop=["\n\n"], seed=3, api_name="/chat")
    [exchange] = app.exchanges()
    assert exchange["turn"] == 1 and exchange["system_prompt"] == "Answer in French."
    config = exchange["config"]
    assert (config["max_new_tokens"], config["temperature"], config["top_k"], config["top_p"],
            config["repetition_penalty"], config["seed"]) == (5, 0.5, 10, 0.9, 1.3, 3)
    assert "\n\n" in config["stop"]


def test_chat_without_sampling_arguments_uses_the_chosen_backends_defaults(app, client):
    client.predict("Hi", backend="hf", api_name="/chat")
    client.predict("Hi", backend="native", api_name="/chat")
    client.predict("Hi", backend="hf", top_k=7, api_name="/chat")  # one argument given: only it changes
    hf, native, mixed = (e["config"] for e in app.exchanges())
    assert (hf["temperature"], hf["top_k"], hf["max_new_tokens"], hf["top_p"]) == (0.3, None, 8, 0.95)
    assert (native["temperature"], native["top_k"], native["max_new_tokens"]) == (0.7, 50, 8)  # [generation]
    assert (mixed["temperature"], mixed["top_k"], mixed["top_p"]) == (0.3, 7, 0.95)


def test_history_in_gradio_block_format_is_accepted(app, client):
    """A Chatbot's own value (content as a list of text blocks) can be passed back as history."""
    blocks = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    from_blocks = client.predict("Next?", history=blocks, temperature=0, api_name="/chat")
    assert from_blocks == client.predict("Next?", history=plain, temperature=0, api_name="/chat")
    assert [e["turn"] for e in app.exchanges()] == [1, 1]


def test_same_seed_gives_the_same_reply(client):
    first = client.predict("Pick a word", seed=11, temperature=1.0, api_name="/chat")
    again = client.predict("Pick a word", seed=11, temperature=1.0, api_name="/chat")
    assert first == again


def test_stats_counts_exchanges_and_feedback(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir):
    config = write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir)
    with LiveApp(config, tmp_path / "log.jsonl") as app:
        client = Client(app.url, verbose=False)
        stats = client.predict(api_name="/stats")
        assert (stats["exchanges"], stats["ready_for_finetune"]) == (0, False)
        for text in ("one", "two", "three"):
            client.predict(text, api_name="/chat")
        [first, second, _] = app.exchanges()
        app.service.log.append_feedback(conversation_id=first["conversation_id"], turn=0, rating="like")
        app.service.log.append_feedback(conversation_id=second["conversation_id"], turn=0, rating="dislike")
        stats = client.predict(api_name="/stats")
        assert (stats["exchanges"], stats["conversations"], stats["liked"], stats["disliked"]) == (3, 3, 1, 1)
        assert stats["ready_for_finetune"] is True and stats["ready_threshold"] == 3


def test_eight_concurrent_clients_each_get_their_own_reply_logged_exactly_once(tmp_path, tiny_native_ckpt,
                                                                             tiny_gpt2_hf_dir):
    config = write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir)
    with LiveApp(config, tmp_path / "log.jsonl") as app:
        # Slowed pieces make the replies overlap in time, so the test sees whether they run at once.
        app.service.slots.factory = SlowStream.factory(delay=0.1)
        _eight_clients(app)
        assert SlowStream.most_at_once >= 4  # the queue runs several replies at once, not one by one


def _eight_clients(app):
    results: dict[int, str] = {}
    errors = []

    def chat(i: int) -> None:
        try:
            results[i] = Client(app.url, verbose=False).predict(
                f"client {i} says hello", backend="native" if i % 2 else "hf", seed=i, api_name="/chat")
        except Exception as exc:  # surfaced below with the client number
            errors.append((i, exc))

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    exchanges = app.exchanges()
    assert sorted(e["user"] for e in exchanges) == sorted(f"client {i} says hello" for i in range(8))
    by_user = {e["user"]: e for e in exchanges}
    for i in range(8):
        assert by_user[f"client {i} says hello"]["assistant"] == results[i]
    assert len({e["conversation_id"] for e in exchanges}) == 8


USER_ERRORS = [
    (dict(message="Hi", backend="nope"), "Unknown backend 'nope': choose one of native, hf."),
    (dict(message="Hi", temperature=-1), "temperature must be 0 (greedy) or a number from 0.01 to 100.0"),
    (dict(message="Hi", temperature=1e-40), "temperature must be 0 (greedy) or a number from 0.01 to 100.0"),
    (dict(message="Hi", repetition_penalty=1e-40), "repetition_penalty must be a number from 0.01 to 100.0"),
    (dict(message="Hi", seed=2**64), "seed must be None (random) or a whole number from 0 to 9223372036854775807"),
    (dict(message="Hi", backend=["x"]), "backend must be a string: one of the keys /backends lists, got ['x']."),
    (dict(message=["Hi"]), "message must be a non-empty string."),
    (dict(message="Hi", system_prompt=5), "system_prompt must be a string (empty for none), got 5."),
    (dict(message="Hi", stop="END"), ""),  # a single string is one stop string: accepted
    (dict(message="Hi", stop=[1]), "stop must be a list of non-empty strings, got (1,)"),
    (dict(message="Hi", history=[{"role": "user", "content": {"x": 1}}]), "history[0] must be a message"),
    (dict(message="Hi", history="Hi"), "history must be a list of messages"),
    (dict(message="x" * 20_001), "Your message has 20,001 characters, over the limit of 20,000: shorten it "
                                 "(the limit is max_message_chars in [app] of the app config)."),
    (dict(message="Hi", history=[{"role": "user", "content": "x"}] * 201),
     "The history has 201 messages, over the limit of 200"),
    (dict(message="Hi", history=[{"role": "user", "content": "x" * 100_001}] * 2),
     "The history has 200,002 characters, over the limit of 200,000"),
    (dict(message="Hi", system_prompt="s" * 8001), "The system prompt has 8,001 characters, over the limit"),
    (dict(message="Hi", stop=["a"] * 17), "The stop list has 17 strings, over the limit of 16"),
    (dict(message="Hi", stop=["a" * 201]), "A stop string has 201 characters, over the limit of 200"),
    (dict(message="Hi", top_k=2.5), "top_k must be a whole number"),
    (dict(message="Hi", max_new_tokens=1000), "leaves no room for the prompt"),
    (dict(message="   "), "message must be a non-empty string."),
    (dict(message="Hi", history=[{"role": "robot", "content": "x"}]), "history[0] must be a message"),
]


def test_user_errors_come_back_as_one_sentence_and_log_nothing(app, client):
    logged = 0
    for kwargs, sentence in USER_ERRORS:
        if not sentence:
            assert isinstance(client.predict(**kwargs, api_name="/chat"), str)
            logged += 1
            continue
        start = time.perf_counter()
        with pytest.raises(AppError) as info:
            client.predict(**kwargs, api_name="/chat")
        assert sentence in str(info.value) and "Traceback" not in str(info.value), kwargs
        assert str(info.value).count("\n") == 0 and time.perf_counter() - start < 10, kwargs
    assert len(app.exchanges()) == logged


def test_a_10_mb_message_is_refused_at_once_before_any_model_work(app, client, monkeypatch):
    loads = []
    monkeypatch.setattr(app.service.slots, "use", lambda key: loads.append(key))  # must not be reached
    start = time.perf_counter()
    with pytest.raises(AppError, match="Your message has 10,000,000 characters, over the limit of 20,000"):
        client.predict("x" * 10_000_000, api_name="/chat")
    assert time.perf_counter() - start < 10 and loads == [] and app.log_lines() == []


def test_stats_calls_run_at_most_two_at_once(server):
    [stats] = [fn for fn in server.demo.fns.values() if fn.api_name == "stats"]
    assert stats.concurrency_limit == 2


MESSAGES = st.one_of(st.text(max_size=12), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))
CONTENT = st.one_of(st.text(max_size=6), st.integers(), st.none(),
                    st.lists(st.one_of(st.text(max_size=3), st.fixed_dictionaries({"type": st.just("text"),
                                                                                   "text": st.text(max_size=3)})),
                             max_size=2))
MESSAGE_DICT = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "robot"]),
                                      "content": CONTENT})
NUMBERS = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.integers(min_value=2**62),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 1e-40, 1e40]),
                    st.text(max_size=3))
CHAT_ARGUMENTS = st.fixed_dictionaries({}, optional={
    "history": st.one_of(st.none(), st.text(max_size=3), st.integers(), st.lists(MESSAGE_DICT, max_size=3)),
    "backend": st.one_of(st.sampled_from(["native", "hf", "nope"]), st.integers(), st.none(),
                         st.lists(st.text(max_size=2), max_size=2)),
    "system_prompt": st.one_of(st.none(), st.text(max_size=8), st.integers()),
    "max_new_tokens": st.one_of(st.integers(1, 4), NUMBERS), "temperature": NUMBERS, "top_k": NUMBERS,
    "top_p": NUMBERS, "repetition_penalty": NUMBERS, "seed": NUMBERS,
    "stop": st.one_of(st.none(), st.text(max_size=3), st.integers(), st.lists(st.one_of(st.text(max_size=3),
                                                                                         st.integers()), max_size=2)),
})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=MESSAGES, arguments=CHAT_ARGUMENTS)
def test_any_chat_call_is_a_logged_reply_or_one_sentence_never_a_crash(server, client, message, arguments):
    server.mark_log()
    try:
        reply = client.predict(message, **arguments, api_name="/chat")
    except AppError as exc:
        text = str(exc)
        assert text and "Traceback" not in text and "upstream Gradio app has raised" not in text, text
        assert "\n" not in text and len(text) < 400, text
        assert server.log_lines() == []  # a refused call logs nothing
        return
    [exchange] = server.exchanges()  # a reply is logged exactly once
    assert isinstance(reply, str) and exchange["assistant"] == reply and exchange["user"] == message


def test_a_backend_that_cannot_load_is_reported_not_crashed(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir):
    extra = f'[backends.broken]\nlabel = "Missing"\nkind = "native"\ncheckpoint = "{tmp_path / "nowhere"}"\n'
    config = write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir, extra=extra)
    with LiveApp(config, tmp_path / "log.jsonl") as live:
        client = Client(live.url, verbose=False)
        with pytest.raises(AppError) as info:
            client.predict("Hi", backend="broken", api_name="/chat")
        assert "Missing could not be loaded" in str(info.value) and "nowhere" in str(info.value)
        assert client.predict("Hi", api_name="/chat")  # the other backends still work
        states = {b["key"]: b["state"] for b in client.predict(api_name="/backends")}
        assert states["broken"] == "failed" and states["native"] == "ready"


def _copy_checkpoint(src, dst, created: float):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["created"] = created
    (dst / "meta.json").write_text(json.dumps(meta))


def test_reload_serves_the_newest_native_checkpoint_without_a_restart(tmp_path, monkeypatch, tiny_native_ckpt,
                                                                     tiny_gpt2_hf_dir):
    models = tmp_path / "models"
    _copy_checkpoint(tiny_native_ckpt, models / "base", created=1000.0)
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(models))
    config = write_tiny_config(tmp_path, "latest", tiny_gpt2_hf_dir)
    with LiveApp(config, tmp_path / "log.jsonl") as live:
        client = Client(live.url, verbose=False)
        client.predict("before", api_name="/chat")
        _copy_checkpoint(tiny_native_ckpt, models / "finetuned", created=2000.0)
        live.service.slots.reload("native")
        assert live.service.slots.wait("native", timeout=60)
        assert "finetuned" in live.service.slots.status("native").message
        client.predict("after", api_name="/chat")
        models_used = {e["user"]: e["model"] for e in live.exchanges()}
        assert models_used["before"].endswith("base") and models_used["after"].endswith("finetuned")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["smollm2", "native"])
def test_bundled_smollm2_answers_a_question_through_the_api(tmp_path, backend):
    """The real config: the bundled GGUF through transformers, and its native conversion (make setup)."""
    from gpt.checkpoint import CheckpointError, resolve_checkpoint

    if backend == "native":
        try:
            resolve_checkpoint("latest")
        except CheckpointError:
            pytest.fail("no native checkpoint under models/native: run `make setup` first")
    with LiveApp(None, tmp_path / "log.jsonl") as live:
        client = Client(live.url, verbose=False)
        start = time.perf_counter()
        reply = client.predict("What is the capital of France?", backend=backend, temperature=0,
                               system_prompt="", max_new_tokens=24, api_name="/chat")
        assert "Paris" in reply, reply
        assert time.perf_counter() - start < 120
        assert [e["backend"] for e in live.exchanges()] == [backend]


@pytest.mark.slow
def test_chat_with_no_sampling_arguments_answers_the_quality_set_on_the_bundled_native_backend(tmp_path):
    """The shipped defaults (configs/app.toml: the backend's own settings, the app's system prompt) give right
    answers; max_new_tokens only keeps the test short (an answer comes in its first sentence)."""
    from training.quality import QUESTIONS, is_right

    with LiveApp(None, tmp_path / "log.jsonl") as live:
        client = Client(live.url, verbose=False)
        replies = [client.predict(q.question, backend="native", max_new_tokens=24, api_name="/chat")
                   for q in QUESTIONS]
        misses = [(q.question, r) for q, r in zip(QUESTIONS, replies, strict=True) if not is_right(r, q)]
        assert len(misses) <= len(QUESTIONS) // 10, misses  # >= 90 % right
        configs = [e["config"] for e in live.exchanges()]
        expected = live.service.generation_defaults("native")
        assert all((c["temperature"], c["top_p"]) == (expected.temperature, expected.top_p) for c in configs)


def test_plain_http_call_as_docs_api_md_shows(app):
    """The two-request protocol of docs/api.md: POST the inputs, then read the server-sent events."""
    body = json.dumps({"data": ["Hello!", [], "native", "Be brief.", 8, 0, 0, 1.0, 1.0, None, None]}).encode()
    request = urllib.request.Request(f"{app.url}/gradio_api/call/chat", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{app.url}/gradio_api/call/chat/{event_id}", timeout=60) as response:
        events = response.read().decode()
    assert "event: complete" in events
    final = json.loads(events.split("event: complete")[1].split("data:", 1)[1].strip().splitlines()[0])
    [exchange] = app.exchanges()
    assert final == [exchange["assistant"]] and exchange["user"] == "Hello!"


def _ui_handler(server, name: str):
    [fn] = [f.fn for f in server.demo.fns.values() if getattr(f.fn, "__name__", "") == name]
    return fn


def test_regenerate_while_send_streams_in_one_session_is_refused_and_logs_one_reply(server):
    """Send and Regenerate are separate events: the second one in a session waits its turn with a sentence."""
    import gradio as gr

    server.mark_log()
    send, regenerate = _ui_handler(server, "send"), _ui_handler(server, "regenerate")
    request = gr.Request(session_hash="one-tab")
    settings = ["native", "Be brief.", 8, 0, 0, 1.0, 1.0, "", ""]
    sending = send("Hello", [], {}, *settings, request)
    shown = next(sending)[1]  # the user's message is on the page and the reply is about to stream
    next(sending)
    with pytest.warns(UserWarning, match="A reply is still streaming in this chat"):
        assert list(regenerate(shown, {}, *settings, request)) == [(gr.skip(),) * 4]
        again = list(send("Hello again", shown, {}, *settings, request))
    assert again == [(gr.skip(),) * 5]  # the typed message stays in its box
    list(sending)
    assert [e["user"] for e in server.exchanges()] == ["Hello"]
    other = gr.Request(session_hash="another-tab")  # other sessions were never blocked, and this one is free
    assert list(regenerate([{"role": "user", "content": "Hi"}], {}, *settings, other))
    assert list(regenerate([{"role": "user", "content": "Hello"}], {}, *settings, request))
    assert [e["user"] for e in server.exchanges()] == ["Hello", "Hi", "Hello"]


def test_the_page_refuses_an_over_long_message_with_a_sentence_and_keeps_it_in_the_box(server):
    import gradio as gr

    server.mark_log()
    send = _ui_handler(server, "send")
    text = "x" * 20_001
    with pytest.warns(UserWarning, match="Your message has 20,001 characters, over the limit of 20,000"):
        outputs = list(send(text, [], {}, "native", "Be brief.", 8, 0, 0, 1.0, 1.0, "", "",
                            gr.Request(session_hash="long")))
    assert outputs[-1][:2] == (text, [])  # the message is back in its box, the chat as it was
    assert server.log_lines() == []
