"""The chat log reader (gpt/chatlog.py): what training and the stats panel see of the JSONL log."""

from __future__ import annotations

import json

from gpt.chatlog import conversations, read_lines


def _lines(*records) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


def _exchange(cid, turn, user, assistant, **extra):
    return {"timestamp": "2026-11-21T00:00:00Z", "user": user, "assistant": assistant, "conversation_id": cid,
            "turn": turn, **extra}


def test_malformed_lines_are_skipped_and_counted_never_raised():
    contents = read_lines(_lines(_exchange("c", 0, "hi", "hello"), "{not json", "[1, 2]",
                                 {"user": 3, "assistant": "x"}, {"type": "feedback", "turn": "one"}, "   "))
    assert len(contents.exchanges) == 1
    assert contents.malformed == 4


def test_older_format_lines_are_each_their_own_conversation():
    contents = read_lines(_lines({"timestamp": "t", "user": "a", "assistant": "b"},
                                 {"timestamp": "t", "user": "c", "assistant": "d"}))
    convs = conversations(contents)
    assert [c.messages() for c in convs] == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]]


def test_turns_are_ordered_and_the_system_prompt_leads():
    contents = read_lines(_lines(_exchange("c", 1, "second", "two", system_prompt="Be brief."),
                                 _exchange("c", 0, "first", "one", system_prompt="Be brief.")))
    (conv,) = conversations(contents)
    assert [m["content"] for m in conv.messages()] == ["Be brief.", "first", "one", "second", "two"]


def test_a_regenerated_reply_replaces_the_old_one_and_old_feedback_does_not_carry_over():
    contents = read_lines(_lines(
        _exchange("c", 0, "hi", "first try"),
        {"type": "feedback", "conversation_id": "c", "turn": 0, "rating": "dislike", "edited": "fixed by hand"},
        _exchange("c", 0, "hi", "second try"),
    ))
    (conv,) = conversations(contents)
    assert [e.assistant for e in conv.exchanges] == ["second try"]
    assert conv.ratings == {0: None} and conv.edits == {}
    assert conv.messages()[-1]["content"] == "second try"


def test_latest_feedback_wins_and_an_edit_replaces_the_reply():
    contents = read_lines(_lines(
        _exchange("c", 0, "hi", "helo"),
        {"type": "feedback", "conversation_id": "c", "turn": 0, "rating": "dislike", "edited": None},
        {"type": "feedback", "conversation_id": "c", "turn": 0, "rating": "like", "edited": None},
        {"type": "feedback", "conversation_id": "c", "turn": 0, "rating": None, "edited": "hello"},
    ))
    (conv,) = conversations(contents)
    assert conv.ratings == {0: "like"}
    assert conv.messages()[-1] == {"role": "assistant", "content": "hello"}
