"""The backend contract, one suite run against every backend.

Cases: the native engine on a small random GPT-2, transformers on the same weights, and transformers on the
bundled SmolLM2 (slow: loaded once per session through `create_backend("smollm2")`).

    .venv/bin/python -m pytest tests/test_backends_contract.py -m "not slow"   # seconds
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

import pytest
import torch

from backends import ChatBackend, GenerationConfig, create_backend
from backends.native import NativeBackend
from gpt.chat_format import PLAIN_STOP_STRINGS
from gpt.tokenizer import GPT2Tokenizer

GREEDY = dict(temperature=0.0, top_k=None, top_p=1.0)


@dataclass
class Case:
    backend: ChatBackend
    prompt: str  # a chat prompt ending with the assistant's cue
    long_prompt: str  # a prompt whose greedy reply runs well past 32 tokens
    plain: bool  # plain-text turn format (GPT-2) rather than a chat template


_SMOLLM2: list[ChatBackend] = []


def smollm2_backend() -> ChatBackend:
    """The bundled model, loaded once for the whole session."""
    if not _SMOLLM2:
        _SMOLLM2.append(create_backend("smollm2"))
    return _SMOLLM2[0]


def _chat(backend, text):
    return backend.format_chat([{"role": "user", "content": text}])


@pytest.fixture(scope="session", params=["native-tiny", "hf-tiny",
                                         pytest.param("hf-smollm2", marks=pytest.mark.slow)])
def case(request, tiny_gpt2_hf_dir, tiny_native_ckpt) -> Case:
    if request.param == "native-tiny":
        backend = create_backend("native", checkpoint=str(tiny_native_ckpt))
    elif request.param == "hf-tiny":
        backend = create_backend("hf", model=str(tiny_gpt2_hf_dir))
    else:
        backend = smollm2_backend()
        return Case(backend, _chat(backend, "What is the capital of France?"),
                    _chat(backend, "Write a long story about a dragon who learns to bake bread."), plain=False)
    return Case(backend, _chat(backend, "Hello there! How are you?"), _chat(backend, "Tell me a story."), plain=True)


BAD_SETTINGS = [("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", -0.1), ("top_k", -1),
                ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0), ("stop", ("",)), ("seed", "x")]


@pytest.mark.parametrize("field,value", BAD_SETTINGS)
def test_invalid_generation_setting_raises_value_error_naming_the_field(case, field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        case.backend.generate(case.prompt, {field: value})


def test_unknown_generation_setting_is_named(case):
    with pytest.raises(ValueError, match="temprature"):
        case.backend.generate(case.prompt, {"temprature": 0.5})


def test_same_seed_gives_same_reply_and_other_seeds_differ(case):
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=None, top_p=1.0, seed=11)
    first = case.backend.generate(case.long_prompt, cfg)
    assert case.backend.generate(case.long_prompt, cfg) == first
    others = {case.backend.generate(case.long_prompt, GenerationConfig(**{**_as_dict(cfg), "seed": s}))
              for s in (12, 13, 14)}
    assert others - {first}, "three other seeds all gave the same reply: the seed is not reaching the sampler"


@pytest.mark.parametrize("settings", [GREEDY, dict(temperature=0.8, top_k=40, top_p=0.9, seed=5)],
                         ids=["greedy", "sampled"])
def test_joined_stream_equals_generate(case, settings):
    cfg = GenerationConfig(max_new_tokens=24, **settings)
    stream = case.backend.stream(case.long_prompt, cfg)
    pieces = list(stream)
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == case.backend.generate(case.long_prompt, cfg)
    assert "".join(pieces) == case.backend.decode(stream.token_ids)


@pytest.mark.parametrize("limit", [1, 7])
def test_max_new_tokens_is_respected(case, limit):
    stream = case.backend.stream(case.long_prompt, GenerationConfig(max_new_tokens=limit, **GREEDY))
    text = "".join(stream)
    assert stream.n_tokens == limit
    assert stream.finish_reason == "length"
    assert text == case.backend.decode(stream.token_ids)


def _boundary_stop(backend, ids: list[int], full: str) -> tuple[str, int]:
    """A 4-character stop string made of the last 2 characters of token k-1 and the first 2 of token k,
    occurring first exactly there; returns it and k."""
    for k in range(2, len(ids)):
        before, upto = backend.decode(ids[:k]), backend.decode(ids[:k + 1])
        if "\ufffd" in upto or not full.startswith(upto):
            continue
        if len(backend.decode(ids[k - 1:k])) >= 2 and len(upto) - len(before) >= 2:
            stop = full[len(before) - 2:len(before) + 2]
            if full.find(stop) == len(before) - 2:
                return stop, k
    raise AssertionError(f"no token boundary with a usable stop string in {full!r}")


def test_stop_string_split_across_tokens_is_cut_exactly_and_never_leaks(case):
    greedy = GenerationConfig(max_new_tokens=32, **GREEDY)
    full_stream = case.backend.stream(case.long_prompt, greedy)
    full = "".join(full_stream)
    stop, k = _boundary_stop(case.backend, full_stream.token_ids, full)
    cfg = GenerationConfig(max_new_tokens=32, stop=(stop,), **GREEDY)
    stream = case.backend.stream(case.long_prompt, cfg)
    pieces = list(stream)
    reply = "".join(pieces)
    assert reply == full[:full.index(stop)]
    assert stop not in reply
    assert stream.finish_reason == "stop"
    assert stream.n_tokens == k + 1, "generation went on after the token that completed the stop string"
    assert case.backend.generate(case.long_prompt, cfg) == reply


def test_stop_string_prefix_at_the_end_is_released_when_no_stop_follows(case):
    greedy = GenerationConfig(max_new_tokens=12, **GREEDY)
    full = case.backend.generate(case.long_prompt, greedy)
    stop = full[-3:] + "\x00never"  # the reply ends with the start of this stop string
    assert case.backend.generate(case.long_prompt, GenerationConfig(max_new_tokens=12, stop=(stop,), **GREEDY)) == full


def test_stop_string_at_the_very_start_gives_an_empty_reply(case):
    full = case.backend.generate(case.long_prompt, GenerationConfig(max_new_tokens=8, **GREEDY))
    stream = case.backend.stream(case.long_prompt, GenerationConfig(max_new_tokens=8, stop=(full[:2],), **GREEDY))
    assert "".join(stream) == ""
    assert stream.finish_reason == "stop"


def test_closing_the_stream_halts_generation(case):
    cfg = GenerationConfig(max_new_tokens=case.backend.context_length, **GREEDY)
    stream = case.backend.stream(case.long_prompt, cfg)
    next(stream)
    stream.close()
    assert stream.finish_reason == "closed"
    assert not [t for t in threading.enumerate() if t.name.endswith("-generate")], "generation still running"
    if isinstance(case.backend, NativeBackend):
        assert stream.n_tokens <= 8  # pulled token by token: nothing past what the first piece needed
    elif not case.plain:
        assert stream.n_tokens < 40  # SmolLM2 takes tens of ms a token: halted long before its limit


def test_halt_flag_ends_hf_generation_at_the_next_token(twins):
    from backends.hf import _ReplyPump
    from backends.reply import ReplyStream

    _, hf = twins
    halt = threading.Event()
    watch = _ReplyPump(hf._model(), ReplyStream(lambda reply: iter(())), stops=(), limit=8, halt=halt)
    ids = torch.tensor([[10, 11, 12]])
    assert not watch(ids, None).any()
    halt.set()
    assert watch(ids, None).all()


def test_concurrent_sessions_get_the_replies_they_would_get_alone(case):
    configs = [GenerationConfig(max_new_tokens=12, temperature=0.9, seed=s) for s in (1, 2, 3)]
    alone = [case.backend.generate(case.long_prompt, c) for c in configs]
    together: list[str | None] = [None] * len(configs)

    def run(i):
        together[i] = case.backend.generate(case.long_prompt, configs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_chat_format_renders_prompt_ids_once_and_the_backend_adds_its_turn_markers_to_the_stops(case):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = case.backend.format_chat(messages)
    ids = case.backend.prompt_ids(messages)
    assert ids == case.backend.encode(prompt)  # the ids are the text's, encoded the one way prompts are
    cfg = GenerationConfig(max_new_tokens=6, stop=("zz",), **GREEDY)
    assert case.backend.generate(ids, cfg) == case.backend.generate(prompt, cfg)
    if case.plain:
        assert prompt == "System: Be brief.\nUser: Hi\nAssistant:"
        assert case.backend.reply_stops(cfg) == ("zz", *PLAIN_STOP_STRINGS)
    else:
        assert prompt.endswith("<|im_start|>assistant\n") and "Be brief." in prompt
        assert case.backend.reply_stops(cfg) == ("zz",)


def test_user_typed_special_token_stays_text(case):
    typed = "<|endoftext|>" if case.plain else "<|im_end|>"
    special_id = 50256 if case.plain else case.backend.encode(typed)[0]  # a template prompt parses markup
    prompt = _chat(case.backend, f"Hello {typed} there")
    clean = case.backend.encode(_chat(case.backend, "Hello there"))
    injected = case.backend.encode(prompt)
    assert injected.count(special_id) == clean.count(special_id)
    if case.plain:
        assert case.backend.decode(injected) == prompt


def test_prompt_longer_than_the_context_is_refused_with_a_clear_sentence(case):
    long_prompt = "word " * (case.backend.context_length + 10)
    with pytest.raises(ValueError, match="context"):
        case.backend.generate(long_prompt, GenerationConfig(max_new_tokens=4))


def test_model_name_and_context_length(case):
    assert isinstance(case.backend.model_name, str) and case.backend.model_name
    assert case.backend.context_length == (128 if case.plain else 8192)


# --- end of text: forced on the tiny weights, natural for SmolLM2 -----------------------------------------

HELLO = GPT2Tokenizer().encode(" Hello")[0]


@pytest.fixture(scope="session")
def eot_after_hello_weights(tiny_gpt2_hf_dir, tmp_path_factory):
    """The tiny GPT-2 made to always score " Hello" 10 and end-of-text 9 (everything else ~0): greedy says
    " Hello" once, and with a repetition penalty above 10/9 ends the reply right after it."""
    from transformers import GPT2LMHeadModel

    from gpt.convert import convert_to_native

    model = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_hf_dir))
    with torch.no_grad():
        v = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0))
        v /= v.norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)  # the final hidden state is v whatever the input
        model.transformer.wte.weight[50256] = 9 * v  # tied lm_head: logit = wte[i] . v
        model.transformer.wte.weight[HELLO] = 10 * v
    hf_dir = tmp_path_factory.mktemp("eot-hf")
    model.save_pretrained(str(hf_dir))
    return hf_dir, convert_to_native(str(hf_dir), tmp_path_factory.mktemp("eot-native") / "ckpt")


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_end_of_text_stops_generation(kind, eot_after_hello_weights):
    hf_dir, native_dir = eot_after_hello_weights
    backend = create_backend("native", checkpoint=str(native_dir)) if kind == "native" \
        else create_backend("hf", model=str(hf_dir))
    prompt = _chat(backend, "Hi")
    ended = backend.stream(prompt, GenerationConfig(max_new_tokens=20, repetition_penalty=1.5, **GREEDY))
    assert "".join(ended) == " Hello"
    assert ended.finish_reason == "eot" and ended.token_ids == [HELLO]
    running = backend.stream(prompt, GenerationConfig(max_new_tokens=5, repetition_penalty=1.0, **GREEDY))
    assert "".join(running) == " Hello" * 5 and running.finish_reason == "length"


@pytest.mark.slow
def test_smollm2_ends_its_turn_with_end_of_text():
    backend = smollm2_backend()
    stream = backend.stream(_chat(backend, "What is the capital of France?"),
                            GenerationConfig(max_new_tokens=64, **GREEDY))
    reply = "".join(stream)
    assert stream.finish_reason == "eot" and stream.n_tokens < 64
    assert "<|im_end|>" not in reply and "<|endoftext|>" not in reply


@pytest.mark.slow
def test_smollm2_prompt_is_the_tokenizers_own_chat_template():
    backend = smollm2_backend()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    tokenizer = backend._model().tokenizer
    assert backend.format_chat(messages) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)


@pytest.mark.slow
def test_smollm2_answers_paris_offline():
    backend = create_backend("smollm2") if not _SMOLLM2 else smollm2_backend()
    reply = backend.generate(_chat(backend, "What is the capital of France?"), GenerationConfig(temperature=0))
    assert "Paris" in reply


# --- the same GPT-2 weights in both engines -----------------------------------------------------------------

@pytest.fixture(scope="module")
def twins(tiny_gpt2_hf_dir, tiny_native_ckpt):
    # Identical weights means the same format too: fp32 on both sides (int8 is pinned in tests/test_quantize.py).
    return (create_backend("native", checkpoint=str(tiny_native_ckpt), weights="fp32"),
            create_backend("hf", model=str(tiny_gpt2_hf_dir)))


@pytest.mark.parametrize("penalty", [1.1, 1.0])
def test_greedy_native_equals_greedy_hf_on_identical_gpt2_weights(twins, penalty):
    native, hf = twins
    prompt = native.format_chat([{"role": "user", "content": "Hello <|endoftext|> there"}])
    assert native.encode(prompt) == hf.encode(prompt)
    cfg = GenerationConfig(max_new_tokens=40, repetition_penalty=penalty, **GREEDY)
    a, b = native.stream(prompt, cfg), hf.stream(prompt, cfg)
    assert "".join(a) == "".join(b)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 40


def test_seeded_sampling_matches_between_engines_on_identical_weights(twins):
    native, hf = twins
    prompt = native.format_chat([{"role": "user", "content": "Tell me a story."}])
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=3)
    a, b = native.stream(prompt, cfg), hf.stream(prompt, cfg)
    assert "".join(a) == "".join(b) and a.token_ids == b.token_ids


def test_release_frees_the_model_and_the_next_call_loads_it_again(twins):
    for backend in twins:
        prompt = backend.format_chat([{"role": "user", "content": "Hi"}])
        cfg = GenerationConfig(max_new_tokens=6, **GREEDY)
        before = backend.generate(prompt, cfg)
        backend.release()
        assert backend._loaded is None
        assert backend.generate(prompt, cfg) == before


def _as_dict(cfg: GenerationConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
