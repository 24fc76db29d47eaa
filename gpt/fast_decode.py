"""Static-cache decoding: one token per step with fixed shapes, replayed as a CUDA graph.

    decoder = StaticDecoder(model)             # a cache for the model's whole context, made once
    logits = decoder.prefill(prompt_ids)       # (1, vocab): logits after the last prompt token
    logits = decoder.step(next_id)             # next_id: (1,) long tensor on the model's device

`gpt.engine.Engine` uses it on CUDA; callers should go through the engine.

Why: at batch 1 a 124M model on a GPU is bound by launching ~200 small kernels per token, not by the
GPU. Here the position lives in a device tensor and attention reads a fixed-length window of the
preallocated cache (slots past the current position masked out), so one step has fixed shapes and no
host-side branches: it is captured once per window length as a CUDA graph and then replayed per token.
Windows grow in steps of `window` positions, so attention reads fewer than `window` unused slots and a
long context costs a handful of graphs. Where Triton runs, each block is four fused matrix-vector
kernels (norm, product, bias, activation and residual in one launch: gpt/gemv.py) plus attention.
`compile=True` instead traces the module step with torch.compile before capture (slower today: see
docs/benchmarks.md). Greedy decoding picks the argmax inside the step and runs one step ahead.

On CPU the same step runs eagerly; tests use that to pin that it picks the same tokens as the plain path.
The logits a step returns live in a buffer the next step overwrites: use them before calling step again.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from gpt import gemv
from gpt.gemv import fused_gemv
from gpt.model import GPT, apply_rope


class StaticDecoder:
    def __init__(self, model: GPT, max_len: int | None = None, *, window: int = 256, graphs: bool | None = None,
                 fused: bool | None = None, compile: bool = False):
        cfg = model.config
        self.model = model.eval()
        self.max_len = min(max_len or cfg.block_size, cfg.block_size)
        self.window = window
        device = model.transformer.wte.weight.device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        # Fused Triton matrix-vector kernels where Triton runs; torch.compile traces the modules instead.
        self.fused = gemv.available(device) and not compile if fused is None else fused
        with torch.inference_mode():
            self.cache = model.new_cache(1, self.max_len)
            # Keys and values of a layer side by side in one tensor, so that GPT-2's fused qkv output is
            # written into the cache by one copy per layer; the model's plain forward sees the same views.
            self.kv = torch.zeros((2, *self.cache.k.shape), device=device, dtype=self.cache.k.dtype)
            self.cache.k, self.cache.v = self.kv[0], self.kv[1]
            self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
            self.pos = torch.zeros(1, dtype=torch.long, device=device)
            self.slots = torch.arange(self.max_len, device=device)
            # Full rope tables once, in the model's dtype; a step picks its row with index_select.
            self.rope = model._rope(0, cfg.block_size, device) if cfg.pos == "rope" else None
        self.length = 0  # cache positions filled
        self._step = torch.compile(self._forward_step, fullgraph=True, dynamic=False) if compile else self._forward_step
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Run the prompt through the model into a fresh cache; logits (1, vocab) for its last position."""
        if not 0 < len(prompt_ids) < self.max_len:
            raise ValueError(f"the prompt must have 1 to {self.max_len - 1} tokens, got {len(prompt_ids)}")
        self.cache.reset()
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.token.device)
        logits = self.model(ids, cache=self.cache, last_only=True)[:, -1, :]
        self.length = len(prompt_ids)
        return logits

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token (at position `length`); logits (1, vocab) for the next one."""
        self.token.copy_(token.view(1, 1))
        self.pos.fill_(self.length)
        return self._run(greedy=False)[:, -1, :]

    @torch.inference_mode()
    def greedy(self, first: torch.Tensor, n: int) -> Iterator[int]:
        """Yield `first` (a (1,) id tensor) and then n - 1 greedy ids, each step's argmax feeding the next.

        The argmax, the next input and the position advance happen inside the step (inside its CUDA graph),
        and step t+1 is queued before id t is read back, so the GPU never waits for Python. When the
        caller stops early, the one step queued ahead is simply overwritten by the next prefill.
        """
        self.token.copy_(first.view(1, 1))
        self.pos.fill_(self.length)
        if not self.graphs:
            yield int(first.item())
            for _ in range(n - 1):
                self._run(greedy=True)
                yield int(self.token.item())
            return
        ring = [torch.empty(1, dtype=torch.long, pin_memory=True) for _ in range(2)]
        ready = [torch.cuda.Event() for _ in range(2)]

        def launch(i: int) -> None:
            self._run(greedy=True)
            ring[i % 2].copy_(self.token.view(1), non_blocking=True)
            ready[i % 2].record()

        if n > 1:
            launch(1)
        yield int(first.item())
        for i in range(1, n):
            if i + 1 < n:
                launch(i + 1)  # queued behind step i on the stream; it reads the id step i writes
            ready[i % 2].synchronize()
            yield int(ring[i % 2].item())

    def _run(self, greedy: bool) -> torch.Tensor:
        if self.length >= self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions and is full")
        span = min(-(-(self.length + 1) // self.window) * self.window, self.max_len)
        if self.graphs:
            graph, out = self._graphs.get((span, greedy)) or self._capture(span, greedy)
            graph.replay()
        else:
            out = self._greedy_step(span) if greedy else self._step(span)
        self.length += 1
        return out

    def _greedy_step(self, span: int) -> torch.Tensor:
        logits = self._step(span)
        self.token.copy_(logits[:, -1, :].float().argmax(dim=-1).view(1, 1))  # what sample_next does at T=0
        self.pos.add_(1)
        return logits

    def _capture(self, span: int, greedy: bool):
        # Warm up on a side stream (cuBLAS workspaces, compiled kernels), then record one step. The warm-up
        # writes this position's keys and values, exactly what the real step writes again; the input id
        # and position it may advance are put back before recording.
        body = self._greedy_step if greedy else self._step
        saved_token, saved_pos = self.token.clone(), self.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                body(span)
                self.token.copy_(saved_token)
                self.pos.copy_(saved_pos)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = body(span)
        self._graphs[(span, greedy)] = (graph, out)
        return graph, out

    def _forward_step(self, span: int) -> torch.Tensor:
        """The model's forward for one token at position `self.pos`, attending over cache slots [0, span)."""
        model, cfg = self.model, self.model.config
        x = model.transformer.wte(self.token)
        rope = None
        if cfg.pos == "learned":
            x = x + model.transformer.wpe(self.pos)
        else:
            cos, sin = self.rope
            rope = cos.index_select(0, self.pos), sin.index_select(0, self.pos)
        # One additive mask per step, shared by all layers: 0 for filled slots, -inf past the position.
        hidden = (self.slots[:span] > self.pos).view(1, 1, 1, span)
        visible = torch.zeros(1, 1, 1, span, dtype=x.dtype, device=x.device).masked_fill(hidden, float("-inf"))
        for layer, block in enumerate(model.transformer.h):
            if self.fused:
                x = self._fused_block(block, x.view(-1), layer, span, rope, visible).view(1, 1, -1)
            else:
                y = self._attend(block.attn.c_attn(block.ln_1(x)), layer, span, rope, visible)
                x = x + block.attn.c_proj(y)
                x = x + block.mlp(block.ln_2(x))
        return model.lm_head(model.transformer.ln_f(x))

    def _fused_block(self, block, x, layer: int, span: int, rope, visible) -> torch.Tensor:
        """One block on a (C,) hidden vector in four fused kernels plus attention (gpt/gemv.py)."""
        attn, mlp = block.attn, block.mlp
        qkv = fused_gemv(x, attn.c_attn.weight, attn.c_attn.bias, norm=_norm_args(block.ln_1))
        y = self._attend(qkv.view(1, 1, -1), layer, span, rope, visible)
        x = fused_gemv(y.view(-1), attn.c_proj.weight, attn.c_proj.bias, residual=x)
        h = fused_gemv(x, mlp.c_fc.weight, mlp.c_fc.bias, norm=_norm_args(block.ln_2),
                       act="swiglu" if mlp.swiglu else "gelu_tanh")
        return fused_gemv(h, mlp.c_proj.weight, mlp.c_proj.bias, residual=x)

    def _attend(self, qkv, layer: int, span: int, rope, visible) -> torch.Tensor:
        """Attention of one position given its fused q|k|v projection (1, 1, D); output (1, 1, n_embd)."""
        cfg = self.model.config
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        q = qkv[..., :nh * hd].view(1, 1, nh, hd).transpose(1, 2)
        kv = self.kv[:, layer]  # (2, 1, n_kv_head, max_len, head_dim)
        if rope is None:  # k and v are adjacent in the qkv output: one copy writes both
            kv.index_copy_(3, self.pos, qkv[..., nh * hd:].view(1, 2, nkv, 1, hd).transpose(0, 1))
        else:
            k = qkv[..., nh * hd:(nh + nkv) * hd].view(1, 1, nkv, hd).transpose(1, 2)
            v = qkv[..., (nh + nkv) * hd:].view(1, 1, nkv, hd).transpose(1, 2)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            kv[0].index_copy_(2, self.pos, k)
            kv[1].index_copy_(2, self.pos, v)
        keys, values = kv[0], kv[1]
        y = F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], attn_mask=visible,
                                           enable_gqa=nkv != nh)
        return y.transpose(1, 2).reshape(1, 1, cfg.n_embd)


def _norm_args(norm: torch.nn.Module) -> tuple:
    if isinstance(norm, torch.nn.LayerNorm):
        return "layernorm", norm.weight, norm.bias, norm.eps
    return "rmsnorm", norm.weight, None, norm.eps
