"""The chat log, all of it: its record schema, the writer, the reader, and its stats (and their formatting).

    log = ChatLog("chat_history.jsonl")
    log.append_exchange(user="Hi", assistant="Hello!", conversation_id="c1", turn=0, backend="smollm2",
                        model="SmolLM2-135M-Instruct", system_prompt="You are helpful.", config={...})
    log.append_feedback(conversation_id="c1", turn=0, rating="like")
    log.append_note(conversation_id="c1", title="Greetings")      # or hidden=True: gone from the app's list
    log.read()                    # LogContents: exchanges, feedback, notes, malformed (count of skipped lines)
    conversations(log.read())     # Conversation per id: exchanges in turn order, latest ratings and edits
    log.stats(10).markdown(log.path)   # LogStats: counts, as the web page, the console and /stats show them

It lives in gpt/ because both the app (which writes it) and training (which must not import chatapp/) read it.

`chat_history.jsonl` is append-only, one JSON object per line:
- an exchange: {"timestamp", "user", "assistant", "conversation_id", "turn", "backend", "model",
  "system_prompt", "config"}; the older format {"timestamp", "user", "assistant"} is read too;
- feedback on an exchange, written later: {"type": "feedback", "conversation_id", "turn", "rating",
  "edited", "timestamp"} with rating "like", "dislike" or null and `edited` the corrected reply or null;
- a note on a whole conversation, written later by the app's conversation list: {"type": "conversation",
  "conversation_id", "hidden" (true: hidden from the list; false: shown again), "title" (a new name),
  "timestamp"}; a key that is absent or null leaves that property as it was. Notes change what the app
  lists, never the exchanges: training reads conversations the same with or without them.

Readers skip and count malformed lines; they never fail on one. Every line is written with ONE os.write on
an O_APPEND descriptor while holding an exclusive flock, so lines from concurrent writers (threads or
processes) never interleave or tear; os.write leaves no user-space buffer, so each line reaches the file as
soon as it is appended. A last line left without its newline (a crash, a full disk) is ended before the
next append, so it never fuses with a good line. The file is created private (0600). Readers take a shared
lock, so they never see half a line, and `ChatLog.read` parses only what was appended since its last read.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the in-process lock below still orders this process's threads
    fcntl = None

RATINGS = ("like", "dislike")
_THREAD_LOCK = threading.Lock()

# --- the records and the reader ---------------------------------------------------------------------------
@dataclass
class Exchange:
    user: str
    assistant: str
    conversation_id: str
    turn: int
    timestamp: str | None = None
    backend: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    config: dict | None = None
    line: int = 0  # 1-based line number in the log: later lines supersede earlier ones


@dataclass
class Feedback:
    conversation_id: str
    turn: int
    rating: str | None = None
    edited: str | None = None
    timestamp: str | None = None
    line: int = 0


@dataclass
class ConversationNote:
    conversation_id: str
    hidden: bool | None = None
    title: str | None = None
    timestamp: str | None = None
    line: int = 0


@dataclass
class LogContents:
    exchanges: list[Exchange] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)
    malformed: int = 0
    notes: list[ConversationNote] = field(default_factory=list)


@dataclass
class Conversation:
    conversation_id: str
    system_prompt: str | None
    exchanges: list[Exchange]
    ratings: dict[int, str | None]  # turn -> the latest rating
    edits: dict[int, str]  # turn -> the latest edited reply

    def messages(self) -> list[dict]:
        """The conversation as chat messages, edits applied (what the assistant should have said)."""
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for ex in self.exchanges:
            out.append({"role": "user", "content": ex.user})
            out.append({"role": "assistant", "content": self.edits.get(ex.turn, ex.assistant)})
        return out


def parse_record(obj, line_number: int) -> Exchange | Feedback | ConversationNote:
    """One decoded JSON line as a record; raises ValueError if it is not one."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("type") == "conversation":
        hidden, title = obj.get("hidden"), obj.get("title")
        if not isinstance(obj.get("conversation_id"), str) or not (hidden is None or isinstance(hidden, bool)) \
                or not (title is None or isinstance(title, str)):
            raise ValueError("bad conversation note")
        return ConversationNote(obj["conversation_id"], hidden, title, obj.get("timestamp"), line_number)
    if obj.get("type") == "feedback":
        rating = obj.get("rating")
        edited = obj.get("edited")
        if rating not in (*RATINGS, None) or not isinstance(obj.get("conversation_id"), str) \
                or not isinstance(obj.get("turn"), int) or not (edited is None or isinstance(edited, str)):
            raise ValueError("bad feedback record")
        return Feedback(obj["conversation_id"], obj["turn"], rating, edited, obj.get("timestamp"), line_number)
    user, assistant = obj.get("user"), obj.get("assistant")
    if not isinstance(user, str) or not isinstance(assistant, str):
        raise ValueError("an exchange needs string 'user' and 'assistant'")
    conversation_id = obj.get("conversation_id")
    turn = obj.get("turn", 0)
    if conversation_id is None:  # the older format: each line stands alone
        conversation_id = f"legacy-{line_number}"
    if not isinstance(conversation_id, str) or not isinstance(turn, int) or isinstance(turn, bool):
        raise ValueError("bad conversation_id or turn")
    config = obj.get("config")
    return Exchange(user=user, assistant=assistant, conversation_id=conversation_id, turn=turn,
                    timestamp=obj.get("timestamp"), backend=obj.get("backend"), model=obj.get("model"),
                    system_prompt=obj.get("system_prompt"), config=config if isinstance(config, dict) else None,
                    line=line_number)


def read_lines(lines: Iterable[str], first_line: int = 1, into: LogContents | None = None) -> LogContents:
    """Parse `lines` (numbered from `first_line`) into `into` (a new LogContents if None) and return it."""
    contents = LogContents() if into is None else into
    for number, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        try:
            record = parse_record(json.loads(line), number)
        except ValueError:  # json.JSONDecodeError is a ValueError
            contents.malformed += 1
            continue
        if isinstance(record, ConversationNote):
            contents.notes.append(record)
        else:
            (contents.feedback if isinstance(record, Feedback) else contents.exchanges).append(record)
    return contents


def read_log(path: str | Path) -> LogContents:
    """Every record of the log at `path`. A missing file raises FileNotFoundError."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return read_lines(f)


def conversations(contents: LogContents) -> list[Conversation]:
    """Exchanges grouped by conversation (in turn order) with the latest feedback per turn.

    A regenerated reply is logged again under the same conversation and turn: the latest line wins, and
    feedback given before it (on the reply it replaced) no longer applies.
    """
    latest: dict[tuple[str, int], Exchange] = {}
    for ex in contents.exchanges:
        key = (ex.conversation_id, ex.turn)
        if key not in latest or ex.line >= latest[key].line:
            latest[key] = ex
    groups: dict[str, list[Exchange]] = {}
    for ex in latest.values():
        groups.setdefault(ex.conversation_id, []).append(ex)
    ratings: dict[tuple[str, int], str | None] = {}
    edits: dict[tuple[str, int], str] = {}
    for fb in sorted(contents.feedback, key=lambda f: f.line):
        key = (fb.conversation_id, fb.turn)
        if key in latest and fb.line < latest[key].line:
            continue
        if fb.rating is not None or fb.edited is None:
            ratings[key] = fb.rating
        if fb.edited is not None:
            edits[key] = fb.edited
    out = []
    for cid, exchanges in groups.items():
        exchanges = sorted(exchanges, key=lambda e: e.turn)
        out.append(Conversation(
            conversation_id=cid, system_prompt=exchanges[0].system_prompt, exchanges=exchanges,
            ratings={e.turn: ratings.get((cid, e.turn)) for e in exchanges},
            edits={e.turn: edits[(cid, e.turn)] for e in exchanges if (cid, e.turn) in edits}))
    return out


# --- the writer and the stats ----------------------------------------------------------------------------

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
    threshold: int = 10  # exchanges that make the log ready for fine-tuning

    def as_dict(self) -> dict:
        """The counts as the /stats API returns them."""
        return {k: v for k, v in asdict(self).items() if k != "threshold"}

    def markdown(self, log_path) -> str:
        """The web page's stats panel."""
        ready = "**yes**" if self.ready_for_finetune else f"not yet (at {self.threshold} exchanges)"
        lines = [f"**Chat log** `{Path(log_path).name}`",
                 f"- {_count(self.exchanges, 'exchange')} logged in {_count(self.conversations, 'conversation')}",
                 f"- {self.liked} liked · {self.disliked} disliked",
                 f"- ready for fine-tune: {ready}"]
        if self.malformed:
            lines.append(f"- {_count(self.malformed, 'unreadable line')} skipped")
        return "\n".join(lines)

    def line(self, log_path) -> str:
        """The console's one line."""
        ready = "yes" if self.ready_for_finetune else f"not yet (needs {self.threshold} exchanges)"
        return (f"Chat log {log_path}: {self.conversations} conversations, {self.exchanges} exchanges "
                f"({self.liked} liked, {self.disliked} disliked), {self.malformed} malformed lines; "
                f"ready for fine-tuning: {ready}.")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
                         malformed=contents.malformed, ready_for_finetune=len(contents.exchanges) >= ready_threshold,
                         threshold=ready_threshold)
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

