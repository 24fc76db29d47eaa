"""Size limits on what a caller may send, read from [app] of configs/app.toml and enforced before any work.

    limits = Limits.from_config(load_config())   # ValueError naming the [app] key if one is not a count
    limits.check(message, history, system_prompt, stop)   # ValueError: one sentence saying what to shorten
    limits.recent(history)   # the newest messages within the history limits (the web page's long chats)

The web UI and the /chat API both go through ChatService.stream, which checks these first: a refused
request loads no model, tokenizes nothing and writes nothing to the chat log. The defaults suit a chat app
on one machine; docs/security.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    max_message_chars: int = 20_000  # one message: a long document pasted in still fits
    max_history_messages: int = 200  # earlier messages sent with a /chat call
    max_history_chars: int = 200_000  # their characters in total
    max_system_prompt_chars: int = 8_000
    max_stop_strings: int = 16
    max_stop_chars: int = 200  # each stop string

    @classmethod
    def from_config(cls, config: dict) -> Limits:
        """The [app] limits (missing keys keep the defaults); ValueError for a value that is not a count."""
        app = config.get("app") or {}
        values = {}
        for f in fields(cls):
            value = app.get(f.name, f.default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"[app] {f.name} in the config must be a whole number >= 1, got {value!r}: "
                                 f"fix it or remove it for the default ({f.default}).")
            values[f.name] = value
        return cls(**values)

    def check(self, message: str, history: list[dict], system_prompt: str | None, stop) -> None:
        """Raise ValueError with one sentence if any input is over its limit (history: plain messages)."""
        _under(len(message), self.max_message_chars, "Your message", "max_message_chars")
        _under(len(history), self.max_history_messages, "The history", "max_history_messages", unit="messages")
        total = sum(len(m["content"]) for m in history)
        _under(total, self.max_history_chars, "The history", "max_history_chars")
        _under(len(system_prompt or ""), self.max_system_prompt_chars, "The system prompt",
               "max_system_prompt_chars")
        _under(len(stop), self.max_stop_strings, "The stop list", "max_stop_strings", unit="strings")
        for s in stop:
            _under(len(s), self.max_stop_chars, "A stop string", "max_stop_chars")


    def recent(self, history: list[dict]) -> list[dict]:
        """The newest messages of `history` within the history limits (the web page's own conversation).

        A long chat in the browser keeps going: its oldest turns, which the prompt budget would drop for
        the model's context anyway, are left out instead of the reply being refused.
        """
        kept, chars = [], 0
        for m in reversed(history[-self.max_history_messages:]):
            chars += len(m["content"])
            if chars > self.max_history_chars:
                break
            kept.append(m)
        return kept[::-1]


def _under(size: int, limit: int, what: str, key: str, unit: str = "characters") -> None:
    if size > limit:
        raise ValueError(f"{what} has {size:,} {unit}, over the limit of {limit:,}: shorten it (the limit is "
                         f"{key} in [app] of the app config).")
