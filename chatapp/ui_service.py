"""What the web UI and its API share: the config, the loaded models (ModelSlots), the chat log and its index.

    service = ChatService(load_config(), "chat_history.jsonl", "smollm2")
    for update, context_length in service.stream("smollm2", [], "Hi", GenerationConfig(), None, "conv-1"):
        print(update.text)

Built once per app by chatapp/ui.py; every browser session and API call goes through the same instance.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from backends import GenerationConfig
from backends.registry import AppSettings
from chatapp.chat import GENERATE_LIMIT, respond
from chatapp.conversations import ConversationIndex
from chatapp.limits import Limits
from chatapp.model_slot import ModelSlots
from gpt.chatlog import ChatLog, ChatLogError

GENERATE = "generate"  # concurrency group shared by the UI's replies and the /chat API
__all__ = ["GENERATE", "GENERATE_LIMIT", "ChatService", "user_error"]
STATS = "stats"  # concurrency group of the /stats API
STATS_LIMIT = 2  # reading a large log costs CPU: a burst of /stats calls queues instead of piling up

REPLY_BUSY = "A reply is still streaming in this chat: wait for it to finish or press Stop, then try again."


class ReplyBusy(ValueError):
    """A session asked for a second reply while its first one streams."""


class ChatService:
    """What the UI and the API share: the config, the loaded models, the chat log."""

    def __init__(self, config: dict, log_path, default_backend: str | None = None):
        self.config = config
        self.settings = AppSettings(config)
        self.slots = ModelSlots(config)
        self.default_backend = default_backend or self.settings.default_backend
        self.slots.label(self.default_backend)  # raises BackendError for an unknown key
        self.system_prompt = self.settings.system_prompt
        self.ready_threshold = self.settings.ready_for_finetune
        self.log = ChatLog(log_path)
        self.log_path = log_path
        self.limits = Limits.from_config(config)
        self._streaming: set[str] = set()  # browser sessions with a reply under way
        self._streaming_lock = threading.Lock()
        self.conversations = ConversationIndex(self.log)
        self.generation = self.generation_defaults(self.default_backend)

    def generation_defaults(self, key: str) -> GenerationConfig:
        """The settings backend `key` starts with (AppSettings.generation)."""
        return self.settings.generation(key)

    def stream(self, key: str, history: list[dict], message: str, cfg, system_prompt: str | None,
               conversation_id: str, log: bool = True) -> Iterator[tuple]:
        """(ChatUpdate, context_length) pairs of one reply; the exchange is logged by `respond` if `log`.

        Checks the limits and the backend key now, before returning: a refused request (ValueError or
        BackendError, one sentence) loads no model and logs nothing.
        """
        self.limits.check(message, history, system_prompt, cfg.stop)
        self.slots.label(key)
        return self._stream(key, history, message, cfg, system_prompt, conversation_id, log)

    @contextmanager
    def one_reply(self, session: str) -> Iterator[None]:
        """Hold a session's only reply slot while its reply streams; ReplyBusy if it is taken.

        Send and Regenerate are separate events, so without this both could stream at once and log two
        replies for one turn.
        """
        with self._streaming_lock:
            if session in self._streaming:
                raise ReplyBusy(REPLY_BUSY)
            self._streaming.add(session)
        try:
            yield
        finally:
            with self._streaming_lock:
                self._streaming.discard(session)

    def _stream(self, key, history, message, cfg, system_prompt, conversation_id, log) -> Iterator[tuple]:
        with self.slots.use(key) as backend:
            for update in respond(backend, history, message, cfg, system_prompt=system_prompt or None,
                                  log=self.log if log else None, backend_key=key,
                                  conversation_id=conversation_id):
                yield update, backend.context_length

    def stats_text(self) -> str:
        try:
            return self.log.stats(self.ready_threshold).markdown(self.log_path)
        except ChatLogError as exc:
            return str(exc)


def user_error(exc: Exception) -> gr.Error:
    """An exception a user caused, as the sentence the page shows."""
    return gr.Error(str(exc), print_exception=False)
