"""Prompt prefill on CUDA: products a row's result of which does not depend on the rows beside it, and CUDA graphs.

    with invariant_products(model):           # the model's bf16/fp16 CUDA nn.Linear layers use the kernel below
        logits = model(ids, cache=view, last_at=ends)
    graphs = PrefillGraphs(model, slots, max_tokens=8192)
    logits = graphs.run(chunks, ends, row=3)  # first chunks of rows 3.. as one graph replay; (n, V) or None

The scheduler (gpt/scheduler.py) prefills the prompts of requests that arrive together in one forward:
sixteen 400-token prompts are one (6400, 768) product per layer instead of sixteen (400, 768) ones. cuBLAS
picks its algorithm (tile sizes, split-K) by the product's shape, and flash attention splits the keys by
how many rows and heads there are, so the same prompt's keys and values came out differently rounded alone
and in a group, and a seeded reply changed with the company it arrived in (measured on the H100: 1 of 16
sampled replies the same as alone, against 16 of 16 with one prefill per request). The kernel here computes
every output tile with one tile shape and one order of additions along K whatever the number of rows, and
attention takes the memory-efficient kernel (an explicit mask; gpt/slots.py `PrefillView`), so a prompt's
keys, values and first logits are the same bits alone or in a group; the decode step (gpt/gemv.py,
gpt/fused_step.py) is batch-invariant the same way.

An eager prefill forward is bound by the host launching ~200 small kernels (5-7 ms for 1 x 400 or 16 x 400
tokens of GPT-2 on the H100, the GPU mostly idle), which is the time to first token and, with sixteen
users, what stalls everyone's decoding. `PrefillGraphs` records the first chunk of a group's prompts
(position 0 on) as a CUDA graph per (rows, length) bucket, rows a power of two and length a multiple of
64: the padding costs GPU time the host launches used to hide, and keys and values go to a staging buffer
that is copied into the requests' rows after the replay. Later chunks of long prompts run eagerly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from gpt.slots import PrefillView, Slots, batch_buckets

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: prefill keeps nn.Linear (CPU products are not grouped differently)
    triton = None

BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M = 128, 128, 64, 8


def available(model: nn.Module) -> bool:
    """Triton is here and the model's products are bf16/fp16 on CUDA (what the kernel computes)."""
    w = model.lm_head.weight if hasattr(model, "lm_head") else next(model.parameters())
    return triton is not None and w.is_cuda and w.dtype in (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for x (..., K), weight (N, K): fp32 sums, rounded once to x's dtype."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], weight.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M:
        grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
        _mm_kernel[grid](x2, weight, bias if bias is not None else weight, out, M, N, K,
                         x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
                         HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                         GROUP_M=GROUP_M, num_warps=8, num_stages=3)
    return out.view(*x.shape[:-1], N)


class InvariantLinear(nn.Linear):
    """An nn.Linear whose inference products on CUDA go through `linear` (made by `invariant_products`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not torch.is_grad_enabled() and x.is_cuda and x.dtype == w.dtype:
            return linear(x, w, self.bias)
        return nn.functional.linear(x, w, self.bias)


@contextmanager
def invariant_products(model: nn.Module):
    """Inside it, the model's plain nn.Linear layers use the batch-invariant kernel; as before after it."""
    swapped = [m for m in model.modules() if type(m) is nn.Linear]
    for m in swapped:
        m.__class__ = InvariantLinear
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = nn.Linear


class PrefillGraphs:
    """First chunks of fresh prompts (positions 0..T) of up to `slots.rows` requests, replayed as CUDA graphs."""

    LENGTH_STEP = 64  # lengths are recorded in steps of this many positions

    def __init__(self, model: nn.Module, slots: Slots, max_tokens: int):
        """`max_tokens`: rows x length of the largest bucket (the scheduler's prefill chunk); the staging
        buffer holds that many positions' keys and values for every layer."""
        cfg = model.config
        self.model, self.slots, self.max_tokens = model, slots, max_tokens
        self.group = cfg.n_head // cfg.n_kv_head
        self._shape = (cfg.n_layer, cfg.n_kv_head, cfg.head_dim)
        per_token = cfg.n_layer * cfg.n_kv_head * cfg.head_dim
        device = slots.k.device
        self._k = torch.empty(per_token * max_tokens, dtype=slots.k.dtype, device=device)
        self._v = torch.empty_like(self._k)
        self._ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self._last = torch.zeros(slots.rows, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def bucket(self, n: int, T: int) -> tuple[int, int] | None:
        """The recorded shape that holds n rows of T positions, or None when it would exceed max_tokens."""
        rows = min(1 << (n - 1).bit_length(), self.slots.rows)  # the scheduler's decode buckets too
        length = min(-(-T // self.LENGTH_STEP) * self.LENGTH_STEP, self.slots.context)
        return (rows, length) if rows * length <= self.max_tokens else None

    def run(self, chunks: list[list[int]], ends: list[int], row: int) -> torch.Tensor | None:
        """Prefill rows [row, row + n) with their first chunks (n lists of one length T, padded) and return
        the logits (n, V) at each row's `ends` index; None when no bucket holds them (prefill eagerly)."""
        n, T = len(chunks), len(chunks[0])
        key = self.bucket(n, T)
        if key is None:
            return None
        rows, length = key
        ids = torch.zeros(rows, length, dtype=torch.long)
        ids[:n, :T] = torch.tensor(chunks)
        last = torch.zeros(rows, dtype=torch.long)
        last[:n] = torch.tensor(ends)
        self._ids[:rows * length].copy_(ids.view(-1))
        self._last[:rows].copy_(last)
        if key not in self._graphs:
            self._capture(length)
        graph, logits = self._graphs[key]
        graph.replay()
        k, v = self._staged(rows, length)
        self.slots.k[:, row:row + n, :, :T] = k[:, :n, :, :T]
        self.slots.v[:, row:row + n, :, :T] = v[:, :n, :, :T]
        return logits[:n, -1]  # read before the next replay of this bucket overwrites it

    def _staged(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers, heads, hd = self._shape
        shape = (layers, rows, heads, length, hd)
        size = layers * rows * heads * length * hd
        return self._k[:size].view(shape), self._v[:size].view(shape)

    def _forward(self, rows: int, length: int) -> torch.Tensor:
        k, v = self._staged(rows, length)
        view = PrefillView(k, v, 0, 0, rows, invariant=True, group=self.group)
        with invariant_products(self.model):
            return self.model(self._ids[:rows * length].view(rows, length), cache=view, last_at=self._last[:rows])

    def _capture(self, length: int) -> None:
        """Record every row bucket of one length at once (on the scheduler's thread, between its steps):
        how many of the requests that arrive together land in one group is up to their timing, and a
        recording costs ~25 ms, which should be paid the first time a length is seen, not again and again.
        Warm-up runs on a side stream compile the kernels and write only the staging buffer."""
        keys = [(rows, length) for rows in batch_buckets(self.slots.rows) if rows * length <= self.max_tokens]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for key in keys:
                for _ in range(2):
                    self._forward(*key)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for key in keys:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(*key)
            self._graphs[key] = (graph, logits)


if triton is not None:

    @triton.jit
    def _mm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
        # Tiles in groups of GROUP_M row blocks (neighbouring programs share weight tiles in L2). Which
        # program computes a tile changes with M; how the tile is computed does not.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        size_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
        pid_n = (pid % (GROUP_M * tiles_n)) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
            acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
