"""Stop strings on decoded text: the one implementation both backends use.

A stop string may arrive split across tokens ("\\nUs" + "er:"), so text that could be the start of a stop
string is held back until it is either confirmed (cut there, and stop) or ruled out (released).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


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
