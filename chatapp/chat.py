"""The chat loop: history + new message -> prompt within budget -> streamed reply -> chat log.

    for update in respond(backend, history, "What is 2+2?", GenerationConfig(), system_prompt="Be brief.",
                          log=ChatLog("chat_history.jsonl"), backend_key="smollm2"):
        show(update.text)            # the tidied reply so far; update.done on the last one

The web UI, the /v1 API and the console chat all use `respond`, with plain {"role", "content": str}
messages (each edge normalises what it receives, once). The budget renders the prompt to ids through the
backend's chat format (which escapes role markers and special tokens a user types) and the backend is sent
those ids; the backend cuts the reply at its stops (the config's and its chat format's turn markers), so
the reply is only stripped here. Each exchange is logged exactly once: when the reply is complete, or - if
the consumer stops iterating early - with the partial reply when the generator is closed.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from backends.base import GenerationConfig
from backends.native import serving_capacity
from chatapp.budget import Prompt, build_prompt
from gpt.chatlog import ChatLog

# Replies streamed at once by each edge (the UI's queue, the /v1 API): as many as the native engine decodes in
# one batch (more would only wait in its queue); one loaded model serves them all.
GENERATE_LIMIT = serving_capacity()


@dataclass
class ChatUpdate:
    text: str  # the tidied reply so far (final when done)
    done: bool
    prompt: Prompt  # from build_prompt (n_tokens, dropped, truncated) for the context meter
    conversation_id: str
    turn: int  # 0-based index of this exchange in its conversation
    tokens: int = 0  # tokens generated so far: the backend's count (a stream without one: its pieces)
    first_token_s: float | None = None  # seconds from the request to the first token (prompt processing)
    seconds: float = 0.0  # seconds from the request to this update
    # Set on the final update: "stop" (end of text or a stop string) or "length" (max_new_tokens or a full
    # context).
    finish_reason: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token (the decode rate; the first token's wait is first_token_s)."""
        if self.first_token_s is None or self.tokens < 2 or self.seconds <= self.first_token_s:
            return None
        return (self.tokens - 1) / (self.seconds - self.first_token_s)


def message_text(content) -> str:
    """Message content as text, for the edges: Gradio and OpenAI clients may send a list of text blocks
    ([{"type": "text", "text": ...}])."""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        parts = []
        for block in content:
            if isinstance(block, dict) and block.get("type", "text") == "text":
                parts.append(str(block.get("text", "")))
            elif isinstance(block, str):
                parts.append(block)
        return "".join(parts)
    return str(content)


def plain_messages(messages) -> list[dict]:
    """Messages as an edge received them, normalised once: plain {"role", "content": str}, roles kept."""
    return [{"role": m["role"], "content": message_text(m.get("content", ""))} for m in messages or []]


def new_conversation_id() -> str:
    return uuid.uuid4().hex


def respond(backend, messages: list[dict], message: str, cfg: GenerationConfig, *, system_prompt: str | None = None,
            log: ChatLog | None = None, backend_key: str = "", conversation_id: str | None = None
            ) -> Iterator[ChatUpdate]:
    """Stream the assistant's reply to `message` after the prior `messages` (user/assistant history).

    Raises ValueError when the budget cannot fit a prompt (before anything is generated or logged) and
    lets BackendError through; a reply that failed half-way is not logged.
    """
    started = time.perf_counter()  # time to first token counts from the request, prompt building included
    history = [m for m in messages if m["role"] in ("user", "assistant")]
    turn = sum(1 for m in history if m["role"] == "user")
    conversation_id = conversation_id or new_conversation_id()
    prompt = build_prompt(backend, history + [{"role": "user", "content": message}], cfg.max_new_tokens,
                          system_prompt=system_prompt)
    raw = ""
    n_pieces = 0
    logged = False

    def write_log() -> None:
        nonlocal logged
        logged = True
        if log is not None:
            log.append_exchange(user=message, assistant=tidy(raw), conversation_id=conversation_id, turn=turn,
                                backend=backend_key or backend.name,
                                model=str(getattr(backend, "model_name", backend.name)),
                                system_prompt=system_prompt, config=_config_record(cfg))

    def update(done: bool) -> ChatUpdate:
        tokens = getattr(pieces, "n_tokens", None)
        finish = None
        if done:
            finish = "length" if getattr(pieces, "finish_reason", None) == "length" else "stop"
        return ChatUpdate(text=tidy(raw), done=done, prompt=prompt, conversation_id=conversation_id, turn=turn,
                          tokens=n_pieces if tokens is None else tokens, first_token_s=first_token_s,
                          seconds=time.perf_counter() - started, finish_reason=finish)

    first_token_s = None
    # The backend is sent the ids the budget counted; one that takes messages (a remote server applying its own
    # chat template) gets the kept messages instead.
    if backend.takes_messages:
        pieces = backend.stream_messages(list(prompt.messages), cfg)
    else:
        pieces = backend.stream(list(prompt.ids), cfg)
    failed = False
    try:
        for piece in pieces:
            if first_token_s is None:
                first_token_s = time.perf_counter() - started
            n_pieces += 1
            before = tidy(raw)
            raw += piece
            if tidy(raw) != before:
                yield update(done=False)
        write_log()  # before the final update, so a consumer that sees done=True finds the line written
        yield update(done=True)
    except Exception:  # the backend failed: no reply to keep (GeneratorExit, Ctrl-C are early stops)
        failed = True
        raise
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # stop the backend's generation now, not when its generator is collected
        if not logged and not failed:
            write_log()  # the consumer stopped early: keep the partial reply


def tidy(reply: str) -> str:
    """The reply as shown and logged: surrounding whitespace stripped."""
    return reply.strip()


def _config_record(cfg: GenerationConfig) -> dict:
    record = dataclasses.asdict(cfg)
    record["stop"] = list(cfg.stop)
    return record
