"""The OpenAI-compatible /v1 API, served by a live app and used by the `openai` backend kind.

Driven with the official `openai` client against one app (the conftest's tiny random GPT-2, native and
transformers forms) on a loopback port; the `openai` backend chats through that same app's /v1.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from live_server import LiveApp, SlowStream, free_port, write_tiny_config

from backends import BackendError, GenerationConfig, create_backend
from chatapp import openai_api
from chatapp.openai_api import ApiAccess, ApiError

HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_native_ckpt, tiny_gpt2_hf_dir):
    """One app for the module; its third backend, "slow", is the native one with each piece slowed down."""
    directory = tmp_path_factory.mktemp("openai-api")
    slow = f'[backends.slow]\nkind = "native"\ncheckpoint = {json.dumps(str(tiny_native_ckpt))}\n'
    config = write_tiny_config(directory, tiny_native_ckpt, tiny_gpt2_hf_dir, extra=slow)
    with LiveApp(config, directory / "chat_history.jsonl") as live:
        live.service.slots.factory = lambda key, config: (
            SlowStream(create_backend(key, config)) if key == "slow" else create_backend(key, config))
        yield live


@pytest.fixture
def app(server):
    server.mark_log()
    return server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0)


def test_models_lists_the_configured_backends(client):
    assert [m.id for m in client.models.list().data] == ["native", "hf", "slow"]
    assert client.models.retrieve("hf").id == "hf"


def test_plain_and_streamed_replies_are_equal_for_the_same_seed_and_each_logged_once(app, client):
    plain = client.chat.completions.create(model="native", messages=HI, seed=11, temperature=1.0)
    chunks = list(client.chat.completions.create(model="native", messages=HI, seed=11, temperature=1.0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = plain.choices[0].message.content
    assert text and plain.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason] == ["length"]  # the tiny model runs to max_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 8
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 8
    logged = app.exchanges()
    assert [(e["user"], e["assistant"], e["backend"]) for e in logged] == [("Hello there", text, "native")] * 2
    assert logged[0]["system_prompt"] == "Be brief."  # the app's, as in the UI, when the request has none


def test_request_settings_and_history_reach_the_chat_loop(app, client):
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Salut"}, {"role": "user", "content": [
                    {"type": "text", "text": "How are "}, {"type": "text", "text": "you?"}]}]
    reply = client.chat.completions.create(model="hf", messages=messages, max_tokens=3, temperature=0, top_p=0.5,
                                           seed=5, extra_body={"top_k": 0, "repetition_penalty": 1.0})
    assert reply.usage.completion_tokens <= 3
    [exchange] = app.exchanges()
    assert exchange["user"] == "How are you?" and exchange["turn"] == 1
    assert exchange["system_prompt"] == "Answer in French."
    assert {k: exchange["config"][k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed",
                                              "repetition_penalty")} == dict(
        max_new_tokens=3, temperature=0, top_p=0.5, top_k=None, seed=5, repetition_penalty=1.0)


def test_a_stop_string_ends_the_reply_without_appearing_in_it(client):
    full = client.chat.completions.create(model="native", messages=HI, seed=3, temperature=1.0,
                                          max_tokens=8).choices[0].message.content
    word = full.split()[2]  # a word from the middle of the reply it would give without a stop
    for stream in (False, True):
        out = client.chat.completions.create(model="native", messages=HI, seed=3, temperature=1.0, max_tokens=8,
                                             stop=[word], stream=stream)
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            text, reason = out.choices[0].message.content, out.choices[0].finish_reason
        assert text == full[:full.index(word)].strip() and word not in text and reason == "stop"


@pytest.mark.parametrize(("request_body", "status", "says"), [
    (dict(model="nope", messages=HI), 404, "The model 'nope' does not exist here: use one of native, hf, slow."),
    (dict(model="native", messages=[]), 400, "messages must be a non-empty list"),
    (dict(model="native", messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role must be"),
    (dict(model="native", messages=[{"role": "assistant", "content": "x"}]), 400, "The last message must be"),
    (dict(model="native", messages=HI, max_tokens=0), 400, "max_tokens must be a whole number from 1 to 1000000, got 0."),
    (dict(model="native", messages=HI, temperature=3), 400, "temperature must be between 0 and 2"),
    (dict(model="native", messages=HI, stop=[""]), 400, "stop must be"),
    (dict(model="native", messages=HI, frequency_penalty=0.5), 422, "use repetition_penalty"),
    (dict(model="native", messages=HI, n=2), 422, "n must be 1"),
    (dict(model="native", messages=HI, max_tokens=500), 422, "lower max_tokens below 128"),
    (dict(model="native", messages=[{"role": "user", "content": "x" * 30_000}]), 400,
     "over the limit of 20,000"),
])
def test_bad_requests_get_4xx_with_a_sentence_and_nothing_is_logged(app, client, request_body, status, says):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**request_body)
    error = caught.value.response.json()["error"]
    assert caught.value.status_code == status and says in error["message"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    assert app.exchanges() == []


def test_a_body_that_is_not_json_is_a_400(server):
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_with_keys_the_api_needs_a_bearer_key_and_the_ui_stays_as_it_was(server, client):
    access = server.demo.api_access
    access.keys = frozenset({"k-right"})
    try:
        for key, status in (("unused-on-loopback", 401), ("k-right", 200)):
            keyed = client.with_options(api_key=key)
            try:
                keyed.models.list()
                got = 200
            except openai.AuthenticationError as exc:
                got = exc.status_code
                assert "not one of this app's keys" in exc.response.json()["error"]["message"]
            assert got == status
        bare = httpx.get(server.url + "/v1/models")
        assert bare.status_code == 401 and "Authorization: Bearer KEY" in bare.json()["error"]["message"]
        assert httpx.get(server.url + "/").status_code == 200
    finally:
        access.keys = frozenset()


def test_a_reachable_app_without_keys_refuses_the_api_and_says_how_to_set_them(server):
    server.demo.api_access.required = True
    try:
        response = httpx.get(server.url + "/v1/models")
    finally:
        server.demo.api_access.required = False
    assert response.status_code == 401 and "NANOGPT_CHAT_API_KEYS" in response.json()["error"]["message"]


def test_api_keys_come_from_the_environment_and_a_key_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_CHAT_API_KEYS", "a, b")
    (tmp_path / "keys").write_text("# team keys\nc\n\n")
    assert ApiAccess.load(tmp_path / "keys").keys == {"a", "b", "c"}
    with pytest.raises(ValueError, match="Cannot read the API key file"):
        ApiAccess.load(tmp_path / "missing")


def test_launch_requires_api_keys_off_loopback_and_reads_them_from_a_file(tmp_path, capsys, tiny_native_ckpt,
                                                                          tiny_gpt2_hf_dir):
    import launch

    config = write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir)
    (tmp_path / "keys").write_text("k1\n")
    common = ["--port", str(free_port()), "--config", str(config), "--history", str(tmp_path / "log.jsonl")]
    exposed = launch.build(launch.parse_args([*common, "--host", "0.0.0.0", "--auth", "a:b",
                                              "--api-key-file", str(tmp_path / "keys")]))
    assert exposed.api_access == ApiAccess(frozenset({"k1"}), required=True)
    assert launch.build(launch.parse_args(common)).api_access == ApiAccess(frozenset(), required=False)
    assert launch.main([*common, "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "Cannot read the API key file" in capsys.readouterr().err


def test_sixteen_concurrent_streams_queue_for_their_turn_all_complete_and_are_each_logged_once(app):
    SlowStream.delay, SlowStream.most_at_once = 0.05, 0  # replies long enough to overlap
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        body = dict(model="slow", stream=True, seed=i, messages=[{"role": "user", "content": f"Question {i}"}])
        with httpx.stream("POST", app.url + "/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        results[i] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(16))
    assert SlowStream.most_at_once == openai_api.GENERATE_LIMIT  # the rest waited their turn: no 429
    logged = {e["user"]: e["assistant"] for e in app.exchanges()}
    assert len(app.exchanges()) == 16 and logged == {f"Question {i}": results[i] for i in range(16)}


def test_a_client_that_hangs_up_mid_stream_stops_the_model_and_its_partial_reply_is_logged_once(app):
    SlowStream.delay = 0.1
    body = dict(model="slow", stream=True, max_tokens=30, messages=[{"role": "user", "content": "Tell me more"}])
    with httpx.stream("POST", app.url + "/v1/chat/completions", json=body, timeout=60) as response:
        received = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                received.append(json.loads(line[6:]))
            if len(received) == 3:  # the role chunk and two pieces of text: now hang up
                break
    assert received[0]["choices"][0]["delta"]["role"] == "assistant"
    seen = "".join(c["choices"][0]["delta"].get("content", "") for c in received)
    deadline = time.monotonic() + 10
    while (SlowStream.active or not app.exchanges()) and time.monotonic() < deadline:
        time.sleep(0.05)
    [exchange] = app.exchanges()
    assert SlowStream.active == 0 and exchange["user"] == "Tell me more"
    assert exchange["assistant"].startswith(seen.strip()) and len(exchange["assistant"].split()) < 30


def test_past_the_waiting_limit_a_request_gets_429_instead_of_a_turn(monkeypatch):
    monkeypatch.setattr(openai_api, "QUEUE_LIMIT", 0)
    turns = openai_api._Turns()

    async def fill_then_one_more():
        for _ in range(openai_api.GENERATE_LIMIT):
            await turns.acquire()
        with pytest.raises(ApiError) as caught:
            await turns.acquire()
        return caught.value

    refused = asyncio.run(fill_then_one_more())
    assert refused.status == 429 and "retry in a few seconds" in refused.message


def test_the_openai_backend_kind_chats_through_the_apps_own_api(app, client):
    client.chat.completions.create(model="native", messages=HI, max_tokens=1)  # loaded: /v1/models has its length
    backend = create_backend("openai", base_url=app.url + "/v1", model="native")
    assert backend.context_length == int(128 * 0.9)  # the server's max_model_len, less the estimate's slack
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=11)
    pieces = backend.stream_messages(HI, cfg)
    reply = "".join(pieces)
    assert pieces.finish_reason == "length" and pieces.n_tokens == 8
    direct = client.chat.completions.create(model="native", messages=HI, seed=11, temperature=1.0, max_tokens=8)
    assert reply.strip() == direct.choices[0].message.content
    assert backend.generate(backend.format_chat(HI), cfg) == reply  # the text contract: same messages, same reply


def test_the_openai_backend_through_the_chat_loop_keeps_the_budget_and_the_log(app, tmp_path):
    from chatapp.chat import respond
    from gpt.chatlog import ChatLog

    backend = create_backend("openai", base_url=app.url + "/v1", model="native", context_length=160)
    history = [{"role": r, "content": "word " * 30} for r in ("user", "assistant") * 3]
    log = ChatLog(tmp_path / "remote.jsonl")
    *_, final = respond(backend, history, "And now?", GenerationConfig(max_new_tokens=8, seed=2), log=log,
                        system_prompt="Be brief.", backend_key="remote")
    assert final.done and final.prompt.dropped > 0 and final.prompt.messages[-1]["content"] == "And now?"
    assert final.prompt.n_tokens + 8 <= backend.context_length
    [line] = [json.loads(s) for s in (tmp_path / "remote.jsonl").read_text().splitlines()]
    assert line["assistant"] == final.text and line["model"] == "native"


def test_the_openai_backend_says_what_to_do_when_the_server_or_model_is_wrong(app, monkeypatch):
    with pytest.raises(BackendError, match="needs base_url .* and model"):
        create_backend("openai", model="x")
    with pytest.raises(BackendError, match="Cannot reach the OpenAI-compatible server .* start it, or fix base_url"):
        create_backend("openai", base_url=f"http://127.0.0.1:{free_port()}/v1", model="x").load()
    with pytest.raises(BackendError, match="does not serve model 'x' \\(it serves: native, hf, slow\\)"):
        create_backend("openai", base_url=app.url + "/v1", model="x").load()
    monkeypatch.setenv("WRONG_KEY", "nope")
    app.demo.api_access.keys = frozenset({"k-right"})
    try:
        with pytest.raises(BackendError, match="refused the API key .*set a valid key in \\$WRONG_KEY"):
            create_backend("openai", base_url=app.url + "/v1", model="native", api_key_env="WRONG_KEY").load()
    finally:
        app.demo.api_access.keys = frozenset()


@pytest.mark.slow
def test_the_official_client_chats_with_the_bundled_model_plain_and_streamed_alike(tmp_path):
    """The real config (what `make run` serves): SmolLM2 through its native conversion, as `make setup` left it."""
    with LiveApp(None, tmp_path / "log.jsonl") as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused-on-loopback", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        sampled = dict(model="native", messages=question, temperature=0.8, seed=42, max_tokens=16)
        plain = client.chat.completions.create(**sampled).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            **sampled, stream=True) if c.choices)
        assert streamed == plain and len(plain.split()) >= 3
        assert [e["assistant"] for e in live.exchanges()] == [plain, plain]


def test_with_log_api_off_api_exchanges_stay_out_of_the_chat_log(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from backends.registry import load_config
    from chatapp.openai_api import openai_routes
    from chatapp.ui_service import ChatService

    config = load_config(write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir))
    config["app"]["log_api"] = False
    service = ChatService(config, tmp_path / "log.jsonl")
    with TestClient(Starlette(routes=openai_routes(service, ApiAccess()))) as http:
        response = http.post("/v1/chat/completions", json=dict(model="native", messages=HI, max_tokens=2))
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    assert not (tmp_path / "log.jsonl").exists() or (tmp_path / "log.jsonl").read_text() == ""
