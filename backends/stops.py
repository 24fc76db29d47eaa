"""Stop strings on decoded text: the one implementation both backends use.

A stop string may arrive split across tokens ("\\nUs" + "er:"), so text that could be the start of a stop
string is held back until it is either confirmed (cut there, and stop) or ruled out (released).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class StopMatcher:
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
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        hold = max((_overlap(text, s) for s in self.stops), default=0)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        """At the end of generation: whatever was held back was not a stop string after all."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


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
