"""build_prompt: the prompt always fits with room for the reply, and drops or cuts only what the rules allow.

Property-based (hypothesis) over random conversations, for the tokenizer of every backend kind: the tiny native
GPT-2 checkpoint (plain format, context 128), the tiny HF GPT-2 directory, and the bundled SmolLM2 (chat
template, slow).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from backends import create_backend
from chatapp.budget import Prompt, build_prompt

# Text that stresses tokenizers and formats: role markers, special-token strings, newlines, non-ASCII.
PIECES = st.sampled_from(["hello", " world", "\n", "User:", "\nAssistant: ", "System: ", "<|endoftext|>",
                          "<|im_start|>", "<|im_end|>", "é", "日本", "🙂", "  ", "123", ".", "?", "a" * 40])
TEXT = st.lists(st.one_of(PIECES, st.text(max_size=12)), max_size=12).map("".join)
LONG_TEXT = st.lists(st.one_of(PIECES, st.text(max_size=30)), min_size=20, max_size=160).map("".join)


@st.composite
def conversations(draw):
    """(history, newest user text, system prompt): history may start with an assistant greeting and may hold
    a user message whose reply never came."""
    history = []
    if draw(st.booleans()):
        history.append({"role": "assistant", "content": draw(TEXT)})
    for _ in range(draw(st.integers(0, 10))):
        history.append({"role": "user", "content": draw(TEXT)})
        if draw(st.integers(0, 9)):
            history.append({"role": "assistant", "content": draw(TEXT)})
    newest = draw(st.one_of(TEXT, LONG_TEXT))
    system = draw(st.one_of(st.none(), st.just(""), TEXT))
    return history, newest, system


def budgets(context: int):
    return st.one_of(st.integers(1, context // 2), st.integers(1, context + 2),
                     st.integers(max(1, context - 80), context + 2))


def _render(backend, system, history, newest) -> str:
    head = [{"role": "system", "content": system}] if system else []
    return backend.format_chat(head + history + [{"role": "user", "content": newest}])


def _kept_suffix(backend, system, newest, text) -> str:
    """The suffix of `newest` whose rendering is `text` (rendered length grows with the suffix: bisect)."""
    lo, hi = 0, len(newest)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_render(backend, system, [], newest[len(newest) - mid:])) < len(text):
            lo = mid + 1
        else:
            hi = mid
    suffix = newest[len(newest) - lo:]
    assert _render(backend, system, [], suffix) == text
    return suffix


def check_invariants(backend, history, newest, system, max_new_tokens) -> Prompt | None:
    context = backend.context_length
    messages = history + [{"role": "user", "content": newest}]

    def fits(text) -> bool:
        return len(backend.encode(text)) + max_new_tokens <= context

    if max_new_tokens >= context or not fits(_render(backend, system, [], "")):
        with pytest.raises(ValueError, match="max_new_tokens"):
            build_prompt(backend, messages, max_new_tokens, system_prompt=system)
        event("refused: no room")
        return None
    try:
        p = build_prompt(backend, messages, max_new_tokens, system_prompt=system)
    except ValueError as e:  # allowed only when not one character of the newest message fits
        assert "no room for your message" in str(e)
        assert not fits(_render(backend, system, [], newest[-1:]))
        event("refused: message cannot fit")
        return None
    event("truncated" if p.truncated else "dropped turns" if p.dropped else "whole conversation")
    # The budget: the exact encoded length, with room for the reply.
    assert p.n_tokens == len(p.ids) and list(p.ids) == backend.encode(p.text)
    assert p.n_tokens + max_new_tokens <= context
    if not p.truncated:
        # Whole turns dropped, oldest first; the newest message and the system prompt intact.
        kept = history[p.dropped:]
        assert p.dropped == 0 or not kept or kept[0]["role"] == "user"
        assert p.text == _render(backend, system, kept, newest)
        if p.dropped:  # dropped no more than needed: the previous turn boundary does not fit
            boundary = max(i for i in range(p.dropped) if i == 0 or history[i]["role"] == "user")
            assert not fits(_render(backend, system, history[boundary:], newest))
    else:
        # Everything older dropped; the END of the newest message kept, as much of it as fits.
        assert p.dropped == len(history)
        assert not fits(_render(backend, system, [], newest))
        suffix = _kept_suffix(backend, system, newest, p.text)
        assert 0 < len(suffix) < len(newest)
        assert not fits(_render(backend, system, [], newest[len(newest) - len(suffix) - 1:]))
    return p


@pytest.fixture(scope="module")
def native_backend(tiny_native_ckpt):
    return create_backend("native", checkpoint=str(tiny_native_ckpt))


@pytest.fixture(scope="module")
def hf_backend(tiny_gpt2_hf_dir):
    return create_backend("hf", model=str(tiny_gpt2_hf_dir))


@pytest.fixture(scope="module")
def smollm2_backend():
    return create_backend("smollm2")


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(conversation=conversations(), data=st.data())
def test_native_gpt2_prompt_always_fits_and_drops_whole_turns(native_backend, conversation, data):
    assert native_backend.context_length == 128
    check_invariants(native_backend, *conversation, data.draw(budgets(native_backend.context_length)))


@SETTINGS
@given(conversation=conversations(), data=st.data())
def test_hf_gpt2_prompt_always_fits_and_drops_whole_turns(hf_backend, conversation, data):
    check_invariants(hf_backend, *conversation, data.draw(budgets(hf_backend.context_length)))


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations(), data=st.data())
def test_smollm2_template_prompt_always_fits_and_drops_whole_turns(smollm2_backend, conversation, data):
    # The template's context is large: budgets near it make dropping and cutting happen.
    context = smollm2_backend.context_length
    room = data.draw(st.one_of(st.integers(-2, 300), st.integers(0, context - 1)))
    max_new = context - room
    check_invariants(smollm2_backend, *conversation, max_new)


def test_max_new_tokens_filling_the_context_is_refused_with_what_to_change(native_backend):
    for max_new in (128, 500):
        with pytest.raises(ValueError, match=r"lower max_new_tokens below 128"):
            build_prompt(native_backend, [{"role": "user", "content": "hi"}], max_new)


def test_system_prompt_too_long_is_refused_with_what_to_change(native_backend):
    with pytest.raises(ValueError, match="shorten the system prompt or lower max_new_tokens"):
        build_prompt(native_backend, [{"role": "user", "content": "hi"}], 64, system_prompt="word " * 100)


def test_oldest_turns_dropped_first_and_counted_in_messages(native_backend):
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " + "x " * 10},
                    {"role": "assistant", "content": f"answer {i} " + "y " * 10}]
    p = build_prompt(native_backend, history + [{"role": "user", "content": "last one"}], 32, system_prompt="Sys.")
    assert p.dropped > 0 and p.dropped % 2 == 0 and not p.truncated
    assert p.text.startswith("System: Sys.\nUser: question ")
    assert f"question {p.dropped // 2 - 1} " not in p.text and "question 5" in p.text
    assert p.text.endswith("User: last one\nAssistant:")


def test_too_long_message_keeps_its_end(native_backend):
    newest = "start " + " ".join(f"w{i}" for i in range(300)) + " the very end"
    p = build_prompt(native_backend, [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x"},
                                      {"role": "user", "content": newest}], 16)
    assert p.truncated and p.dropped == 2
    assert p.text.endswith(" the very end\nAssistant:") and "start" not in p.text
    assert 112 - 4 <= p.n_tokens <= 112  # filled up to the budget, not cut short


def test_gradio_text_blocks_normalised_at_the_edge_and_a_system_message_are_understood(native_backend):
    from chatapp.chat import plain_messages

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    with pytest.raises(TypeError, match="normalise it at the edge"):
        build_prompt(native_backend, messages, 16)
    p = build_prompt(native_backend, plain_messages(messages), 16)
    assert p.text == "System: Be brief.\nUser: Hi there\nAssistant:"


def test_encodes_stay_logarithmic_in_turns_and_message_length(native_backend):
    calls = []
    real_encode = native_backend.encode

    class Counting:
        context_length = native_backend.context_length
        format_chat = staticmethod(native_backend.format_chat)
        decode = staticmethod(native_backend.decode)

        @staticmethod
        def encode(text):
            calls.append(len(text))
            return real_encode(text)

        @staticmethod
        def prompt_ids(messages):
            return Counting.encode(native_backend.format_chat(messages))

    history = [{"role": r, "content": f"{r} {i}"} for i in range(200) for r in ("user", "assistant")]
    build_prompt(Counting, history + [{"role": "user", "content": "new"}], 32)
    assert len(calls) <= 2 + 9  # full, newest alone, then bisection over 200 turns
    calls.clear()
    p = build_prompt(Counting, [{"role": "user", "content": "z " * 20000}], 32)
    assert p.truncated and len(calls) <= 4 + 12  # bisection over the characters that can fit
    assert max(calls) <= 40000 + 100  # the long message is encoded once, candidates are short
