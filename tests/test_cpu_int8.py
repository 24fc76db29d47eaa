"""The AVX2 weight-only kernel (gpt/cpu_int8.py, csrc/cpu_int8_linear.cpp) against a dequantised fp32 reference.

The first test in a session compiles the kernel (~20-40 s on 2 cores) unless ~/.cache/nanogpt-chat/ext
already holds this source's build; the rest reuse it.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from gpt import cpu_int8
from gpt.quantize import INT8_GROUP, Int8Linear, quantize_groups, quantize_rows

pytestmark = pytest.mark.skipif(not cpu_int8.cpu_supports_avx2(), reason="the kernel needs AVX2 and FMA")


@pytest.fixture(scope="module")
def kernel():
    assert cpu_int8.available(), "the kernel did not build: see the logged line"
    return cpu_int8.wlinear


def weights(n: int, k: int, fmt: str, g: torch.Generator):
    """(weight as the kernel takes it, scale or None, the fp32 weight it stands for)."""
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None]
    if fmt == "bf16":
        wb = w.to(torch.bfloat16)
        return wb, None, wb.float()
    if fmt == "int8 rows":
        q, scale = quantize_rows(w)
        return q, scale.float(), q.float() * scale.float()[:, None]
    q, scale = quantize_groups(w, 16)
    return q, scale, (q.float().view(n, -1, 16) * scale[:, :, None]).view(n, k)


@pytest.mark.parametrize("fmt", ["int8 rows", "int8 groups", "bf16"])
@pytest.mark.parametrize("m,n,k", [(1, 37, 48), (1, 576, 64), (2, 9, 32), (5, 43, 80), (16, 130, 96), (7, 3, 16)])
def test_kernel_equals_the_dequantised_fp32_product(kernel, fmt, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w, scale, reference_w = weights(n, k, fmt, g)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    torch.testing.assert_close(kernel(x, w, scale, bias), F.linear(x, reference_w, bias), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernel(x, w, scale, None), F.linear(x, reference_w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 7, 13, 19])
def test_row_lengths_that_are_not_a_multiple_of_eight_are_summed_to_the_end(kernel, k):
    g = torch.Generator().manual_seed(k)
    q, scale = quantize_rows(torch.randn(11, k, generator=g))
    x = torch.randn(3, k, generator=g)
    torch.testing.assert_close(kernel(x, q, scale.float()), F.linear(x, q.float() * scale.float()[:, None]),
                               atol=1e-5, rtol=1e-5)


def test_strided_and_transposed_inputs_give_the_contiguous_result(kernel):
    g = torch.Generator().manual_seed(3)
    q, scale = quantize_groups(torch.randn(50, 64, generator=g), 16)
    wide = torch.randn(4, 200, generator=g)
    rows = wide[:, 10:74]  # rows 200 floats apart
    expected = kernel(rows.contiguous(), q, scale)
    torch.testing.assert_close(kernel(rows, q, scale), expected, atol=0, rtol=0)
    transposed = rows.t().contiguous().t()  # column-major: the kernel copies it first
    torch.testing.assert_close(kernel(transposed, q, scale), expected, atol=0, rtol=0)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel):
    """A seeded reply is the same alone or batched: every row is summed in the same order for any M."""
    g = torch.Generator().manual_seed(4)
    for w, scale, _ in (weights(70, 128, fmt, g) for fmt in ("int8 rows", "int8 groups", "bf16")):
        x = torch.randn(16, 128, generator=g)
        alone = torch.cat([kernel(x[i:i + 1], w, scale) for i in range(16)])
        for m in (2, 3, 8, 16):
            assert torch.equal(kernel(x[:m], w, scale), alone[:m])


def test_bad_operands_are_one_clear_error(kernel):
    q, scale = quantize_rows(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="x must be"):
        kernel(torch.randn(2, 16, dtype=torch.float64), q, scale.float())
    with pytest.raises(RuntimeError, match="groups"):
        kernel(torch.randn(2, 16), q, torch.ones(8, 3))


def test_int8_linear_runs_the_kernel_for_decode_rows_and_fp32_gemm_for_a_prompt(kernel):
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(128, 96)
    q = Int8Linear.from_linear(lin)
    assert q.group == INT8_GROUP and q.scale32.shape == (96, 128 // INT8_GROUP)  # scale groups: the kernel runs
    x = torch.randn(1, 20, 128, generator=g)
    reference = F.linear(x, q.dequantized(), lin.bias)
    torch.testing.assert_close(q(x), reference, atol=1e-4, rtol=1e-4)  # 20 rows: fp32 GEMM
    torch.testing.assert_close(q(x[:, :1]), reference[:, :1], atol=1e-4, rtol=1e-4)  # 1 row: the kernel
    assert (q(x) - lin(x)).abs().max() < 0.02 * lin(x).abs().max()


def test_without_the_kernel_one_line_is_logged_and_pytorchs_ops_serve(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(cpu_int8, "SOURCE", tmp_path / "missing.cpp")
    monkeypatch.setattr(cpu_int8, "_state", {})
    with caplog.at_level(logging.WARNING, logger="gpt.cpu_int8"):
        assert not cpu_int8.available() and not cpu_int8.available()
    assert len(caplog.records) == 1 and "using PyTorch's" in caplog.records[0].getMessage()
    lin = torch.nn.Linear(128, 24)
    q = Int8Linear.from_linear(lin)
    assert q.group == 128  # one scale per row: what `_weight_int8pack_mm` takes
    x = torch.randn(2, 128)
    assert (q(x) - lin(x)).abs().max() < 0.03 * lin(x).abs().max()


def test_kernel_rms_norm_equals_the_model_norm_and_leaves_training_to_pytorch(kernel):
    from gpt.model import RMSNorm
    from gpt.quantize import KernelRMSNorm

    g = torch.Generator().manual_seed(6)
    norm = RMSNorm(37, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(37, generator=g))
    x = torch.randn(2, 3, 37, generator=g) * 4
    reference = norm(x)
    norm.__class__ = KernelRMSNorm
    with torch.no_grad():
        torch.testing.assert_close(norm(x), reference, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    norm(x).sum().backward()  # a gradient is wanted: PyTorch's ops, which autograd can follow
    assert x.grad is not None and norm.weight.grad is not None


def test_decode_attention_equals_sdpa_and_reads_only_each_rows_own_positions(kernel):
    g = torch.Generator().manual_seed(7)
    b, kv_heads, group, hd, span = 3, 2, 3, 32, 50
    cache_k, cache_v = (torch.randn(b, kv_heads, 80, hd, generator=g) for _ in range(2))
    k, v = cache_k[:, :, :span], cache_v[:, :, :span]  # views of a longer cache, as the slots hand them over
    q = torch.randn(b, kv_heads * group, 1, hd, generator=g)
    pos = torch.tensor([0, 17, 49])
    hidden = torch.arange(span)[None, :] > pos[:, None]
    mask = torch.zeros(b, 1, 1, span).masked_fill_(hidden.view(b, 1, 1, span), float("-inf"))
    out = cpu_int8.decode_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                               atol=1e-5, rtol=1e-5)
    k[hidden[:, None, :].expand(b, kv_heads, span)] = float("nan")  # what a row must not read
    alone = torch.cat([cpu_int8.decode_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i:i + 1]) for i in range(b)])
    assert torch.equal(cpu_int8.decode_attention(q, k, v, mask), out) and torch.equal(alone, out)
