"""Past conversations from the chat log: listing, notes (hide, rename), export and import, cheap re-reading."""

from __future__ import annotations

import json

import pytest

from chatapp.conversations import ConversationIndex, ImportFileError
from gpt.chatlog import ChatLog, conversations, read_log


def log_with_two_conversations(path) -> ChatLog:
    log = ChatLog(path)
    for cid, turn, user, stamp in (("old", 0, "What is the capital of France?", "2026-11-20T10:00:00.000+00:00"),
                                   ("new", 0, "Tell me\n a  joke", "2026-11-21T09:00:00.000+00:00"),
                                   ("old", 1, "And of Japan?", "2026-11-20T10:01:00.000+00:00")):
        log.append_exchange(user=user, assistant=f"reply to {user}", conversation_id=cid, turn=turn,
                            backend="native", model="m", system_prompt="Be brief.", config={}, timestamp=stamp)
    return log


def test_conversations_are_listed_newest_first_titled_by_their_first_message(tmp_path):
    index = ConversationIndex(log_with_two_conversations(tmp_path / "log.jsonl"))
    listed = index.summaries()
    assert [(s.conversation_id, s.title, s.turns) for s in listed] == [
        ("new", "Tell me a joke", 1), ("old", "What is the capital of France?", 2)]
    assert listed[1].backend == "native" and listed[1].updated.startswith("2026-11-20T10:01")
    messages = index.get("old").messages()
    assert [m["content"] for m in messages if m["role"] == "user"] == ["What is the capital of France?",
                                                                       "And of Japan?"]


def test_rename_and_hide_are_later_log_lines_that_training_reads_past(tmp_path):
    path = tmp_path / "log.jsonl"
    index = ConversationIndex(log_with_two_conversations(path))
    before = path.read_text()
    index.rename("old", "  Capitals  ")
    index.hide("new")
    assert path.read_text().startswith(before)  # appended, nothing rewritten
    assert [(s.conversation_id, s.title) for s in index.summaries()] == [("old", "Capitals")]
    assert [s.conversation_id for s in index.summaries(include_hidden=True)] == ["new", "old"]
    index.hide("new", hidden=False)
    assert len(index.summaries()) == 2
    contents = read_log(path)  # what training reads
    assert contents.malformed == 0 and len(contents.notes) == 3
    assert sorted(c.conversation_id for c in conversations(contents)) == ["new", "old"]
    assert ChatLog(path).stats().exchanges == 3


def test_export_then_import_into_another_log_round_trips_with_feedback_and_titles(tmp_path):
    source = log_with_two_conversations(tmp_path / "a.jsonl")
    source.append_feedback(conversation_id="old", turn=1, rating=None, edited="Tokyo.")
    source.append_feedback(conversation_id="old", turn=0, rating="like")
    index = ConversationIndex(source)
    index.rename("old", "Capitals")
    data = json.loads(json.dumps(index.export()))  # through JSON, as the download is

    target = ConversationIndex(ChatLog(tmp_path / "b.jsonl"))
    result = target.import_data(data)
    assert (result.added, result.skipped, result.conversations) == (3, 0, 2)
    assert [(s.conversation_id, s.title, s.turns) for s in target.summaries()] == [
        (s.conversation_id, s.title, s.turns) for s in index.summaries()]
    old = target.get("old")
    assert old.edits == {1: "Tokyo."} and old.ratings[0] == "like"
    assert old.messages() == index.get("old").messages()

    again = target.import_data(data)  # the same file twice adds nothing
    assert (again.added, again.skipped) == (0, 3)
    assert len(read_log(tmp_path / "b.jsonl").exchanges) == 3


def test_export_of_one_conversation_and_as_markdown(tmp_path):
    index = ConversationIndex(log_with_two_conversations(tmp_path / "log.jsonl"))
    one = index.export(["old"])
    assert [c["conversation_id"] for c in one["conversations"]] == ["old"]
    text = index.markdown(["old"])
    assert text.startswith("# What is the capital of France?") and "reply to And of Japan?" in text


@pytest.mark.parametrize("text, says", [
    ("{not json", "not JSON"),
    ('{"hello": 1}', "not a nanogpt-chat export"),
    ('{"format": "nanogpt-chat conversations", "conversations": [{"conversation_id": "x", "exchanges": '
     '[{"user": "a"}]}]}', "without user, assistant and turn"),
])
def test_a_file_that_is_not_an_export_is_refused_with_a_sentence_and_nothing_is_written(tmp_path, text, says):
    path = tmp_path / "log.jsonl"
    index = ConversationIndex(ChatLog(path))
    with pytest.raises(ImportFileError, match=says):
        index.import_text(text)
    assert not path.exists() or path.read_text() == ""


def test_the_log_is_parsed_again_only_after_it_changed(tmp_path, monkeypatch):
    log = log_with_two_conversations(tmp_path / "log.jsonl")
    index = ConversationIndex(log)
    reads = []
    original = ChatLog.read
    monkeypatch.setattr(ChatLog, "read", lambda self: reads.append(1) or original(self))
    index.summaries()
    index.summaries()
    index.get("old")
    assert len(reads) == 1
    log.append_exchange(user="more", assistant="ok", conversation_id="new", turn=1, backend="native", model="m",
                        system_prompt=None, config={})
    assert index.summaries()[0].turns == 2 and len(reads) == 2
