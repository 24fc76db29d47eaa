"""A reply as every backend returns it, and its stop handling: the one matcher a reply runs.

    reply = backend.stream(prompt_ids, cfg)      # or rendered prompt text
    text = "".join(reply)
    reply.token_ids      # ids generated (an end-of-text id is not one of them)
    reply.n_tokens       # how many (a remote server's own count where it reports one)
    reply.finish_reason  # "stop" (a stop string), "eot" (end-of-text), "length" (max_new_tokens or the
                         # context was full), "closed" (the consumer stopped reading first)

Closing it (`reply.close()`, or dropping it) stops generation.

Stopping belongs to the backend: each reply runs ONE `StopMatcher` over its decoded text, with the stops of
`reply_stops` (the user's `cfg.stop` plus the chat format's own turn markers), so a caller never matches
again. A stop string may arrive split across tokens ("\\nUs" + "er:"), so text that could be the start of a
stop string is held back until it is either confirmed (cut there, and stop) or ruled out (released).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

FINISH_REASONS = ("stop", "eot", "length", "closed")


class StopMatcher:
    """Cuts a stream of text before the first (earliest-starting) occurrence of any stop string."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Feed a decoded piece; returns the text that is safe to emit now."""
        if self.stopped:
            return ""
        text = self._pending + piece
        if not self.stops:
            self._pending = ""
            return text
        cut = _first_stop(text, self.stops)
        # Where a stop string may still be forming at the end of the text: nothing from there on is safe yet.
        forming = len(text) - max(_overlap(text, s) for s in self.stops)
        if cut >= 0 and cut <= forming:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        # Either no stop yet, or one was found but a stop that starts earlier may still complete ("a" seen
        # inside a forming "Ua\n"): hold back from where that one starts and decide on more text.
        self._pending = text[forming:]
        return text[:forming]

    def flush(self) -> str:
        """At the end of generation: release what was held back, up to a stop string it holds."""
        if self.stopped:
            return ""
        text, self._pending = self._pending, ""
        cut = _first_stop(text, self.stops)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Start of the earliest stop string in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def apply_stops(pieces: Iterable[str], stops: Iterable[str], matcher: StopMatcher | None = None) -> Iterator[str]:
    """Wrap a stream of text pieces so it ends before the first stop string, which never leaks.

    Pass your own `matcher` to learn afterwards whether a stop string ended the stream (`matcher.stopped`).
    """
    matcher = matcher or StopMatcher(stops)
    for piece in pieces:
        out = matcher.push(piece)
        if out:
            yield out
        if matcher.stopped:
            return
    tail = matcher.flush()
    if tail:
        yield tail


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


def reply_stops(cfg_stop: Iterable[str], format_stops: Iterable[str] = ()) -> tuple[str, ...]:
    """A reply's stops: the user's, then the chat format's turn markers, without duplicates, in that order."""
    return tuple(dict.fromkeys((*cfg_stop, *format_stops)))


def emit_until_stop(reply: ReplyStream, pieces: Iterable[str], stops: Iterable[str]) -> Iterator[str]:
    """Pass decoded `pieces` on, ending before the first stop string (which never leaks); notes "stop"."""
    matcher = StopMatcher(stops)
    yield from apply_stops(pieces, stops, matcher)
    if matcher.stopped:
        reply.finish_reason = "stop"


def check_prompt_fits(n_prompt: int, context_length: int) -> None:
    """The prompt must leave room for at least one new token (the same rule in every backend)."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty: give the model some text to continue")
    if n_prompt >= context_length:
        raise ValueError(f"the prompt has {n_prompt} tokens but the model's context holds {context_length}: "
                         f"shorten the conversation or the system prompt")
