"""What the web UI and its API share: the config, the loaded models (ModelSlots), the chat log and its index.

    service = ChatService(load_config(), "chat_history.jsonl", "smollm2")
    for update, context_length in service.stream("smollm2", [], "Hi", GenerationConfig(), None, "conv-1"):
        print(update.text)

Built once per app by chatapp/ui.py; every browser session and API call goes through the same instance.
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from backends import GenerationConfig
from backends.registry import generation_defaults
from chatapp.chat import respond
from chatapp.conversations import ConversationIndex
from chatapp.history import ChatLog, ChatLogError
from chatapp.model_slot import ModelSlots
from chatapp.ui_controls import stats_text

GENERATE = "generate"  # concurrency group shared by the UI's replies and the /chat API
GENERATE_LIMIT = 8  # replies streamed at once; one loaded model serves them all


class ChatService:
    """What the UI and the API share: the config, the loaded models, the chat log."""

    def __init__(self, config: dict, log_path, default_backend: str | None = None):
        app = config.get("app") or {}
        self.config = config
        self.slots = ModelSlots(config)
        self.default_backend = default_backend or app.get("default_backend") or self.slots.keys()[0]
        self.slots.label(self.default_backend)  # raises BackendError for an unknown key
        self.system_prompt = app.get("system_prompt") or ""
        self.ready_threshold = int(app.get("ready_for_finetune", 10))
        self.log = ChatLog(log_path)
        self.log_path = log_path
        self.conversations = ConversationIndex(self.log)
        self.generation = self.generation_defaults(self.default_backend)

    def generation_defaults(self, key: str) -> GenerationConfig:
        """The settings backend `key` starts with: backends.registry.generation_defaults for this config."""
        return generation_defaults(self.config, key)

    def stream(self, key: str, history: list[dict], message: str, cfg, system_prompt: str | None,
               conversation_id: str) -> Iterator[tuple]:
        """(ChatUpdate, context_length) pairs of one reply; the exchange is logged by `respond`."""
        with self.slots.use(key) as backend:
            for update in respond(backend, history, message, cfg, system_prompt=system_prompt or None,
                                  log=self.log, backend_key=key, conversation_id=conversation_id):
                yield update, backend.context_length

    def stats_text(self) -> str:
        try:
            return stats_text(self.log.stats(self.ready_threshold), self.log_path, self.ready_threshold)
        except ChatLogError as exc:
            return str(exc)


def user_error(exc: Exception) -> gr.Error:
    """An exception a user caused, as the sentence the page shows."""
    return gr.Error(str(exc), print_exception=False)
