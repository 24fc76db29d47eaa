"""The chat log's records and its reader, shared by the app (which writes it) and training (which reads it).

`chat_history.jsonl` is append-only, one JSON object per line:
- an exchange: {"timestamp", "user", "assistant", "conversation_id", "turn", "backend", "model",
  "system_prompt", "config"}; the older format {"timestamp", "user", "assistant"} is read too;
- feedback on an exchange, written later: {"type": "feedback", "conversation_id", "turn", "rating",
  "edited", "timestamp"} with rating "like", "dislike" or null and `edited` the corrected reply or null;
- a note on a whole conversation, written later by the app's conversation list: {"type": "conversation",
  "conversation_id", "hidden" (true: hidden from the list; false: shown again), "title" (a new name),
  "timestamp"}; a key that is absent or null leaves that property as it was. Notes change what the app
  lists, never the exchanges: training reads conversations the same with or without them.

Readers skip and count malformed lines; they never fail on one. Writing (with a file lock) lives in
chatapp/history.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

RATINGS = ("like", "dislike")


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
