"""Stop strings on decoded text (backends/reply.py): edge cases and a property over random splits.

    .venv/bin/python -m pytest tests/test_backends_stops.py
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.reply import StopMatcher, apply_stops


def _run(pieces, stops):
    return "".join(apply_stops(pieces, stops))


def test_stop_split_across_pieces_is_cut_and_never_leaks():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.push("Sure.\nUs") == "Sure."  # "\nUs" could start the stop: held back
    assert matcher.push("er: hi") == ""
    assert matcher.stopped and matcher.flush() == ""


def test_held_back_prefix_is_released_once_ruled_out_or_at_the_end():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.push("a\nUs") == "a"
    assert matcher.push("ually") == "\nUsually"
    assert matcher.push(" yes\n") == " yes"
    assert matcher.flush() == "\n"


def test_earliest_of_several_stops_wins():
    assert _run(["one two three"], ["three", "two"]) == "one "
    assert _run(["xx", "ab", "cd"], ["bc", "abcd"]) == "xx"


def test_stop_at_the_very_start_gives_nothing():
    assert _run(["STOP", "more"], ["STOP"]) == ""


def test_self_overlapping_stop_is_found_after_a_false_start():
    assert _run(["a", "a", "b", "c"], ["ab"]) == "a"
    assert _run(["aa", "ab"], ["aab"]) == "a"


def test_nothing_is_emitted_after_the_stop():
    matcher = StopMatcher(["x"])
    assert matcher.push("1x2") == "1"
    assert matcher.push("3") == "" and matcher.flush() == ""


def test_no_stops_passes_everything_through_at_once():
    matcher = StopMatcher([])
    assert matcher.push("abc") == "abc" and matcher.flush() == ""
    assert StopMatcher(["", ""]).push("abc") == "abc"  # empty strings are not stops


def test_piece_stream_stops_pulling_once_the_stop_is_seen():
    pulled = []

    def pieces():
        for p in ["a", "bS", "TOPc", "d", "e"]:
            pulled.append(p)
            yield p

    assert _run(pieces(), ["STOP"]) == "ab"
    assert pulled == ["a", "bS", "TOPc"]


def test_a_stop_inside_a_longer_one_that_started_earlier_waits_for_it():
    # "a" completes first, but "Ua\n" started one character earlier: the reply ends before "U".
    assert _run(["U", "U", "UUUbUa", "\n"], ["a", "Ua\n"]) == "UUUUUb"
    # The longer one never completes: the reply ends before "a" after all (decided at the end).
    assert _run(["xU", "a"], ["a", "Ua\n"]) == "xU"


ALPHABET = "ab:\nU"  # few letters: stop strings overlap and nest often


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
       stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3))
def test_any_split_gives_the_text_before_the_first_stop_and_holds_back_no_more_than_needed(text, cuts, stops):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[:min(found)] if found else text

    matcher = StopMatcher(stops)
    emitted, consumed = "", 0
    longest = max((len(s) for s in stops), default=1)
    for piece in pieces:
        emitted += matcher.push(piece)
        consumed += len(piece)
        assert expected.startswith(emitted)
        if matcher.stopped:
            break
        assert len(emitted) >= consumed - (longest - 1)  # only a possible stop prefix is held back
    emitted += matcher.flush()
    assert emitted == expected
    assert _run(pieces, stops) == expected
