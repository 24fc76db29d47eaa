"""Weight formats of the native engine (gpt/quantize.py) and the `weights` option of the native backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends import BackendError, GenerationConfig, create_backend
from gpt.checkpoint import load_checkpoint
from gpt.engine import Engine
from gpt.quantize import (
    CPU_DEFAULT,
    INT8_BF16_MODULES,
    MATVEC_MAX_ROWS,
    Bf16Linear,
    Int8Linear,
    apply_weight_format,
    quantize_rows,
    resolve_weight_format,
)
from gpt.sampling import SamplingParams

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0, top_k=None, top_p=1.0, repetition_penalty=1.0)


def test_per_row_int8_is_within_half_a_step_of_the_weight():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 0, 40)[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    error = (q.float() * scale.float()[:, None] - w).abs()
    assert (error <= scale.float()[:, None] / 2 + 1e-7).all()  # every row keeps its own precision


@pytest.mark.parametrize("shape", [(1, 1, 32), (3, 5, 32), (2, MATVEC_MAX_ROWS + 9, 32), (7, 32)])
def test_int8_linear_equals_its_dequantised_weight_for_any_leading_shape(shape):
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 32, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(48, generator=g))
    q = Int8Linear.from_linear(linear)
    x = torch.randn(*shape, generator=g)
    reference = F.linear(x, q.dequantized(), linear.bias)
    out = q(x)
    assert out.shape == (*shape[:-1], 48) and out.dtype == x.dtype
    # The kernel rounds activations and its output to bf16 (8 bits of mantissa): ~1% of the output's scale.
    torch.testing.assert_close(out, reference, atol=0.02 * reference.abs().max().item(), rtol=0.02)
    assert (out - F.linear(x, linear.weight, linear.bias)).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("cls", [Int8Linear, Bf16Linear])
def test_a_long_prompts_products_round_as_the_decoding_kernel_does(cls):
    g = torch.Generator().manual_seed(2)
    q = cls(torch.randn(64, 32, generator=g) * 0.05, None)
    x = torch.randn(MATVEC_MAX_ROWS + 8, 32, generator=g)
    one_row_at_a_time = torch.cat([q(row[None]) for row in x])  # the int8 kernel
    torch.testing.assert_close(q(x), one_row_at_a_time, atol=0, rtol=2 ** -7)  # one bf16 rounding step apart


def test_int8_model_picks_the_same_greedy_tokens_as_fp32_on_the_tiny_model(tiny_native_ckpt):
    fp32, tokenizer, _ = load_checkpoint(tiny_native_ckpt)
    int8, _, _ = load_checkpoint(tiny_native_ckpt)
    apply_weight_format(int8, "int8")
    for name, module in int8.named_modules():  # int8, except the products measured to need bf16
        if isinstance(module, (Int8Linear, Bf16Linear, torch.nn.Linear)):
            kept = any(name == k or name.endswith(f".{k}") for k in INT8_BF16_MODULES)
            assert type(module) is (Bf16Linear if kept else Int8Linear), name
    assert isinstance(int8.transformer.h[1].attn.c_attn, Int8Linear)
    assert int8.transformer.wte.weight.dtype == torch.float32  # the lookup keeps full-precision rows
    prompt = tokenizer.encode("Hello there, how are you today?")
    ids = [list(Engine(m).generate(prompt, 16, SamplingParams(temperature=0.0))) for m in (fp32, int8)]
    assert ids[0] == ids[1] and len(ids[0]) == 16
    # and batch > 1 runs through the same products (the batched scheduler calls forward this way)
    batch = torch.tensor([prompt, prompt[::-1]])
    with torch.inference_mode():
        assert int8(batch).argmax(-1).tolist() == fp32(batch).argmax(-1).tolist()


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_native_backend_serves_the_format_and_keeps_the_checkpoint_full_precision(tiny_native_ckpt, weights):
    before = (tiny_native_ckpt / "model.safetensors").read_bytes()
    served = create_backend("native", checkpoint=str(tiny_native_ckpt), weights=weights)
    fp32 = create_backend("native", checkpoint=str(tiny_native_ckpt), weights="fp32")
    kind = Int8Linear if weights == "int8" else Bf16Linear
    assert isinstance(served._model().engine.model.transformer.h[0].attn.c_attn, kind)
    assert not isinstance(fp32._model().engine.model.transformer.h[0].attn.c_attn, (Int8Linear, Bf16Linear))
    prompt = served.format_chat([{"role": "user", "content": "Hello there! How are you?"}])
    assert served.generate(prompt, GREEDY) == fp32.generate(prompt, GREEDY)
    assert (tiny_native_ckpt / "model.safetensors").read_bytes() == before


def test_the_default_native_backend_on_cpu_serves_the_measured_default_format(tiny_native_ckpt):
    model = create_backend("native", checkpoint=str(tiny_native_ckpt))._model().engine.model
    product = model.transformer.h[0].attn.c_attn
    assert type(product) is {"int8": Int8Linear, "bf16": Bf16Linear, "fp32": torch.nn.Linear}[CPU_DEFAULT]


def test_a_bad_weights_value_is_one_sentence_that_names_the_formats(tiny_native_ckpt):
    with pytest.raises(BackendError, match=r"weights must be one of auto, int8, bf16, fp32 \(got 'int4'\)"):
        create_backend("native", checkpoint=str(tiny_native_ckpt), weights="int4")
    with pytest.raises(BackendError, match="set only one of them"):
        create_backend("native", checkpoint=str(tiny_native_ckpt), weights="int8", dtype="bf16")


def test_weight_format_resolution():
    cpu = torch.device("cpu")
    assert resolve_weight_format("auto", cpu, None) == (CPU_DEFAULT, torch.float32)
    assert resolve_weight_format(None, cpu, "bf16") == (None, torch.bfloat16)  # a dtype alone keeps its meaning
    assert resolve_weight_format("bf16", cpu, None) == ("bf16", torch.float32)  # bf16 weights, fp32 elsewhere
    assert resolve_weight_format("fp32", cpu, "fp32") == ("fp32", torch.float32)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_weight_format("int8", torch.device("meta"), None)
