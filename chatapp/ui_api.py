"""The app's named API endpoints: /chat, /stats, /backends (documented, with client examples, in docs/api.md).

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860")
    client.predict("Hello!", api_name="/chat")            # the final reply text
    for text in client.submit("Hello!", api_name="/chat"):  # the reply so far, as it streams
        print(text)

`register_api(service)` is called by chatapp/ui.py inside its Blocks; Gradio derives each endpoint's
parameters from the type hints and defaults of the functions below. A sampling argument left out (null)
takes the chosen backend's default (ChatService.generation_defaults: its entry, its model, the app's).
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from backends import BackendError
from backends.base import shown
from chatapp.chat import new_conversation_id, plain_messages
from chatapp.ui_controls import generation_config
from chatapp.ui_service import GENERATE, GENERATE_LIMIT, STATS, STATS_LIMIT, user_error
from gpt.chatlog import ChatLogError


def _refuse(sentence: str) -> gr.Error:
    return gr.Error(sentence, print_exception=False)


def _is_text(content) -> bool:
    """A string, or Gradio's list of text blocks ([{"type": "text", "text": "..."}])."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(b, str) or (isinstance(b, dict) and b.get("type", "text") == "text"
                               and isinstance(b.get("text", ""), str)) for b in content)


def _check_history(history) -> list[dict]:
    """The /chat `history` argument as plain user/assistant messages; gr.Error says what is wrong with it."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise _refuse("history must be a list of messages like {\"role\": \"user\", \"content\": \"Hi\"}.")
    for i, m in enumerate(history):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not _is_text(m.get("content")):
            raise _refuse(f"history[{i}] must be a message like {{\"role\": \"user\" or \"assistant\", "
                          f"\"content\": \"...\"}} with text content; pass the system prompt as system_prompt.")
    return plain_messages(history)


def _check_strings(backend, system_prompt) -> None:
    """The string arguments of /chat, checked by type before they are used as keys or prompt text."""
    if not isinstance(backend, str):
        raise _refuse(f"backend must be a string: one of the keys /backends lists, got {shown(backend)}.")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise _refuse(f"system_prompt must be a string (empty for none), got {shown(system_prompt)}.")


def register_api(service) -> None:
    """Add /chat, /stats and /backends to the Blocks being built (call inside `with gr.Blocks()`)."""
    def chat(message: str, history: list[dict] | None = None, backend: str = service.default_backend,
             system_prompt: str = service.system_prompt, max_new_tokens: int | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, stop: list[str] | None = None,
             seed: int | None = None) -> Iterator[str]:
        """Reply to `message` after `history`, streaming the reply so far; the call is logged as one exchange.

        Args:
            message: the user's new message.
            history: earlier messages, [{"role": "user" | "assistant", "content": str}], oldest first.
            backend: a key from /backends.
            system_prompt: instructions for the assistant; empty for none.
            max_new_tokens: the longest reply, in tokens; null (as every setting below) for the backend's default.
            temperature: 0 is greedy; higher is more varied.
            top_k: sample among the k likeliest tokens; 0 turns it off.
            top_p: sample among the likeliest tokens up to this total probability.
            repetition_penalty: above 1 makes repeating earlier tokens less likely.
            stop: strings that end the reply (not included).
            seed: the same seed gives the same reply; null for the backend's default (random unless configured).
        """
        if not isinstance(message, str) or not message.strip():
            raise _refuse("message must be a non-empty string.")
        prior = _check_history(history)
        _check_strings(backend, system_prompt)
        text = ""
        try:
            # None for a setting means the chosen backend's default; the limits are checked before any work.
            d = service.generation_defaults(backend)
            cfg = generation_config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
                                    defaults=d)
            for update, _ in service.stream(backend, prior, message, cfg, system_prompt,
                                            new_conversation_id()):
                text = update.text
                yield text
        except (BackendError, ValueError, ChatLogError) as exc:
            raise user_error(exc) from None
        yield text

    def stats() -> dict:
        """Counts of the chat log: exchanges, conversations, liked, disliked, malformed lines, readiness."""
        try:
            s = service.log.stats(service.ready_threshold)
        except ChatLogError as exc:
            raise user_error(exc) from None
        return {**s.as_dict(), "ready_threshold": s.threshold, "log": str(service.log_path)}

    def backends() -> list[dict]:
        """The configured backends: key (pass it to /chat), label, kind, whether it is the default, status."""
        out = []
        for key in service.slots.keys():
            status = service.slots.status(key)
            out.append({"key": key, "label": status.label, "kind": service.slots.kind(key),
                        "default": key == service.default_backend, "state": status.state})
        return out

    gr.api(chat, api_name="chat", concurrency_limit=GENERATE_LIMIT, concurrency_id=GENERATE)
    gr.api(stats, api_name="stats", concurrency_limit=STATS_LIMIT, concurrency_id=STATS)
    gr.api(backends, api_name="backends", concurrency_limit=None)
