"""The chat log: concurrent appends never lose or tear a line; the reader skips bad lines and reads old ones."""

from __future__ import annotations

import json
import multiprocessing
import sys
import threading
from collections import Counter
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.chatlog import ChatLog, ChatLogError, LogStats, read_log

CONFIG = {"max_new_tokens": 8, "temperature": 0.0, "stop": ["\nUser:"]}


def _append(log: ChatLog, writer: str, i: int) -> None:
    # Long, multi-line, non-ASCII content: a torn or interleaved line would not parse or would not match.
    log.append_exchange(user=f"{writer} message {i}\nUser: line two é" + "x" * (i * 37),
                        assistant=f"reply {writer}/{i} ✓" + "y" * 500, conversation_id=writer, turn=i,
                        backend="native", model="tiny", system_prompt="Be brief.", config=CONFIG)


def _expected(writers: list[str], n: int) -> Counter:
    return Counter((w, i) for w in writers for i in range(n))


def _written(path) -> Counter:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # every line ends with a newline, the last one included
    seen = Counter()
    for line in lines[:-1]:
        record = json.loads(line)  # a torn line raises here
        writer, i = record["conversation_id"], record["turn"]
        assert record["user"].startswith(f"{writer} message {i}\nUser: line two é")
        assert record["assistant"] == f"reply {writer}/{i} ✓" + "y" * 500
        seen[writer, i] += 1
    return seen


def test_eight_threads_append_exactly_the_lines_written_none_torn(tmp_path):
    path = tmp_path / "log.jsonl"
    writers = [f"thread{t}" for t in range(8)]
    barrier = threading.Barrier(len(writers))

    def work(writer):
        log = ChatLog(path)  # also shares nothing but the file between writers
        barrier.wait()
        for i in range(100):
            _append(log, writer, i)

    threads = [threading.Thread(target=work, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _written(path) == _expected(writers, 100)
    assert ChatLog(path).stats().exchanges == 800


def _process_writer(path, writer, start_event):
    start_event.wait()
    log = ChatLog(path)
    for i in range(100):
        _append(log, writer, i)


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_two_processes_append_exactly_the_lines_written_none_torn(tmp_path):
    path = tmp_path / "log.jsonl"
    # Separate processes with their own descriptors; fork starts them fast (spawn would re-import torch).
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    writers = ["proc0", "proc1"]
    procs = [ctx.Process(target=_process_writer, args=(str(path), w, start)) for w in writers]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert _written(path) == _expected(writers, 100)


def test_exchange_line_has_the_design_schema_and_utc_timestamp(tmp_path):
    log = ChatLog(tmp_path / "log.jsonl")
    written = log.append_exchange(user="Hi", assistant="Hello!", conversation_id="c1", turn=0, backend="native",
                                  model="models/native/tiny", system_prompt="Be kind.", config=CONFIG)
    line = json.loads((tmp_path / "log.jsonl").read_text())
    assert line == written
    assert set(line) == {"timestamp", "user", "assistant", "conversation_id", "turn", "backend", "model",
                         "system_prompt", "config"}
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_feedback_line_and_latest_rating_per_exchange_counts(tmp_path):
    log = ChatLog(tmp_path / "log.jsonl")
    for turn in range(3):
        log.append_exchange(user=f"q{turn}", assistant=f"a{turn}", conversation_id="c1", turn=turn,
                            backend="b", model="m", system_prompt=None, config={})
    log.append_exchange(user="other", assistant="x", conversation_id="c2", turn=0, backend="b", model="m",
                        system_prompt=None, config={})
    fb = log.append_feedback(conversation_id="c1", turn=0, rating="dislike")
    assert set(fb) == {"type", "conversation_id", "turn", "rating", "edited", "timestamp"}
    log.append_feedback(conversation_id="c1", turn=0, rating="like")  # changed mind: latest wins
    log.append_feedback(conversation_id="c1", turn=1, rating="dislike", edited="a better answer")
    log.append_feedback(conversation_id="c2", turn=0, rating="like")
    contents = log.read()
    assert len(contents.exchanges) == 4 and len(contents.feedback) == 4
    assert contents.feedback[2].edited == "a better answer"
    assert log.stats() == LogStats(conversations=2, exchanges=4, liked=2, disliked=1, malformed=0,
                                   ready_for_finetune=False)
    assert log.stats(ready_threshold=4).ready_for_finetune
    with pytest.raises(ValueError, match="rating"):
        log.append_feedback(conversation_id="c1", turn=0, rating="meh")


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "log.jsonl"
    log = ChatLog(path)
    log.append_exchange(user="a", assistant="b", conversation_id="c", turn=0, backend="x", model="y",
                        system_prompt=None, config={})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"user": "torn line, no closing brace"\n')
        f.write("not json at all\n")
        f.write("[1, 2, 3]\n")
        f.write('{"user": 5, "assistant": "user is not text"}\n')
        f.write('{"type": "feedback", "conversation_id": "c", "turn": 0, "rating": "great"}\n')
        f.write("\n")  # blank lines are not records and not errors
    log.append_exchange(user="c", assistant="d", conversation_id="c", turn=1, backend="x", model="y",
                        system_prompt=None, config={})
    contents = log.read()
    assert [e.user for e in contents.exchanges] == ["a", "c"]
    assert contents.malformed == 5
    stats = log.stats()
    assert (stats.exchanges, stats.malformed, stats.conversations) == (2, 5, 1)


def test_older_format_lines_are_read_as_exchanges(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text('{"timestamp": "2024-01-02T03:04:05", "user": "Hello", "assistant": "Hi there"}\n'
                    '{"timestamp": "2024-01-02T03:05:00", "user": "Bye", "assistant": "Goodbye"}\n')
    log = ChatLog(path)
    contents = log.read()
    assert [(e.user, e.assistant, e.turn) for e in contents.exchanges] == [("Hello", "Hi there", 0), ("Bye", "Goodbye", 0)]
    assert contents.exchanges[0].timestamp == "2024-01-02T03:04:05"
    # New lines append to an old log without disturbing it.
    log.append_exchange(user="New", assistant="Line", conversation_id="n1", turn=0, backend="b", model="m",
                        system_prompt=None, config={})
    assert log.stats() == LogStats(conversations=3, exchanges=3, liked=0, disliked=0, malformed=0,
                                   ready_for_finetune=False)


def test_ready_for_finetune_uses_the_threshold_default_ten(tmp_path):
    log = ChatLog(tmp_path / "log.jsonl")
    for turn in range(10):
        assert not log.stats().ready_for_finetune
        log.append_exchange(user="q", assistant="a", conversation_id="c", turn=turn, backend="b", model="m",
                            system_prompt=None, config={})
    assert log.stats().ready_for_finetune


def test_missing_log_reads_as_empty(tmp_path):
    log = ChatLog(tmp_path / "never-written.jsonl")
    assert log.read().exchanges == [] and log.read().malformed == 0
    assert log.stats() == LogStats(0, 0, 0, 0, 0, False)


def test_log_in_a_missing_folder_fails_with_one_sentence(tmp_path):
    log = ChatLog(tmp_path / "no" / "such" / "dir" / "log.jsonl")
    with pytest.raises(ChatLogError) as info:
        log.append_exchange(user="a", assistant="b", conversation_id="c", turn=0, backend="x", model="y",
                            system_prompt=None, config={})
    message = str(info.value)
    assert "does not exist" in message and "--history" in message and "\n" not in message


def test_log_path_that_is_a_folder_fails_with_one_sentence(tmp_path):
    log = ChatLog(tmp_path)
    with pytest.raises(ChatLogError, match="is a folder"):
        log.check_writable()
    with pytest.raises(ChatLogError, match="Cannot read the chat log"):
        log.read()


def test_permission_denied_on_append_fails_with_one_sentence(tmp_path, monkeypatch):
    # Faked: these tests run as root, for whom a read-only file is still writable.
    import gpt.chatlog as history

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(history.os, "open", refuse)
    with pytest.raises(ChatLogError) as info:
        ChatLog(tmp_path / "log.jsonl").append_feedback(conversation_id="c", turn=0, rating="like")
    assert str(info.value) == (f"Cannot write the chat log {tmp_path / 'log.jsonl'} (Permission denied): pass "
                               f"--history with a writable file path.")


def test_a_torn_last_line_does_not_swallow_the_next_exchange(tmp_path):
    path = tmp_path / "log.jsonl"
    log = ChatLog(path)
    _append(log, "a", 0)
    with open(path, "ab") as f:
        f.write(b'{"timestamp": "2026-11-22", "user": "half a li')  # a crash mid-write: no newline
    _append(log, "a", 1)
    contents = ChatLog(path).read()
    assert [e.turn for e in contents.exchanges] == [0, 1] and contents.malformed == 1
    _append(log, "a", 2)  # a log that already ends with a newline gets no blank line
    assert path.read_bytes().count(b"\n\n") == 0 and len(ChatLog(path).read().exchanges) == 3


def test_the_chat_log_is_created_readable_by_its_owner_only(tmp_path):
    log = ChatLog(tmp_path / "log.jsonl")
    _append(log, "a", 0)
    assert (log.path.stat().st_mode & 0o777) == 0o600
    assert not log.readable_by_others()
    log.path.chmod(0o644)  # a log from an older version: launch.py warns about it
    assert log.readable_by_others()
    other = ChatLog(tmp_path / "checked.jsonl")
    other.check_writable()  # the start-up check creates it too
    assert (other.path.stat().st_mode & 0o777) == 0o600


def test_reading_again_parses_only_what_was_appended(tmp_path, monkeypatch):
    import gpt.chatlog as history

    path = tmp_path / "log.jsonl"
    log = ChatLog(path)
    for i in range(3):
        _append(log, "a", i)
    assert len(log.read().exchanges) == 3
    parsed = []
    real = history.read_lines
    monkeypatch.setattr(history, "read_lines", lambda lines, **kw: real(parsed.extend(lines) or lines, **kw))
    _append(log, "a", 3)
    assert [e.turn for e in log.read().exchanges] == [0, 1, 2, 3]
    assert len([line for line in parsed if line]) == 1  # only the new line was parsed
    stats = log.stats()
    parsed.clear()
    assert log.stats() == stats and parsed == []  # an unchanged log is not read at all


def test_a_log_that_was_replaced_or_cut_is_read_afresh(tmp_path):
    path = tmp_path / "log.jsonl"
    log = ChatLog(path)
    for i in range(3):
        _append(log, "a", i)
    assert len(log.read().exchanges) == 3
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0])  # cut in place: shorter than what was read
    assert len(log.read().exchanges) == 1
    replacement = tmp_path / "new.jsonl"
    replacement.write_text("".join(lines[:2]) + "not json\n")
    replacement.replace(path)  # a new file under the same name
    contents = log.read()
    assert (len(contents.exchanges), contents.malformed) == (2, 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["exchange", "feedback", "junk", "torn", "read"]), max_size=12))
def test_incremental_reads_equal_a_fresh_read_of_the_whole_file(tmp_path_factory, steps):
    path = tmp_path_factory.mktemp("inc") / "log.jsonl"
    path.touch()
    log = ChatLog(path)
    for i, step in enumerate(steps):
        if step == "exchange":
            _append(log, "c", i)
        elif step == "feedback":
            log.append_feedback(conversation_id="c", turn=max(0, i - 1), rating="like")
        elif step in ("junk", "torn"):
            with open(path, "ab") as f:
                f.write(b"{not json" + (b"\n" if step == "junk" else b""))
        else:
            log.read()
    fresh = ChatLog(path).read()
    again = log.read()
    assert (again.exchanges, again.feedback, again.malformed) == (fresh.exchanges, fresh.feedback, fresh.malformed)
    assert again.exchanges == read_log(path).exchanges  # the training reader sees the same


def test_stats_are_formatted_for_the_page_the_console_and_the_api():
    stats = LogStats(conversations=1, exchanges=1, liked=1, disliked=0, malformed=2, ready_for_finetune=False,
                     threshold=10)
    text = stats.markdown("/tmp/x/chat_history.jsonl")
    assert "1 exchange logged in 1 conversation" in text and "1 liked · 0 disliked" in text
    assert "not yet (at 10 exchanges)" in text and "2 unreadable lines skipped" in text
    assert "`chat_history.jsonl`" in text
    ready = LogStats(3, 12, 0, 0, 0, True).markdown("log.jsonl")
    assert "12 exchanges logged in 3 conversations" in ready and "ready for fine-tune: **yes**" in ready
    assert stats.line("log.jsonl") == ("Chat log log.jsonl: 1 conversations, 1 exchanges (1 liked, 0 disliked), "
                                       "2 malformed lines; ready for fine-tuning: not yet (needs 10 exchanges).")
    assert stats.as_dict() == {"conversations": 1, "exchanges": 1, "liked": 1, "disliked": 0, "malformed": 2,
                               "ready_for_finetune": False}
