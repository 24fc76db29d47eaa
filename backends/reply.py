"""What both backends share once tokens come out of a model: the reply stream and its stop handling.

`ReplyStream` is what `backend.stream(prompt, cfg)` returns: an iterator of raw text pieces that also
records the ids it generated and why it ended, so callers (and tests) can see it obeyed `max_new_tokens`:

    reply = backend.stream(prompt, cfg)
    text = "".join(reply)
    reply.token_ids      # ids generated (an end-of-text id is not one of them)
    reply.finish_reason  # "stop" (a stop string), "eot" (end-of-text), "length" (max_new_tokens or the
                         # context was full), "closed" (the consumer stopped reading first)

Closing it (`reply.close()`, or dropping it) stops generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from backends.base import GenerationConfig
from backends.stops import StopMatcher, apply_stops

FINISH_REASONS = ("stop", "eot", "length", "closed")


class ReplyStream(Iterator[str]):
    def __init__(self, make_pieces: Callable[[ReplyStream], Iterator[str]]):
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._pieces = make_pieces(self)

    def __iter__(self) -> ReplyStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        if self.finish_reason is None:
            self.finish_reason = "closed"

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def emit_until_stop(reply: ReplyStream, pieces: Iterable[str], stops: Iterable[str]) -> Iterator[str]:
    """Pass decoded `pieces` on, ending before the first stop string (which never leaks); notes "stop"."""
    matcher = StopMatcher(stops)
    yield from apply_stops(pieces, stops, matcher)
    if matcher.stopped:
        reply.finish_reason = "stop"


def as_generation_config(cfg) -> GenerationConfig:
    """A GenerationConfig from one, a dict of its fields, or None (the defaults); bad values raise ValueError."""
    if cfg is None:
        return GenerationConfig()
    if isinstance(cfg, GenerationConfig):
        return cfg
    if isinstance(cfg, dict):
        unknown = sorted(set(cfg) - set(GenerationConfig.field_names()))
        if unknown:
            raise ValueError(f"unknown generation setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(GenerationConfig.field_names())}")
        return GenerationConfig(**cfg)
    raise TypeError(f"cfg must be a GenerationConfig or a dict of its fields, got {type(cfg).__name__}")


def check_prompt_fits(n_prompt: int, context_length: int) -> None:
    """The prompt must leave room for at least one new token (the same rule in every backend)."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty: give the model some text to continue")
    if n_prompt >= context_length:
        raise ValueError(f"the prompt has {n_prompt} tokens but the model's context holds {context_length}: "
                         f"shorten the conversation or the system prompt")
