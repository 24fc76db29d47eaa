"""The chat loop: history + new message -> prompt within budget -> streamed reply -> chat log.

    for update in respond(backend, history, "What is 2+2?", GenerationConfig(), system_prompt="Be brief.",
                          log=ChatLog("chat_history.jsonl"), backend_key="smollm2"):
        show(update.text)            # the tidied reply so far; update.done on the last one

The web UI and the console chat both use `respond`. Prompt formats come from the backend (`format_chat`,
which escapes role markers and special tokens a user types); the reply is tidied here: cut where the model
starts a turn of its own (the backend's role markers and the config's stop strings), and stripped. Each
exchange is logged exactly once: when the reply is complete, or - if the consumer stops iterating early -
with the partial reply when the generator is closed.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from backends.base import GenerationConfig
from backends.native import serving_capacity
from backends.stops import StopMatcher
from chatapp.budget import Prompt, build_prompt
from chatapp.history import ChatLog
from gpt.chat_format import message_text

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
    tokens: int = 0  # tokens generated so far (the backend's count, else the final reply encoded once)
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


def new_conversation_id() -> str:
    return uuid.uuid4().hex


def reply_stops(backend, cfg: GenerationConfig) -> tuple[str, ...]:
    """The config's stop strings plus the backend's role markers, without duplicates, in that order."""
    return tuple(dict.fromkeys((*cfg.stop, *backend.role_markers)))


def respond(backend, messages: list[dict], message: str, cfg: GenerationConfig, *, system_prompt: str | None = None,
            log: ChatLog | None = None, backend_key: str = "", conversation_id: str | None = None
            ) -> Iterator[ChatUpdate]:
    """Stream the assistant's reply to `message` after the prior `messages` (user/assistant history).

    Raises ValueError when the budget cannot fit a prompt (before anything is generated or logged) and
    lets BackendError through; a reply that failed half-way is not logged.
    """
    started = time.perf_counter()  # time to first token counts from the request, prompt building included
    history = [{"role": m["role"], "content": message_text(m.get("content", ""))}
               for m in messages if m.get("role") in ("user", "assistant")]
    message = message_text(message)
    turn = sum(1 for m in history if m["role"] == "user")
    conversation_id = conversation_id or new_conversation_id()
    prompt = build_prompt(backend, history + [{"role": "user", "content": message}], cfg.max_new_tokens,
                          system_prompt=system_prompt)
    run_cfg = dataclasses.replace(cfg, stop=reply_stops(backend, cfg))
    # The backend honours the stops itself; matching them again here guards the reply against a backend
    # that does not, and holds back a half-arrived marker so shown text only ever grows.
    matcher = StopMatcher(run_cfg.stop)
    raw = ""
    logged = False

    def write_log() -> None:
        nonlocal logged
        logged = True
        if log is not None:
            log.append_exchange(user=message, assistant=tidy(raw), conversation_id=conversation_id, turn=turn,
                                backend=backend_key or backend.name,
                                model=str(getattr(backend, "model_name", backend.name)),
                                system_prompt=system_prompt, config=_config_record(run_cfg))

    def update(done: bool) -> ChatUpdate:
        # A backend's stream counts its tokens where it can (its ids; a remote server's usage); otherwise the
        # reply is encoded once, at the end.
        tokens = getattr(pieces, "n_tokens", None)
        if tokens is None:
            tokens = len(backend.encode(raw)) if done and raw else 0
        finish = None
        if done:
            reason = "stop" if matcher.stopped else getattr(pieces, "finish_reason", None)
            finish = "length" if reason == "length" else "stop"
        return ChatUpdate(text=tidy(raw), done=done, prompt=prompt, conversation_id=conversation_id, turn=turn,
                          tokens=tokens, first_token_s=first_token_s, seconds=time.perf_counter() - started,
                          finish_reason=finish)

    first_token_s = None
    # A backend that takes messages (a remote server applying its own chat template) gets the kept messages;
    # the budget counted their rendering all the same.
    if getattr(backend, "takes_messages", False):
        pieces = backend.stream_messages(list(prompt.messages), run_cfg)
    else:
        pieces = backend.stream(prompt.text, run_cfg)
    failed = False
    try:
        for piece in pieces:
            if first_token_s is None:
                first_token_s = time.perf_counter() - started
            shown = matcher.push(piece)
            if shown:
                before = tidy(raw)
                raw += shown
                if tidy(raw) != before:
                    yield update(done=False)
            if matcher.stopped:
                break
        raw += matcher.flush()
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
