"""The chat log: `chat_history.jsonl`, written safely by many sessions (threads or processes) at once.

    log = ChatLog("chat_history.jsonl")
    log.append_exchange(user="Hi", assistant="Hello!", conversation_id="c1", turn=0, backend="smollm2",
                        model="SmolLM2-135M-Instruct", system_prompt="You are helpful.", config={...})
    log.append_feedback(conversation_id="c1", turn=0, rating="like")
    log.append_note(conversation_id="c1", title="Greetings")      # or hidden=True: gone from the app's list
    log.read()    # gpt.chatlog.LogContents: exchanges, feedback, malformed (count of skipped lines)
    log.stats()   # LogStats: conversations, exchanges, liked, disliked, malformed, ready_for_finetune

The record schema and the reader live in gpt/chatlog.py (training reads the log through it). Every line is
written with ONE os.write on an O_APPEND descriptor while holding an exclusive flock, so lines from
concurrent writers never interleave or tear; os.write leaves no user-space buffer, so each line reaches the
file as soon as it is appended. A last line left without its newline (a crash, a full disk) is ended before
the next append, so it never fuses with a good line. The file is created private (0600). Readers take a
shared lock, so they never see half a line, and parse only what was appended since their last read.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gpt.chatlog import RATINGS, LogContents, conversations, read_lines

try:
    import fcntl
except ImportError:  # Windows: no flock; the in-process lock below still orders this process's threads
    fcntl = None

_THREAD_LOCK = threading.Lock()


class ChatLogError(OSError):
    """The chat log cannot be read or written; the message says what to do."""


@dataclass
class LogStats:
    conversations: int
    exchanges: int
    liked: int
    disliked: int
    malformed: int
    ready_for_finetune: bool


def utc_timestamp() -> str:
    """Now as ISO-8601 in UTC, e.g. 2026-11-21T22:12:27.123+00:00."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _ends_with_newline(fd: int) -> bool:
    """True if the file is empty or its last byte is a newline (call under the write lock)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return True
    os.lseek(fd, size - 1, os.SEEK_SET)  # O_APPEND still sends the write to the end
    return os.read(fd, 1) == b"\n"


@dataclass
class _ReadCache:
    identity: tuple[int, int]  # (device, inode): a replaced file starts a new cache
    offset: int = 0  # bytes of complete lines parsed so far
    lines: int = 0
    contents: LogContents = field(default_factory=LogContents)


class ChatLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._cache: _ReadCache | None = None
        self._cache_lock = threading.Lock()
        self._stats: tuple | None = None  # (file key, LogStats) of the last stats() call

    def check_writable(self) -> None:
        """Raise ChatLogError now (e.g. at start-up) if appending would fail later."""
        self._write(b"")  # opens for append (creating the file), writes nothing

    def readable_by_others(self) -> bool:
        """True if the log exists and its mode lets other accounts read it (a log from an older version)."""
        try:
            return os.name == "posix" and bool(self.path.stat().st_mode & 0o044)
        except OSError:
            return False

    def append_exchange(self, *, user: str, assistant: str, conversation_id: str, turn: int, backend: str,
                        model: str, system_prompt: str | None, config: dict, timestamp: str | None = None) -> dict:
        """Append one exchange (stamped now, or with an imported exchange's own `timestamp`); returns it."""
        record = {"timestamp": timestamp or utc_timestamp(), "user": user, "assistant": assistant,
                  "conversation_id": conversation_id, "turn": turn, "backend": backend, "model": model,
                  "system_prompt": system_prompt, "config": config}
        self._append_line(record)
        return record

    def append_feedback(self, *, conversation_id: str, turn: int, rating: str | None,
                        edited: str | None = None) -> dict:
        """Append feedback on an earlier exchange: rating "like", "dislike" or None, and/or an edited reply."""
        if rating not in (*RATINGS, None):
            raise ValueError(f"rating must be 'like', 'dislike' or None, got {rating!r}")
        record = {"type": "feedback", "conversation_id": conversation_id, "turn": turn, "rating": rating,
                  "edited": edited, "timestamp": utc_timestamp()}
        self._append_line(record)
        return record

    def append_note(self, *, conversation_id: str, hidden: bool | None = None, title: str | None = None) -> dict:
        """Append a note on a whole conversation: hide it from the list (or show it again), or rename it."""
        record = {"type": "conversation", "conversation_id": conversation_id, "hidden": hidden, "title": title,
                  "timestamp": utc_timestamp()}
        self._append_line(record)
        return record

    def read(self) -> LogContents:
        """Every record; malformed lines are skipped and counted. A log that does not exist yet is empty.

        Only the bytes appended since the last call are parsed (the lines before are kept from then), so
        polling a large log costs what it grew by. A file that was replaced (a new file renamed over it, as
        editors and atomic rewrites do) or that shrank is read afresh; one edited in place without
        shrinking is seen as it was until the app restarts.
        """
        try:
            with open(self.path, "rb") as f:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # no writer is half-way through a line
                try:
                    return self._read_new(f)
                finally:
                    if fcntl is not None:
                        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        except FileNotFoundError:
            return LogContents()
        except OSError as e:
            raise ChatLogError(f"Cannot read the chat log {self.path} ({e.strerror or e}): pass --history with "
                               f"the path of a readable JSONL file.") from None

    def _read_new(self, f) -> LogContents:
        st = os.fstat(f.fileno())
        with self._cache_lock:
            cache = self._cache
            if cache is None or cache.identity != (st.st_dev, st.st_ino) or st.st_size < cache.offset:
                cache = self._cache = _ReadCache((st.st_dev, st.st_ino))
            f.seek(cache.offset)
            data = f.read()
            end = data.rfind(b"\n") + 1  # complete lines are cached; a torn last line is read each time
            if end:
                lines = data[:end].decode("utf-8", errors="replace").split("\n")[:-1]
                read_lines(lines, first_line=cache.lines + 1, into=cache.contents)
                cache.offset += end
                cache.lines += len(lines)
            c = cache.contents
            out = LogContents(exchanges=list(c.exchanges), feedback=list(c.feedback), notes=list(c.notes),
                              malformed=c.malformed)
            tail_line = cache.lines + 1
        return read_lines([data[end:].decode("utf-8", errors="replace")], first_line=tail_line, into=out)

    def stats(self, ready_threshold: int = 10) -> LogStats:
        """Counts for the UI; ready_for_finetune once the log holds `ready_threshold` exchanges.

        Cached by the file's identity, size and modification time: an unchanged log is not read again.
        """
        try:
            st = os.stat(self.path)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, ready_threshold)
        except OSError:
            key = None
        cached = self._stats
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        contents = self.read()
        groups = conversations(contents)
        ratings = [rating for conversation in groups for rating in conversation.ratings.values()]
        stats = LogStats(conversations=len(groups), exchanges=len(contents.exchanges),
                         liked=ratings.count("like"), disliked=ratings.count("dislike"),
                         malformed=contents.malformed, ready_for_finetune=len(contents.exchanges) >= ready_threshold)
        self._stats = (key, stats)
        return stats

    def _append_line(self, record: dict) -> None:
        # ASCII-only JSON: no raw newline can end up inside a line, and lone surrogates still encode.
        self._write((json.dumps(record, ensure_ascii=True) + "\n").encode("ascii"))

    def _write(self, data: bytes) -> None:
        try:
            # 0600: the log holds every conversation; other local accounts have no business reading it.
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise ChatLogError(self._write_problem(e)) from None
        try:
            with _THREAD_LOCK if fcntl is None else nullcontext():
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if data and not _ends_with_newline(fd):
                    # A torn last line (a crash mid-write, a full disk, an editor) would fuse with this one
                    # and lose both: end it first, so it stays one malformed line on its own.
                    data = b"\n" + data
                view = memoryview(data)
                while view:  # a regular file takes the whole line at once; loop only on a short write
                    view = view[os.write(fd, view):]
        except OSError as e:
            raise ChatLogError(self._write_problem(e)) from None
        finally:
            os.close(fd)  # closing the descriptor also releases the flock

    def _write_problem(self, e: OSError) -> str:
        if not self.path.parent.is_dir():
            return (f"Cannot write the chat log: the folder {self.path.parent} does not exist; create it or pass "
                    f"--history with another path.")
        if self.path.is_dir():
            return f"Cannot write the chat log: {self.path} is a folder; pass --history with a file path."
        return (f"Cannot write the chat log {self.path} ({e.strerror or e}): pass --history with a writable "
                f"file path.")

