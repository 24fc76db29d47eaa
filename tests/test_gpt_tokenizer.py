"""Tokenizers: GPT-2's ids, typed special-token strings stay text, and streaming never emits half a character.

Run: .venv/bin/python -m pytest tests/test_gpt_tokenizer.py
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt.tokenizer import GPT2Tokenizer, HFTokenizer, IncrementalDecoder, load_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Characters of 1 to 4 UTF-8 bytes (Latin, Greek, CJK, emoji, combining marks) that BPE splits mid-character.
MULTI_BYTE = st.text(alphabet=st.sampled_from(list("aé ñ\nΩж中文日本語한국😀🎉👍🏽\u0301\u200d€¥ x")), max_size=60)
RANDOM_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
                      max_size=40)


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory) -> HFTokenizer:
    """A small byte-level BPE tokenizer.json with ChatML specials, as a Llama-family checkpoint carries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["Hello world, héllo wörld! 中文 日本語 😀 im_start im_end endoftext " * 50], trainer)
    path = tmp_path_factory.mktemp("chatml-tok")
    raw.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
                                                           "chat_template": "{{ messages }}"}))
    return load_tokenizer(str(path))


def test_gpt2_ids_match_gpt2(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256 and gpt2.stop_ids == {50256}
    assert gpt2.decode([15496, 995]) == "Hello world"


def test_typed_endoftext_never_becomes_the_special_token(gpt2):
    ids = gpt2.encode("a <|endoftext|> b")
    assert 50256 not in ids
    assert gpt2.decode(ids) == "a <|endoftext|> b"
    assert gpt2.encode_markup("a<|endoftext|>") == gpt2.encode("a") + [50256]


@pytest.mark.parametrize("marker", SPECIALS)
def test_typed_chat_markers_never_become_special_tokens(chatml_tokenizer, marker):
    tok = chatml_tokenizer
    text = f"hi {marker}\n{marker}system"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert tok.special_tokens[marker] in tok.encode_markup(text)


def test_hf_tokenizer_reads_eos_stops_and_template(chatml_tokenizer):
    tok = chatml_tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eot_id == tok.special_tokens["<|im_end|>"]
    assert tok.stop_ids == {tok.special_tokens["<|im_end|>"], tok.special_tokens["<|endoftext|>"]}
    assert tok.chat_template == "{{ messages }}" and tok.bos_token == "<|im_start|>"


def test_tokenizer_without_an_end_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        load_tokenizer(str(tmp_path))


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def _stream(tokenizer, text: str) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in tokenizer.encode(text)]
    pieces.append(decoder.flush())
    return pieces


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(MULTI_BYTE, RANDOM_TEXT))
def test_gpt2_stream_never_yields_half_a_character(gpt2, text):
    pieces = _stream(gpt2, text)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(MULTI_BYTE, RANDOM_TEXT))
def test_hf_tokenizer_stream_never_yields_half_a_character(chatml_tokenizer, text):
    pieces = _stream(chatml_tokenizer, text)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


def test_emoji_split_over_several_tokens_is_held_back_until_complete(gpt2):
    ids = gpt2.encode("😀")
    assert len(ids) > 1  # the point of the test: the character spans several tokens
    decoder = IncrementalDecoder(gpt2)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "😀"


def test_invalid_bytes_are_released_after_max_hold_not_held_forever(gpt2):
    lone_continuation_byte = [gpt2._enc.encode_single_token(b"\xa9")]  # a bare UTF-8 continuation byte
    assert gpt2.decode(lone_continuation_byte) == "\ufffd"
    decoder = IncrementalDecoder(gpt2, max_hold=2)
    out = [decoder.push(lone_continuation_byte[0]), decoder.push(gpt2.encode("a")[0])]
    assert "".join(out) + decoder.flush() == "\ufffda"
