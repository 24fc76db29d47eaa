"""Limits: [app] settings bound message, history, system prompt and stop list, each refusal one sentence."""

from __future__ import annotations

import pytest

from chatapp.limits import Limits

SMALL = Limits(max_message_chars=10, max_history_messages=3, max_history_chars=12, max_system_prompt_chars=5,
               max_stop_strings=2, max_stop_chars=4)


def _messages(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


@pytest.mark.parametrize("message, history, system, stop, sentence", [
    ("x" * 11, [], "", (), "Your message has 11 characters, over the limit of 10: shorten it (the limit is "
                           "max_message_chars in [app] of the app config)."),
    ("hi", _messages("a", "b", "c", "d"), "", (), "The history has 4 messages, over the limit of 3"),
    ("hi", _messages("aaaaaaa", "bbbbbb"), "", (),
     "The history has 13 characters, over the limit of 12"),
    ("hi", [], "system", (), "The system prompt has 6 characters, over the limit of 5"),
    ("hi", [], "", ("a", "b", "c"), "The stop list has 3 strings, over the limit of 2"),
    ("hi", [], "", ("abcde",), "A stop string has 5 characters, over the limit of 4"),
])
def test_each_limit_refuses_with_one_sentence_naming_its_setting(message, history, system, stop, sentence):
    with pytest.raises(ValueError) as info:
        SMALL.check(message, history, system, stop)
    assert str(info.value).startswith(sentence) and "\n" not in str(info.value)


def test_inputs_at_the_limits_pass():
    SMALL.check("x" * 10, _messages("aaaa", "bbbb", "cccc"), "sssss", ("abcd", "efgh"))
    SMALL.check("x", [], None, ())


def test_the_page_keeps_the_newest_messages_within_the_history_limits():
    history = _messages("11111", "22222", "33333", "44444", "5")
    assert [m["content"] for m in SMALL.recent(history)] == ["33333", "44444", "5"]  # the newest 3
    assert [m["content"] for m in SMALL.recent(_messages("a", "bbbbbbb", "cccccc"))] == ["cccccc"]  # 12 chars
    assert [m["content"] for m in SMALL.recent(_messages("a", "b", "c", "d"))] == ["b", "c", "d"]
    assert SMALL.recent([]) == []


def test_config_values_and_defaults():
    assert Limits.from_config({}) == Limits() and Limits().max_message_chars == 20_000
    assert Limits.from_config({"app": {"max_stop_strings": 4}}).max_stop_strings == 4
    for bad in ("big", 0, 2.5, True):
        with pytest.raises(ValueError, match=r"\[app\] max_stop_chars in the config must be a whole number >= 1"):
            Limits.from_config({"app": {"max_stop_chars": bad}})
