"""The native model equals transformers' GPT-2 on the same weights, and KV-cache decoding equals a full forward.

Run: .venv/bin/python -m pytest tests/test_gpt_model.py
"""

from __future__ import annotations

import pytest
import torch

from gpt.checkpoint import load_checkpoint
from gpt.model import GPT, GPTConfig

LLAMA_LIKE = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                  bias=False, norm="rmsnorm", mlp="swiglu", pos="rope", rope_theta=500.0, tie_embeddings=False)
GPT2_LIKE = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def hf_and_native(tiny_gpt2_hf_dir, tiny_native_ckpt):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_hf_dir), dtype=torch.float32).eval()
    native, _, _ = load_checkpoint(tiny_native_ckpt)
    return hf, native


def test_native_gpt2_logits_equal_transformers_for_the_same_weights(hf_and_native):
    hf, native = hf_and_native
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        got = native(idx)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_converted_gpt2_keeps_the_fused_attention_weights_and_biases(hf_and_native):
    hf, native = hf_and_native
    hf_state, native_state = hf.state_dict(), native.state_dict()
    for layer in range(native.config.n_layer):
        torch.testing.assert_close(native_state[f"transformer.h.{layer}.attn.c_attn.bias"],
                                   hf_state[f"transformer.h.{layer}.attn.c_attn.bias"])
        torch.testing.assert_close(native_state[f"transformer.h.{layer}.attn.c_attn.weight"],
                                   hf_state[f"transformer.h.{layer}.attn.c_attn.weight"].t())


def test_nonzero_attention_biases_survive_conversion(tmp_path):
    """Random init leaves GPT-2 biases at zero; set them so a dropped bias would change the logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt.convert import convert_to_native

    torch.manual_seed(7)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(str(tmp_path / "hf"))
    native, _, _ = load_checkpoint(convert_to_native(str(tmp_path / "hf"), tmp_path / "native"))
    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(native(idx), hf(idx).logits, atol=1e-4, rtol=0)


def _cached_logits_equal_full_forward(model: GPT, prompt_len: int, steps: int, chunk: int | None = None):
    """Prefill `prompt_len` tokens (in chunks of `chunk` if given), then decode one token per step; every
    step's logits must equal the full forward over the same prefix."""
    model.eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len + steps), generator=gen)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, prompt_len + steps)
        chunk = chunk or prompt_len
        for start in range(0, prompt_len, chunk):
            end = min(start + chunk, prompt_len)
            got = model(ids[:, start:end], cache=cache)
            torch.testing.assert_close(got, full[:, start:end], atol=1e-5, rtol=0)
        for pos in range(prompt_len, prompt_len + steps):
            got = model(ids[:, pos:pos + 1], cache=cache)
            torch.testing.assert_close(got[:, 0], full[:, pos], atol=1e-5, rtol=0)
        assert cache.pos == prompt_len + steps


@pytest.mark.parametrize("arch", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "gqa-rope-rmsnorm-swiglu"])
def test_kv_cache_decoding_equals_full_forward_at_every_step(arch):
    torch.manual_seed(0)
    _cached_logits_equal_full_forward(GPT(GPTConfig(**arch)), prompt_len=9, steps=12)


@pytest.mark.parametrize("arch", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "gqa-rope-rmsnorm-swiglu"])
def test_chunked_prefill_after_a_filled_prefix_equals_full_forward(arch):
    torch.manual_seed(1)
    _cached_logits_equal_full_forward(GPT(GPTConfig(**arch)), prompt_len=20, steps=5, chunk=7)


def test_last_only_logits_are_the_last_position_of_the_full_logits():
    torch.manual_seed(2)
    model = GPT(GPTConfig(**LLAMA_LIKE)).eval()
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True)[:, -1], model(ids)[:, -1])


def test_sequence_longer_than_the_context_is_refused():
    model = GPT(GPTConfig(**GPT2_LIKE))
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_gpt2_is_the_default_architecture():
    cfg = GPTConfig()
    assert (cfg.pos, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings) == ("learned", "layernorm", "gelu", True, True)
    assert (cfg.n_kv_head, cfg.intermediate_size, cfg.block_size, cfg.vocab_size) == (12, 3072, 1024, 50257)


def test_untied_head_has_its_own_weights_and_tied_head_shares_them():
    tied = GPT(GPTConfig(**{**LLAMA_LIKE, "tie_embeddings": True}))
    untied = GPT(GPTConfig(**LLAMA_LIKE))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight


@pytest.mark.parametrize("bad, message", [({"norm": "batchnorm"}, "norm must be"), ({"n_kv_head": 3}, "divide"),
                                          ({"pos": "alibi"}, "pos must be")])
def test_invalid_architecture_switches_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**LLAMA_LIKE, **bad})
