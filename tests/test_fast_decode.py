"""The static-cache decoder (gpt/fast_decode.py) and its fused kernels (gpt/gemv.py) pick what the plain path picks.

The engine serves through the batched scheduler (gpt/scheduler.py); StaticDecoder is the batch-1 CUDA-graph
decoder with fused Triton kernels that benchmarks/profile_decode.py profiles. Here its step runs eagerly on
CPU, which pins its logic: the position tensor, the masked cache window and its growth, the one-copy
key/value write and in-step greedy feedback.
"""

from __future__ import annotations

import pytest
import torch

from gpt.engine import Engine
from gpt.fast_decode import StaticDecoder
from gpt.gemv import fused_gemv_reference
from gpt.model import GPT, GPTConfig
from gpt.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False)


def tiny(**arch) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=96, n_layer=2, n_head=4, n_embd=64, **arch)).eval()


def plain(model, prompt, n, params=GREEDY, seed=None):
    return list(Engine(model).generate(prompt, n, params, seed=seed))


@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])
def test_static_step_logits_equal_the_plain_forward_across_windows(arch):
    model = tiny(**arch)
    prompt = list(range(3, 20))
    decoder = StaticDecoder(model, window=16)
    cache = model.new_cache(1, 96)
    with torch.inference_mode():
        expected = model(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1, :]
        got = decoder.prefill(prompt)
        for _ in range(40):  # positions 17..56: windows of 32, 48 and 64 slots
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            token = expected.argmax(-1)
            expected = model(token.view(1, 1), cache=cache)[:, -1, :]
            got = decoder.step(token)
    assert decoder.length == cache.pos


@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])
def test_static_decoder_greedy_ids_equal_the_engine(arch):
    model = tiny(**arch)
    prompt = list(range(5, 30))
    decoder = StaticDecoder(model, window=16)  # small windows: the run crosses several
    with torch.inference_mode():
        first = decoder.prefill(prompt).argmax(-1)
    assert list(decoder.greedy(first, 60)) == plain(model, prompt, 60)


def test_static_decoder_refuses_a_prompt_that_fills_its_cache():
    decoder = StaticDecoder(tiny(), max_len=32)
    with pytest.raises(ValueError, match="1 to 31 tokens"):
        decoder.prefill(list(range(32)))


@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])
def test_fused_gemv_reference_is_the_blocks_own_computation(arch):
    """The Triton kernel is checked against this reference; the reference must equal the modules."""
    model = tiny(**arch)
    block = model.transformer.h[0]
    x = torch.randn(1, 1, 64)
    norm = ("layernorm", block.ln_2.weight, block.ln_2.bias, block.ln_2.eps) if not arch else \
        ("rmsnorm", block.ln_2.weight, None, block.ln_2.eps)
    with torch.no_grad():
        mlp = block.mlp
        got = fused_gemv_reference(x, mlp.c_fc.weight, mlp.c_fc.bias, norm=norm,
                                   act="swiglu" if arch else "gelu_tanh")
        got = fused_gemv_reference(got, mlp.c_proj.weight, mlp.c_proj.bias, residual=x)
        torch.testing.assert_close(got, x + mlp(block.ln_2(x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA (checked on the GPU host)")
def test_fused_gemv_kernel_matches_reference_on_cuda():
    from gpt.gemv import fused_gemv

    torch.manual_seed(0)
    x, w, b, res = torch.randn(768).cuda(), torch.randn(2304, 768).cuda() * .02, torch.randn(2304).cuda(), None
    ln = ("layernorm", torch.rand(768).cuda() + .5, torch.randn(768).cuda() * .1, 1e-5)
    for act, rows in ((None, 2304), ("gelu_tanh", 2304), ("swiglu", 1152)):
        res = torch.randn(rows).cuda()
        torch.testing.assert_close(fused_gemv(x, w, b, norm=ln, act=act, residual=res),
                                   fused_gemv_reference(x, w, b, norm=ln, act=act, residual=res), atol=1e-4, rtol=1e-4)
