"""The UI's settings panel values -> GenerationConfig, stop-string text, and the meter / stats texts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends import GenerationConfig
from chatapp.budget import Prompt
from chatapp.ui import turn_of
from chatapp.ui_controls import context_meter, generation_config, parse_stop_text, stop_text


@given(st.lists(st.text(min_size=1), max_size=4))
def test_stop_strings_survive_the_textbox_round_trip(stops):
    assert parse_stop_text(stop_text(tuple(stops))) == tuple(stops)


def test_stop_text_writes_newlines_as_escapes_one_string_per_line():
    assert stop_text(("\nUser:", "END")) == "\\nUser:\nEND"
    assert parse_stop_text("\\nUser:\n\nEND\n") == ("\nUser:", "END")


def test_slider_floats_become_the_integers_the_config_wants():
    cfg = generation_config(64.0, 0.5, 40.0, 0.9, 1.2, "\\n\\n", 7.0)
    assert cfg == GenerationConfig(max_new_tokens=64, temperature=0.5, top_k=40, top_p=0.9,
                                   repetition_penalty=1.2, stop=("\n\n",), seed=7)
    assert generation_config(8, 0, 0, 1.0, 1.0, "", None).top_k is None  # 0 turns top-k off
    assert generation_config(8, 0, 0, 1.0, 1.0, ["a"], None).stop == ("a",)  # the API passes a list
    assert generation_config(8, 0, 0, 1.0, 1.0, "", " 42 ").seed == 42  # the seed box is text
    assert generation_config(8, 0, 0, 1.0, 1.0, "", "").seed is None  # empty means random


@pytest.mark.parametrize("values, field", [
    ((0, 0.7, 50, 0.9, 1.1, "", None), "max_new_tokens"),
    ((8.5, 0.7, 50, 0.9, 1.1, "", None), "max_new_tokens"),
    ((8, -0.1, 50, 0.9, 1.1, "", None), "temperature"),
    ((8, 0.7, 50, 0.0, 1.1, "", None), "top_p"),
    ((8, 0.7, 50, 0.9, 0.0, "", None), "repetition_penalty"),
    ((8, 0.7, 50, 0.9, 1.1, "", 1.5), "seed"),
    ((8, 0.7, 50, 0.9, 1.1, "", "abc"), "seed must be a whole number"),
    ((8, 1e-40, 50, 0.9, 1.1, "", None), "temperature must be 0 \\(greedy\\) or a number from 0.01 to 100"),
    ((8, 0.7, 50, 0.9, 1e-40, "", None), "repetition_penalty must be a number from 0.01 to 100"),
    ((8, 0.7, 50, 0.9, 1.1, "", 2**64), "seed must be None \\(random\\) or a whole number from 0 to"),
    ((8, 0.7, 50, 0.9, 1.1, 5, None), "stop must be a list of strings"),
])
def test_bad_settings_raise_a_sentence_naming_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        generation_config(*values)


def test_none_means_the_default_for_every_setting_and_the_seed_is_random_unless_the_defaults_fix_one():
    defaults = GenerationConfig(max_new_tokens=33, temperature=0.2, top_k=7, top_p=0.5, repetition_penalty=1.3,
                                stop=("END",), seed=9)
    assert generation_config(None, None, None, None, None, None, None, defaults=defaults) == GenerationConfig(
        max_new_tokens=33, temperature=0.2, top_k=7, top_p=0.5, repetition_penalty=1.3, stop=("END",), seed=9)
    assert generation_config(None, None, None, None, None, None, None) == GenerationConfig()
    assert generation_config(None, None, None, None, None, None, None).seed is None  # random
    assert generation_config(None, 0, 0, None, None, [], None, defaults=defaults).top_k is None  # 0 is off


def test_turn_of_counts_exchanges_before_a_message():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert [turn_of(history, i) for i in range(4)] == [0, 0, 1, 1]


def test_context_meter_reports_use_dropped_turns_and_truncation():
    assert context_meter(Prompt("x", 300, 0, False), 2048, 128) == (
        "Context: **300** of 2048 tokens used by the prompt, up to 128 kept for the reply.")
    text = context_meter(Prompt("x", 900, 4, True), 1024, 124)
    assert "4 earlier messages dropped to fit" in text and "only its end was kept" in text


