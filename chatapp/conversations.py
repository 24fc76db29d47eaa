"""Past conversations from the chat log: list, reopen, hide, rename, export and import (no Gradio here).

    index = ConversationIndex(ChatLog("chat_history.jsonl"))
    index.summaries()                    # [ConversationSummary], newest first, hidden ones left out
    index.get("c1")                      # gpt.chatlog.Conversation (edits applied by .messages())
    index.hide("c1"); index.rename("c1", "Trip plans")      # later log lines; nothing is rewritten
    data = index.export(["c1"])          # {"format": EXPORT_FORMAT, "conversations": [...]}; None: all listed
    index.markdown(["c1"])               # the same as readable Markdown
    index.import_data(data)              # ImportResult(added=..., skipped=...): appends what is not there yet

The log is read again only when its size or modification time changed, so refreshing the list after every
reply costs a stat() call. Hiding and renaming are notes in the log ({"type": "conversation", ...}, see
gpt/chatlog.py); an import appends exchanges (and their likes and edits) as ordinary log lines, skipping
exchanges the log already holds, so importing the same file twice adds nothing the second time.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from gpt.chatlog import ChatLog, Conversation, LogContents, conversations, utc_timestamp

EXPORT_FORMAT = "nanogpt-chat conversations"
EXPORT_VERSION = 1
TITLE_CHARS = 60


class ImportFileError(ValueError):
    """An import file the app cannot read; the message says what to do."""


@dataclass(frozen=True)
class ConversationSummary:
    conversation_id: str
    title: str
    updated: str  # timestamp of its newest exchange ("" when the log line had none)
    turns: int
    backend: str | None  # the backend of its newest exchange
    hidden: bool


@dataclass(frozen=True)
class ImportResult:
    added: int  # exchanges appended
    skipped: int  # exchanges the log already held
    conversations: int


def title_of(text: str) -> str:
    """A one-line title: the text's whitespace collapsed, cut at TITLE_CHARS with an ellipsis."""
    line = " ".join((text or "").split()) or "(empty message)"
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


class ConversationIndex:
    def __init__(self, log: ChatLog):
        self.log = log
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._cache: tuple[LogContents, dict[str, Conversation], dict[str, dict]] | None = None

    # --- reading (cached by the log's size and mtime) ------------------------------------------------------
    def _read(self) -> tuple[LogContents, dict[str, Conversation], dict[str, dict]]:
        try:
            st = self.log.path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = (0, 0)
        with self._lock:
            if self._cache is not None and stamp == self._stamp:
                return self._cache
        contents = self.log.read()
        by_id = {c.conversation_id: c for c in conversations(contents)}
        notes: dict[str, dict] = {}
        for note in sorted(contents.notes, key=lambda n: n.line):
            state = notes.setdefault(note.conversation_id, {"hidden": False, "title": None})
            if note.hidden is not None:
                state["hidden"] = note.hidden
            if note.title is not None:
                state["title"] = note.title.strip() or None  # an empty title goes back to the first message
        with self._lock:
            self._stamp, self._cache = stamp, (contents, by_id, notes)
        return self._cache

    def summaries(self, include_hidden: bool = False) -> list[ConversationSummary]:
        """The conversations of the log, the one with the newest exchange first."""
        _, by_id, notes = self._read()
        out = []
        for cid, conv in by_id.items():
            note = notes.get(cid, {})
            if note.get("hidden") and not include_hidden:
                continue
            newest = max(conv.exchanges, key=lambda e: (e.timestamp or "", e.line))
            out.append((newest.timestamp or "", max(e.line for e in conv.exchanges), ConversationSummary(
                conversation_id=cid, title=note.get("title") or title_of(conv.exchanges[0].user),
                updated=newest.timestamp or "", turns=len(conv.exchanges), backend=newest.backend,
                hidden=bool(note.get("hidden")))))
        return [s for *_, s in sorted(out, key=lambda t: (t[0], t[1]), reverse=True)]

    def get(self, conversation_id: str) -> Conversation | None:
        return self._read()[1].get(conversation_id)

    def summary(self, conversation_id: str) -> ConversationSummary | None:
        return next((s for s in self.summaries(include_hidden=True) if s.conversation_id == conversation_id),
                    None)

    # --- notes -------------------------------------------------------------------------------------------
    def hide(self, conversation_id: str, hidden: bool = True) -> None:
        self.log.append_note(conversation_id=conversation_id, hidden=hidden)

    def rename(self, conversation_id: str, title: str) -> None:
        self.log.append_note(conversation_id=conversation_id, title=" ".join((title or "").split()))

    # --- export ------------------------------------------------------------------------------------------
    def export(self, conversation_ids: list[str] | None = None) -> dict:
        """The conversations (None: every listed one) as the app's JSON export."""
        _, by_id, notes = self._read()
        ids = conversation_ids if conversation_ids is not None else \
            [s.conversation_id for s in self.summaries()]
        out = []
        for cid in ids:
            conv = by_id.get(cid)
            if conv is None:
                continue
            exchanges = [{"turn": e.turn, "user": e.user, "assistant": e.assistant, "timestamp": e.timestamp,
                          "backend": e.backend, "model": e.model, "system_prompt": e.system_prompt,
                          "config": e.config, "rating": conv.ratings.get(e.turn),
                          "edited": conv.edits.get(e.turn)} for e in conv.exchanges]
            out.append({"conversation_id": cid, "title": notes.get(cid, {}).get("title"),
                        "exchanges": exchanges})
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exported": utc_timestamp(),
                "conversations": out}

    def markdown(self, conversation_ids: list[str] | None = None) -> str:
        """The same conversations as Markdown, for reading or sharing."""
        parts = []
        for conv in self.export(conversation_ids)["conversations"]:
            title = conv["title"] or title_of(conv["exchanges"][0]["user"])
            parts.append(f"# {title}\n")
            system = conv["exchanges"][0].get("system_prompt")
            if system:
                parts.append(f"*System prompt:* {system}\n")
            for e in conv["exchanges"]:
                reply = e["edited"] if e["edited"] is not None else e["assistant"]
                when = f" · {e['timestamp'][:16].replace('T', ' ')}" if e.get("timestamp") else ""
                parts.append(f"**You**{when}\n\n{e['user']}\n\n**Assistant** ({e.get('backend') or '?'})\n\n"
                             f"{reply}\n")
        return "\n".join(parts) or "No conversations.\n"

    # --- import ------------------------------------------------------------------------------------------
    def import_data(self, data) -> ImportResult:
        """Append the exchanges of an export that the log does not hold yet; raises ImportFileError if unreadable."""
        convs = _check_export(data)
        _, by_id, notes = self._read()
        added = skipped = 0
        for conv in convs:
            cid = conv["conversation_id"]
            have = {(e.turn, e.user, e.assistant) for e in by_id[cid].exchanges} if cid in by_id else set()
            for e in sorted(conv["exchanges"], key=lambda e: e["turn"]):
                if (e["turn"], e["user"], e["assistant"]) in have:
                    skipped += 1
                    continue
                self.log.append_exchange(
                    user=e["user"], assistant=e["assistant"], conversation_id=cid, turn=e["turn"],
                    backend=e.get("backend") or "imported", model=e.get("model") or "imported",
                    system_prompt=e.get("system_prompt"), config=e.get("config") or {},
                    timestamp=e["timestamp"] if isinstance(e.get("timestamp"), str) else None)
                if e.get("rating") in ("like", "dislike") or isinstance(e.get("edited"), str):
                    self.log.append_feedback(conversation_id=cid, turn=e["turn"],
                                             rating=e.get("rating") if e.get("rating") in ("like", "dislike")
                                             else None, edited=e.get("edited"))
                added += 1
            title = conv.get("title")
            if isinstance(title, str) and title.strip() and notes.get(cid, {}).get("title") != title:
                self.rename(cid, title)
        return ImportResult(added=added, skipped=skipped, conversations=len(convs))

    def import_text(self, text: str) -> ImportResult:
        try:
            data = json.loads(text)
        except ValueError:
            raise ImportFileError("That file is not JSON: import a file the app exported with 'Export' "
                               "(JSON).") from None
        return self.import_data(data)


def _check_export(data) -> list[dict]:
    """The conversations of an export, each checked; one sentence saying what is wrong otherwise."""
    what = "import a JSON file made by this app's Export button"
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT or not isinstance(
            data.get("conversations"), list):
        raise ImportFileError(f"That file is not a nanogpt-chat export: {what}.")
    for i, conv in enumerate(data["conversations"]):
        exchanges = conv.get("exchanges") if isinstance(conv, dict) else None
        if not isinstance(conv, dict) or not isinstance(conv.get("conversation_id"), str) \
                or not isinstance(exchanges, list) or not exchanges:
            raise ImportFileError(f"Conversation {i + 1} of that file has no conversation_id or exchanges: {what}.")
        for e in exchanges:
            if not isinstance(e, dict) or not isinstance(e.get("user"), str) \
                    or not isinstance(e.get("assistant"), str) or not isinstance(e.get("turn"), int) \
                    or isinstance(e.get("turn"), bool) or not (e.get("config") is None
                                                              or isinstance(e.get("config"), dict)):
                raise ImportFileError(f"Conversation {i + 1} of that file has an exchange without user, assistant "
                                   f"and turn: {what}.")
    return data["conversations"]
