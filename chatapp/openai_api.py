"""The OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions`, served next to the web UI.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused-on-loopback")
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}])
    for chunk in client.chat.completions.create(model="smollm2", messages=[...], stream=True): ...

`openai_routes(service, access)` returns plain Starlette routes; chatapp/ui.py hands them to the server that
Gradio starts, so they answer on the UI's own port (docs/api.md has curl and client examples). A request
goes through the same chat loop as the UI (`ChatService.stream` -> `respond`): the same prompt budget, stop
handling and chat log (`[app] log_api = false` keeps API exchanges out of the log). Replies are generated
`GENERATE_LIMIT` at a time; later requests wait their turn (up to `QUEUE_LIMIT` waiting, then 429). Errors
come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never as a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from backends import BackendError
from backends.base import GenerationConfig
from chatapp.chat import GENERATE_LIMIT, message_text, new_conversation_id
from gpt.chatlog import ChatLogError

log = logging.getLogger(__name__)

QUEUE_LIMIT = 64  # requests waiting for a turn before new ones are refused with 429
API_KEYS_ENV = "NANOGPT_CHAT_API_KEYS"  # comma-separated keys; or a file of keys, one a line (--api-key-file)
REFUSED = {  # OpenAI parameters this app cannot honour, and what to do instead
    "frequency_penalty": "use repetition_penalty (a multiplier, 1 = off, 1.1 = mild) instead",
    "presence_penalty": "use repetition_penalty (a multiplier, 1 = off, 1.1 = mild) instead",
    "logprobs": "leave it out: this app does not return log probabilities",
    "tools": "leave it out: the models here do not call tools",
    "functions": "leave it out: the models here do not call functions",
    "logit_bias": "leave it out: this app does not support logit_bias",
}


class ApiError(Exception):
    """A request this API refuses; becomes OpenAI's error JSON with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.TYPES.get(self.status, "api_error"),
                                       "param": self.param, "code": self.code}}, status_code=self.status)


@dataclass
class ApiAccess:
    """Who may call /v1: anyone (loopback, no keys), or holders of one of `keys` (`Authorization: Bearer KEY`).

    `required` is set when the app is reachable from other machines: then a request is refused unless keys
    are configured and it carries one.
    """

    keys: frozenset[str] = field(default_factory=frozenset)
    required: bool = False

    @classmethod
    def load(cls, key_file: str | os.PathLike | None = None, required: bool = False) -> ApiAccess:
        """Keys from $NANOGPT_CHAT_API_KEYS and `key_file` (one a line; # comments); ValueError if unreadable."""
        keys = {k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()}
        if key_file:
            try:
                lines = Path(key_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"Cannot read the API key file {key_file} ({exc}): pass a readable text file "
                                 "with one key a line.") from None
            keys |= {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
        return cls(frozenset(keys), required)

    def check(self, request: Request) -> None:
        if not self.keys and not self.required:
            return
        if not self.keys:
            raise ApiError(401, f"This app is reachable from other machines, so its API needs keys: start it with "
                                f"{API_KEYS_ENV}=KEY (or --api-key-file FILE) and send "
                                f"'Authorization: Bearer KEY'.", code="invalid_api_key")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "This API needs a key: send the header 'Authorization: Bearer KEY' (with the "
                                "openai client: api_key=KEY).", code="invalid_api_key")
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in self.keys):
            raise ApiError(401, "That API key is not one of this app's keys: check the key you send.",
                           code="invalid_api_key")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    history: list[dict]  # earlier user/assistant messages
    message: str  # the newest user message
    system_prompt: str | None
    cfg: GenerationConfig
    stream: bool
    include_usage: bool
    conversation_id: str


def parse_chat_request(body, service) -> ChatRequest:
    """The request body of /v1/chat/completions, checked; ApiError says what is wrong with it."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object like {\"model\": ..., \"messages\": [...]}.")
    model = body.get("model")
    keys = service.slots.keys()
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"model is required: use one of {', '.join(keys)} (GET /v1/models lists them).",
                       param="model")
    if model not in keys:
        raise ApiError(404, f"The model {model!r} does not exist here: use one of {', '.join(keys)}.",
                       param="model", code="model_not_found")
    for name, advice in REFUSED.items():
        if body.get(name) not in (None, 0, False, []):
            raise ApiError(422, f"{name} is not supported: {advice}.", param=name, code="unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise ApiError(422, "n must be 1: this app makes one reply per request.", param="n")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(422, "response_format must be {\"type\": \"text\"} or left out: this app cannot force JSON.",
                       param="response_format")
    system_prompt, history, message = _messages(body.get("messages"))
    if system_prompt is None:
        system_prompt = service.system_prompt  # the app's, as in the UI; send an empty system message for none
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}.",
                       param="stream_options")
    cid = body.get("conversation_id")
    if cid is not None and not (isinstance(cid, str) and 0 < len(cid) <= 200):
        raise ApiError(400, "conversation_id must be a non-empty string (up to 200 characters).",
                       param="conversation_id")
    return ChatRequest(model=model, history=history, message=message, system_prompt=system_prompt,
                       cfg=_generation_config(body, service.generation_defaults(model)), stream=stream,
                       include_usage=bool(options.get("include_usage")),
                       conversation_id=cid or new_conversation_id())


def _messages(messages) -> tuple[str | None, list[dict], str]:
    """(system prompt or None, earlier user/assistant messages, newest user message) of `messages`."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list like [{\"role\": \"user\", \"content\": \"Hi\"}].",
                       param="messages")
    system, conversation = [], []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}.",
                           param=f"messages[{i}].role")
        if not (isinstance(content, str) or (isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content))):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts "
                                f"[{{\"type\": \"text\", \"text\": ...}}] (this app takes text only).",
                           param=f"messages[{i}].content")
        text = message_text(content)
        if role in ("system", "developer"):
            system.append(text)
        else:
            conversation.append({"role": role, "content": text})
    if not conversation or conversation[-1]["role"] != "user" or not conversation[-1]["content"].strip():
        raise ApiError(400, "The last message must be the user's, with some text: that is what gets answered.",
                       param="messages")
    return ("\n\n".join(system) if system else None), conversation[:-1], conversation[-1]["content"]


def _generation_config(body: dict, defaults: GenerationConfig) -> GenerationConfig:
    """OpenAI's sampling fields (plus top_k and repetition_penalty, as vLLM takes them) over `defaults`."""
    settings = {}
    max_tokens, max_completion = body.get("max_tokens"), body.get("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise ApiError(400, "max_tokens and max_completion_tokens differ: send only one of them.",
                       param="max_tokens")
    if (max_completion if max_completion is not None else max_tokens) is not None:
        settings["max_new_tokens"] = max_completion if max_completion is not None else max_tokens
    for name, ours in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                       ("repetition_penalty", "repetition_penalty"), ("seed", "seed"), ("stop", "stop")):
        if body.get(name) is not None:
            settings[ours] = body[name]
    if "temperature" in settings and _number(settings["temperature"]) and settings["temperature"] > 2:
        raise ApiError(400, f"temperature must be between 0 and 2, got {settings['temperature']}.",
                       param="temperature")
    if settings.get("top_k") == -1:
        settings["top_k"] = 0  # vLLM's "off"; ours is 0
    try:
        return GenerationConfig.parse(settings, defaults=defaults)
    except ValueError as exc:
        field_name = str(exc).split(" ", 1)[0]
        param = {"max_new_tokens": "max_tokens"}.get(field_name, field_name)
        raise ApiError(400, f"{_api_names(str(exc))}.", param=param) from None


def _api_names(message: str) -> str:
    """A chat-loop message in the API's words (its max_tokens is the loop's max_new_tokens)."""
    return message.replace("max_new_tokens", "max_tokens")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Turns:
    """At most GENERATE_LIMIT replies at once; up to QUEUE_LIMIT more wait in arrival order, then 429."""

    def __init__(self):
        self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None
        self._loop = None

    async def acquire(self) -> None:
        if self._loop is not asyncio.get_running_loop():  # made on the server's loop (a relaunch has a new one)
            self._semaphore, self._loop = asyncio.Semaphore(GENERATE_LIMIT), asyncio.get_running_loop()
        if self._semaphore.locked() and self.waiting >= QUEUE_LIMIT:
            raise ApiError(429, f"{GENERATE_LIMIT} replies are being generated and {QUEUE_LIMIT} more are waiting: "
                                "retry in a few seconds.", code="rate_limit_exceeded")
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._semaphore.release()


_DONE = object()


def openai_routes(service, access: ApiAccess | None = None) -> list[Route]:
    """The /v1 routes for `service` (a chatapp.ui_service.ChatService); `access` says who may call them."""
    access = access or ApiAccess.load()
    turns = _Turns()
    log_api = service.settings.log_api

    def model_entry(key: str) -> dict:
        entry = {"id": key, "object": "model", "created": 0, "owned_by": "nanogpt-chat",
                 "label": service.slots.label(key), "kind": service.slots.kind(key)}
        if service.slots.status(key).state == "ready":  # never load a model just to list it
            with service.slots.use(key) as backend:
                entry["max_model_len"] = backend.context_length  # vLLM's name, read by backends/openai.py
        return entry

    async def models(request: Request):
        access.check(request)
        data = await anyio.to_thread.run_sync(lambda: [model_entry(k) for k in service.slots.keys()])
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request):
        access.check(request)
        key = request.path_params["model"]
        if key not in service.slots.keys():
            raise ApiError(404, f"The model {key!r} does not exist here: use one of "
                                f"{', '.join(service.slots.keys())}.", param="model", code="model_not_found")
        return JSONResponse(await anyio.to_thread.run_sync(model_entry, key))

    async def completions(request: Request):
        access.check(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON: send a JSON object with "
                                "Content-Type: application/json.") from None
        req = parse_chat_request(body, service)
        await turns.acquire()
        updates = None
        try:  # the limits are checked when the stream is made; errors before any output are a status
            updates = _open(service, req, log_api)
            first = await anyio.to_thread.run_sync(_next, updates)
        except BaseException:
            if updates is not None:
                updates.close()
            turns.release()
            raise
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            try:
                last = first
                while not last.done:
                    last = await anyio.to_thread.run_sync(_next, updates)
            finally:
                updates.close()
                turns.release()
            return JSONResponse({
                "id": reply_id, "object": "chat.completion", "created": created, "model": req.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": last.text},
                             "finish_reason": last.finish_reason, "logprobs": None}],
                "usage": _usage(last)})
        return StreamingResponse(_events(req, reply_id, created, first, updates, turns.release),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return [Route("/v1/models", _errors_as_json(models), methods=["GET"]),
            Route("/v1/models/{model:path}", _errors_as_json(model), methods=["GET"]),
            Route("/v1/chat/completions", _errors_as_json(completions), methods=["POST"])]


def _open(service, req, log_api: bool) -> Iterator:
    """The chat loop's stream for `req`; the app's size limits refuse it here, before any work."""
    try:
        return service.stream(req.model, req.history, req.message, req.cfg, req.system_prompt,
                              req.conversation_id, log=log_api)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages", code="limit_exceeded") from None
    except BackendError as exc:
        raise ApiError(503, str(exc), code="backend_unavailable") from None


def _next(updates: Iterator):
    """The next (ChatUpdate, context_length)'s update, turning the chat loop's errors into ApiErrors."""
    try:
        update, _ = next(updates)
        return update
    except ValueError as exc:  # the conversation cannot fit the model's context, or a bad setting
        raise ApiError(422, _api_names(str(exc)), param="messages", code="context_length_exceeded") from None
    except BackendError as exc:
        raise ApiError(503, str(exc), code="backend_unavailable") from None
    except ChatLogError as exc:
        raise ApiError(503, str(exc), code="chat_log_unwritable") from None


async def _events(req: ChatRequest, reply_id: str, created: int, first, updates, release):
    """Server-sent events in OpenAI's chunk format: role, content deltas, finish_reason, usage, [DONE]."""

    def chunk(delta: dict | None, finish_reason=None, usage=None) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": None,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                       "logprobs": None}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    sent = ""
    update = first
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            # The chat loop's text is the tidied reply so far: each one extends the last, so the deltas add
            # up to exactly the final text that the non-streamed reply returns and the log keeps.
            if len(update.text) > len(sent):
                yield chunk({"content": update.text[len(sent):]})
                sent = update.text
            if update.done:
                break
            update = await anyio.to_thread.run_sync(_next, updates)
        yield chunk({}, finish_reason=update.finish_reason)
        if req.include_usage:
            yield chunk(None, usage=_usage(update))
    except ApiError as exc:  # a failure half-way: the status line is gone, so say it in the stream
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': ApiError.TYPES.get(exc.status), 'param': exc.param, 'code': exc.code}})}\n\n"  # noqa: E501
    finally:
        updates.close()  # a client that hung up: the partial reply is logged once, the model stops
        release()
    yield "data: [DONE]\n\n"


def _usage(update) -> dict:
    completion = update.tokens
    return {"prompt_tokens": update.prompt.n_tokens, "completion_tokens": completion,
            "total_tokens": update.prompt.n_tokens + completion}


def _errors_as_json(endpoint):
    async def handle(request: Request):
        try:
            return await endpoint(request)
        except ApiError as exc:
            return exc.response()
        except Exception:  # a bug: the traceback goes to the server log, the client gets one sentence
            log.exception("%s %s failed", request.method, request.url.path)
            return ApiError(500, "The app failed on this request; its console shows why.").response()

    return handle
