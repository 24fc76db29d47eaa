"""One Triton kernel for batch-1 decoding: norm → matrix-vector product → bias → activation → residual.

    out = fused_gemv(x, weight, bias, norm=("layernorm", ln.weight, ln.bias, ln.eps), act="gelu_tanh")
    out = fused_gemv(x, weight, bias, residual=x_res)          # x_res + x @ weight.T + bias
    out = fused_rows(xs, weight, bias, norm=..., act=...)        # the same for a batch xs (B, K): (B, N)

`x` is one token's hidden state, shape (K,); `weight` is an nn.Linear weight (N, K) (for `act="swiglu"`,
(2N, K): gate rows then up rows, as gpt/model.py's SwiGLU MLP stores them). The static decoder
(gpt/fast_decode.py) uses it on CUDA: at batch 1 cuBLAS runs these products with matrix-multiply tiles
that leave most of the GPU idle (~4.5 µs for a 2304×768 bf16 product whose bytes take ~1.2 µs), and each
norm, bias, activation and residual add is one more launch. One kernel per product, with a few rows per
program so that every SM streams weights, halves a GPT-2-124M step.

Rounding follows the unfused modules (LayerNorm output, linear output, activation output and the residual
sum are each rounded to the model's dtype), so the fused step computes what the modules compute up to the
order of additions inside the dot products. `fused_gemv_reference` is that same computation in torch.

`fused_rows` is the batched form the scheduler's decode step uses (gpt/fused_step.py): each program
loads a tile of BLOCK_N weight rows once and multiplies it with 16 batch rows in one tensor-core product,
so a batch of 16 reads the weights once, as a batch of one does. Every batch row is computed with the same
tile sizes and order of additions whatever the batch size, so a row's result does not depend on the
batch it is in (a seeded reply is the same alone or batched).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the static decoder then uses the torch modules
    triton = None

NORMS = {None: 0, "layernorm": 1, "rmsnorm": 2}
ACTS = {None: 0, "gelu_tanh": 1, "swiglu": 2}


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def fused_gemv_reference(x, weight, bias=None, *, norm=None, act=None, residual=None) -> torch.Tensor:
    """The unfused computation (what the model's modules do), for CPU and for checking the kernel."""
    if norm is not None:
        kind, nw, nb, eps = norm
        if kind == "layernorm":
            x = F.layer_norm(x, x.shape[-1:], nw, nb, eps)
        else:
            xf = x.float()
            x = nw * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    h = F.linear(x, weight, bias)
    if act == "gelu_tanh":
        h = F.gelu(h, approximate="tanh")
    elif act == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    return h if residual is None else residual + h


def fused_gemv(x, weight, bias=None, *, norm=None, act=None, residual=None) -> torch.Tensor:
    """`fused_gemv_reference` in one Triton launch; x (K,), weight (N, K) or (2N, K) for swiglu."""
    rows, K = weight.shape
    N = rows // 2 if act == "swiglu" else rows
    out = torch.empty(N, device=x.device, dtype=x.dtype)
    kind, nw, nb, eps = norm if norm is not None else (None, None, None, 0.0)
    block_n = max(1, min(16, triton.next_power_of_2(N // 264 + 1) // 2))  # >= ~2 programs per SM
    block_k = min(triton.next_power_of_2(K), 1024)
    dummy = weight  # pointer for absent operands; never read (the flags say so)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else dummy, nw if nw is not None else dummy,
        nb if nb is not None else dummy, residual if residual is not None else dummy, out,
        N, float(eps), K=K,
        HAS_BIAS=bias is not None, NORM=NORMS[kind], HAS_NORM_BIAS=nb is not None, ACT=ACTS[act],
        HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def fused_rows(x, weight, bias=None, *, norm=None, act=None, residual=None) -> torch.Tensor:
    """`fused_gemv_reference` for a batch in one Triton launch; x (B, K) contiguous, weight (N, K) or (2N, K)
    for swiglu, residual (B, N); the model's dtype must be bf16 or fp16 (tensor-core products)."""
    B, K = x.shape
    rows, _ = weight.shape
    N = rows // 2 if act == "swiglu" else rows
    out = torch.empty(B, N, device=x.device, dtype=x.dtype)
    kind, nw, nb, eps = norm if norm is not None else (None, None, None, 0.0)
    block_n, block_k, stages, warps = _rows_tiles(N, K)
    split = SPLIT_K(N, K) if norm is None and act is None else 1
    if K % split or (K // split) % block_k:  # each part must be whole K chunks
        split = 1
    dummy = weight
    grid = (triton.cdiv(N, block_n), triton.cdiv(B, ROWS), split)
    parts, counts = dummy, dummy
    if split > 1:
        parts = torch.empty(grid[0] * grid[1] * split * ROWS * block_n, device=x.device, dtype=torch.float32)
        counts = _counters(x.device, grid[0] * grid[1])
    _rows_kernel[grid](
        x, weight, bias if bias is not None else dummy, nw if nw is not None else dummy,
        nb if nb is not None else dummy, residual if residual is not None else dummy, out, parts, counts,
        B, N, float(eps), K=K, SPLIT=split,
        HAS_BIAS=bias is not None, NORM=NORMS[kind], HAS_NORM_BIAS=nb is not None, ACT=ACTS[act],
        HAS_RES=residual is not None, BLOCK_B=ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)
    return out


def _rows_tiles(N: int, K: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, pipeline stages, warps) by the product's shape only, never by the batch (so a row's
    sums do not depend on its batch). Swept on an H100 (2026-11-22, GPT-2-124M shapes, 24-64 weight copies so they come from memory): 2304x768
    went from 8.2 to 5.1 µs at batch 1 with 256-wide K chunks and 3 stages (3072x768: 8.4 to 5.5), the
    vocabulary product from 33.3 to 31.1 µs with 64 rows and 8 warps. The two 768-wide plain products
    split K (SPLIT_K): 768x3072 6.9 -> 5.8 µs in 6 parts of 512, 768x768 4.0 -> 3.9 at batch 16 in 3."""
    if K >= 2048:
        return 32, 128, 3, 4
    if N >= 8192:
        return 64, 128, 3, 8
    return 32, 256, 3, 4


ROWS = 16  # batch rows per program: the smallest tensor-core tile


def SPLIT_K(N: int, K: int) -> int:  # noqa: N802 - a table, patched by sweeps
    """Programs sharing one tile's K range (plain products only): long rows with few tiles leave SMs idle."""
    if N > 1024:
        return 1
    return 6 if K >= 2048 else 3


_COUNTS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters for split-K, zero between launches (the last program of a tile resets its
    own), shared by launches on one stream."""
    have = _COUNTS.get(device)
    if have is None or have.numel() < n:
        have = _COUNTS[device] = torch.zeros(max(n, 4096), device=device, dtype=torch.int32)
    return have


if triton is not None:

    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, nb_ptr, res_ptr, out_ptr, parts_ptr, counts_ptr, B, N, eps,
                     K: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                     HAS_NORM_BIAS: tl.constexpr,
                     ACT: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        dtype = out_ptr.dtype.element_ty
        rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        mean = tl.zeros([BLOCK_B], dtype=tl.float32)
        rstd = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        if NORM != 0:  # per-row statistics in fp32, two passes as the LayerNorm kernel does
            total = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                c = k0 + ks
                m = row_ok[:, None] & (c < K)[None, :]
                total += tl.load(x_ptr + rows[:, None] * K + c[None, :], mask=m, other=0.0).to(tl.float32)
            if NORM == 1:
                mean = tl.sum(total, axis=1) / K
            sq = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                c = k0 + ks
                m = row_ok[:, None] & (c < K)[None, :]
                xc = tl.load(x_ptr + rows[:, None] * K + c[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None]
                sq += tl.where(m, xc * xc, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / K + eps)
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        part = tl.program_id(2)
        for k0 in range(part * (K // SPLIT), (part + 1) * (K // SPLIT), BLOCK_K):
            c = k0 + ks
            k_ok = c < K
            xv = tl.load(x_ptr + rows[:, None] * K + c[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            if NORM == 1:
                nwv = tl.load(nw_ptr + c, mask=k_ok, other=0.0).to(tl.float32)
                xv = (xv - mean[:, None]) * rstd[:, None] * nwv[None, :]
                if HAS_NORM_BIAS:
                    xv += tl.load(nb_ptr + c, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            elif NORM == 2:
                nwv = tl.load(nw_ptr + c, mask=k_ok, other=0.0).to(tl.float32)
                xv = (xv * rstd[:, None]).to(dtype).to(tl.float32) * nwv[None, :]
            xb = xv.to(dtype)
            wm = col_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + cols[:, None] * K + c[None, :], mask=wm, other=0.0)
            acc = tl.dot(xb, tl.trans(w), acc)
            if ACT == 2:
                wu = tl.load(w_ptr + (cols[:, None] + N) * K + c[None, :], mask=wm, other=0.0)
                acc_up = tl.dot(xb, tl.trans(wu), acc_up)
        last = True
        if SPLIT > 1:  # each part stores its sums; the last to arrive adds them in part order (deterministic)
            tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            cell = tl.arange(0, BLOCK_B)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tl.store(parts_ptr + (tile * SPLIT + part) * BLOCK_B * BLOCK_N + cell, acc)
            tl.debug_barrier()
            arrived = tl.atomic_add(counts_ptr + tile, 1, sem="acq_rel")
            last = arrived == SPLIT - 1
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            for p in range(SPLIT):
                acc += tl.load(parts_ptr + (tile * SPLIT + p) * BLOCK_B * BLOCK_N + cell, mask=last & (cell >= 0),
                               other=0.0, cache_modifier=".cg")
            tl.store(counts_ptr + tile, 0, mask=last)
        h = acc
        if HAS_BIAS:
            h += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        h = h.to(dtype).to(tl.float32)
        if ACT == 1:
            u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
            h = (0.5 * h * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))).to(dtype).to(tl.float32)
        elif ACT == 2:
            up = acc_up
            if HAS_BIAS:
                up += tl.load(b_ptr + cols + N, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            up = up.to(dtype).to(tl.float32)
            gate = (h * tl.sigmoid(h)).to(dtype).to(tl.float32)
            h = (gate * up).to(dtype).to(tl.float32)
        offs = rows[:, None] * N + cols[None, :]
        om = row_ok[:, None] & col_ok[None, :] & last
        if HAS_RES:
            h += tl.load(res_ptr + offs, mask=om, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, h.to(dtype), mask=om)


    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, nb_ptr, res_ptr, out_ptr, N, eps, K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
                     ACT: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        dtype = out_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols0 = tl.arange(0, BLOCK_K)
        mean = 0.0
        rstd = 1.0
        if NORM != 0:  # statistics of x in fp32, two passes as the LayerNorm kernel does
            total = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                c = k0 + cols0
                total += tl.load(x_ptr + c, mask=c < K, other=0.0).to(tl.float32)
            if NORM == 1:
                mean = tl.sum(total, axis=0) / K
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                c = k0 + cols0
                xc = tl.load(x_ptr + c, mask=c < K, other=0.0).to(tl.float32) - mean
                sq += tl.where(c < K, xc * xc, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols0
            col_ok = c < K
            xv = tl.load(x_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
            if NORM == 1:
                xv = (xv - mean) * rstd * tl.load(nw_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
                if HAS_NORM_BIAS:
                    xv += tl.load(nb_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
                xv = xv.to(dtype).to(tl.float32)
            elif NORM == 2:  # the model's RMSNorm rounds the normalised x, then multiplies by the weight
                xv = (xv * rstd).to(dtype).to(tl.float32)
                xv = (xv * tl.load(nw_ptr + c, mask=col_ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            mask2 = row_ok[:, None] & col_ok[None, :]
            w = tl.load(w_ptr + rows[:, None] * K + c[None, :], mask=mask2, other=0.0).to(tl.float32)
            acc += w * xv[None, :]
            if ACT == 2:
                wu = tl.load(w_ptr + (rows[:, None] + N) * K + c[None, :], mask=mask2, other=0.0).to(tl.float32)
                acc_up += wu * xv[None, :]
        h = tl.sum(acc, axis=1)
        if HAS_BIAS:
            h += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        h = h.to(dtype).to(tl.float32)
        if ACT == 1:  # GPT-2's tanh GELU; tanh(u) = 2·sigmoid(2u) − 1
            u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
            h = (0.5 * h * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))).to(dtype).to(tl.float32)
        elif ACT == 2:
            up = tl.sum(acc_up, axis=1)
            if HAS_BIAS:
                up += tl.load(b_ptr + rows + N, mask=row_ok, other=0.0).to(tl.float32)
            up = up.to(dtype).to(tl.float32)
            gate = (h * tl.sigmoid(h)).to(dtype).to(tl.float32)
            h = (gate * up).to(dtype).to(tl.float32)
        if HAS_RES:
            h += tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, h.to(dtype), mask=row_ok)
