"""HF-specific loading: the offline GPT-2 tokenizer, the empty-tokenizer trap, the hub offline, the GGUF cache.

    .venv/bin/python -m pytest tests/test_backends_hf.py            # the GGUF test is marked slow
"""

from __future__ import annotations

import time

import pytest

from backends import BackendError, GenerationConfig, create_backend, hf_loading
from gpt.tokenizer import GPT2Tokenizer


def test_gpt2_dir_without_tokenizer_files_uses_the_offline_gpt2_tokenizer(tiny_gpt2_hf_dir):
    assert not any((tiny_gpt2_hf_dir / name).exists() for name in hf_loading.TOKENIZER_FILES)
    backend = create_backend("hf", model=str(tiny_gpt2_hf_dir))
    reference = GPT2Tokenizer()
    for text in ["Hello world", " the", "User: héllo 😀\nAssistant:", "a <|endoftext|> b", "  tabs\tand\n\nlines"]:
        assert backend.encode(text) == reference.encode(text)
        assert backend.decode(reference.encode(text)) == text


def test_empty_tokenizer_from_an_offline_hub_lookup_is_refused():
    from transformers import GPT2TokenizerFast

    empty = GPT2TokenizerFast.from_pretrained("gpt2")  # HF_HUB_OFFLINE and uncached: the OFFLINE.md trap
    assert empty.encode("Hello world") == []
    with pytest.raises(BackendError, match="empty") as err:
        hf_loading.check_tokenizer(empty, "gpt2")
    assert "\n" not in str(err.value)


def test_hub_unreachable_without_offline_flag_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_loading, "hub_reachable", lambda timeout=3.0: False)
    backend = create_backend("hf", model="nobody-here/not-a-cached-model")
    with pytest.raises(BackendError, match="cannot be reached"):
        backend.generate("Hello", GenerationConfig(max_new_tokens=2))


def test_hub_probe_answers_within_its_timeout():
    started = time.perf_counter()
    assert hf_loading.hub_reachable(timeout=1.0) in (True, False)
    assert time.perf_counter() - started < 2.5


def test_invalid_hub_id_is_one_clear_sentence():
    with pytest.raises(BackendError, match="valid Hugging Face hub id"):
        create_backend("hf", model="not a//valid id").generate("Hi", GenerationConfig(max_new_tokens=2))


def test_local_dir_without_tokenizer_of_another_architecture_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(str(tmp_path))
    with pytest.raises(BackendError, match="no tokenizer files"):
        create_backend("hf", model=str(tmp_path)).generate("Hi", GenerationConfig(max_new_tokens=2))


def test_missing_gguf_file_is_refused_at_creation(tmp_path):
    with pytest.raises(BackendError, match="GGUF file"):
        create_backend("hf", gguf_file=str(tmp_path / "missing.gguf"))


def test_hf_backend_without_a_model_says_what_to_pass():
    with pytest.raises(BackendError, match="needs a model"):
        create_backend("hf")


def test_cache_is_written_atomically(tmp_path):
    target = tmp_path / "copy"

    def crash(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        hf_loading._write_atomically(target, crash)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    hf_loading._write_atomically(target, lambda tmp: (tmp / "whole.bin").write_bytes(b"y"))
    assert [p.name for p in target.iterdir()] == ["whole.bin"]


@pytest.mark.slow
def test_bundled_gguf_first_load_writes_a_cache_that_later_loads_use(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_CHAT_CACHE", str(tmp_path))
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    cfg = GenerationConfig(max_new_tokens=16, temperature=0)
    first = create_backend("smollm2")
    started = time.perf_counter()
    first_reply = first.generate(first.format_chat(prompt), cfg)
    first_load = time.perf_counter() - started
    cached = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary directory was left behind"
    first.release()

    again = create_backend("smollm2")
    started = time.perf_counter()
    assert again.generate(again.format_chat(prompt), cfg) == first_reply
    cached_load = time.perf_counter() - started
    assert again._model().model.config._name_or_path == str(cached[0])  # loaded from the cache, not the GGUF
    assert again.format_chat(prompt) == first.format_chat(prompt)
    print(f"bundled SmolLM2: first load + reply {first_load:.1f} s, cached load + reply {cached_load:.1f} s")

