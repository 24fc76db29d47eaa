"""The scheduler's decode step on CUDA in few kernels: fused products (gpt/gemv.py) and one-query attention.

    if fused_step.available(model):
        logits = fused_step.forward(model, slots, b)     # (b, vocab): one token for rows [0, b) of gpt/slots.py

Why: a decode step of a 124M model at batch 1-16 is bound by kernel count and latency, not by bytes
(the weights take ~85 µs to read on an H100). The module forward runs ~200 kernels per step, and
PyTorch's attention for one query per row over a masked cache span ran ~50 µs per layer at batch 16.
Here a block is four fused products (norm, product, bias, activation, residual in one launch each) and
two attention kernels: `_attend_kernel` reads each row's past keys and values only up to its own
position (no mask, no padding span), adds the current token's key and value straight from the q|k|v
product and writes them into the cache itself; the past is cut into pieces of `PIECE` positions read by
programs of their own, so that a batch of one still spreads over the GPU, and `_combine_kernel` merges
the pieces. The final norm is fused into
the vocabulary product.

Every kernel computes a batch row the same way whatever the batch size (fixed tiles, fixed split
count, pieces by position), so a request's logits do not depend on the batch it runs in. The results match the module
forward up to the order of additions (checked on the GPU by `benchmarks.serve --check`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt import gemv
from gpt.gemv import fused_rows
from gpt.model import GPT, apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

PIECE = 128  # cache positions one attention program reads (pieces of a row's past run in parallel)
# Cache positions per load and warps per program: a step-level sweep on an H100 (2026-11-22, batch 1 and 16,
# rows at position 600) went from 501 / 670 µs a step (64, 4 warps) to 464 / 698 (128, 8 warps); (128, 2)
# gave 495 / 648, but in the benchmark 8 warps served one stream at ~2,000 tok/s against ~1,820 and 16
# streams alike. One setting for every batch size: the warps decide the order of the sums.
BLOCK_S = 128
ATTEND_WARPS = 8


def available(model: GPT) -> bool:
    """The fused step runs the model: CUDA with Triton, bf16/fp16 weights, plain linear layers."""
    w = model.transformer.wte.weight
    if not gemv.available(w.device) or w.dtype not in (torch.bfloat16, torch.float16):
        return False
    layers = [model.lm_head] + [m for blk in model.transformer.h
                                for m in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj)]
    return all(type(m) is nn.Linear for m in layers)  # quantised or adapted layers take the module forward


def _norm_args(norm: nn.Module) -> tuple:
    if isinstance(norm, nn.LayerNorm):
        return "layernorm", norm.weight, norm.bias, norm.eps
    return "rmsnorm", norm.weight, None, norm.eps


def forward(model: GPT, slots, b: int) -> torch.Tensor:
    """Logits (b, vocab) for rows [0, b) of `slots` (gpt/slots.py): each row's `tokens` entry at its `pos`,
    attending over its cached positions [0, pos); the step writes each row's key and value at `pos`."""
    cfg, tr = model.config, model.transformer
    tokens, pos, active = slots.tokens[:b], slots.pos[:b], slots.active[:b]
    where = pos.clamp(max=slots.context - 1)  # inactive rows sit at the scratch position, past the context
    x = tr.wte(tokens)
    rope = None
    if cfg.pos == "learned":
        x = x + tr.wpe(where)
    else:
        cos, sin = model._rope(0, cfg.block_size, x.device)
        rope = cos[where][:, None, :], sin[where][:, None, :]  # (b, 1, hd)
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    for layer, block in enumerate(tr.h):
        attn, mlp = block.attn, block.mlp
        qkv = fused_rows(x, attn.c_attn.weight, attn.c_attn.bias, norm=_norm_args(block.ln_1))
        if rope is not None:  # q and k heads are adjacent: one rotation for both, in place
            qk = qkv[:, :(nh + nkv) * hd].view(b, nh + nkv, hd)
            qk.copy_(apply_rope(qk, *rope))
        y = attend(qkv, slots.k[layer], slots.v[layer], pos, active, nh, nkv, hd)
        x = fused_rows(y, attn.c_proj.weight, attn.c_proj.bias, residual=x)
        h = fused_rows(x, mlp.c_fc.weight, mlp.c_fc.bias, norm=_norm_args(block.ln_2),
                       act="swiglu" if mlp.swiglu else "gelu_tanh")
        x = fused_rows(h, mlp.c_proj.weight, mlp.c_proj.bias, residual=x)
    return fused_rows(x, model.lm_head.weight, None, norm=_norm_args(tr.ln_f))


def attend(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
           active: torch.Tensor, nh: int, nkv: int, hd: int) -> torch.Tensor:
    """One query per row: softmax(q·k / sqrt(hd)) v over the row's cached positions [0, pos) (none for an
    inactive row) and its current key and value (from `qkv` (b, (nh + 2 nkv) hd)), which are also written
    into the caches (rows, nkv, positions, hd) at `pos`. Output (b, nh · hd) in the model's dtype."""
    b = qkv.shape[0]
    splits = triton.cdiv(k_cache.shape[2], PIECE)  # by the cache's length, never by the batch or the row
    m = torch.empty(b, nh, splits, device=qkv.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    acc = torch.empty(b, nh, splits, hd, device=qkv.device, dtype=torch.float32)
    _attend_kernel[(b, nh, splits)](
        qkv, k_cache, v_cache, pos, active, m, l_, acc, k_cache.stride(0), k_cache.stride(1), 1.0 / hd ** 0.5,
        splits, NH=nh, NKV=nkv, HD=hd, PIECE=PIECE, BLOCK_S=BLOCK_S, num_warps=ATTEND_WARPS)
    out = torch.empty(b, nh * hd, device=qkv.device, dtype=qkv.dtype)
    _combine_kernel[(b, nh)](m, l_, acc, out, splits, NH=nh, HD=hd, BLOCK=triton.next_power_of_2(splits),
                             num_warps=1)
    return out


def attend_reference(qkv, k_cache, v_cache, pos, active, nh: int, nkv: int, hd: int) -> torch.Tensor:
    """`attend` in torch ops, one row at a time (for checking the kernels on the GPU)."""
    b = qkv.shape[0]
    q = qkv[:, :nh * hd].view(b, nh, hd).float()
    k_new = qkv[:, nh * hd:(nh + nkv) * hd].view(b, nkv, hd)
    v_new = qkv[:, (nh + nkv) * hd:].view(b, nkv, hd)
    out = []
    for i in range(b):
        n = int(pos[i]) if bool(active[i]) else 0
        keys = torch.cat([k_cache[i, :, :n], k_new[i, :, None]], dim=1).float().repeat_interleave(nh // nkv, 0)
        values = torch.cat([v_cache[i, :, :n], v_new[i, :, None]], dim=1).float().repeat_interleave(nh // nkv, 0)
        att = (keys @ q[i, :, :, None]).squeeze(-1) / hd ** 0.5
        out.append((att.softmax(-1)[:, None, :] @ values).reshape(nh * hd))
        k_cache[i, :, int(pos[i])] = k_new[i]
        v_cache[i, :, int(pos[i])] = v_new[i]
    return torch.stack(out).to(qkv.dtype)


if triton is not None:

    @triton.jit
    def _attend_kernel(qkv_ptr, k_ptr, v_ptr, pos_ptr, active_ptr, m_ptr, l_ptr, acc_ptr, stride_row,
                       stride_head, scale, splits, NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr,
                       PIECE: tl.constexpr, BLOCK_S: tl.constexpr):
        row = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        g = h // (NH // NKV)
        d = tl.arange(0, HD)
        width = (NH + 2 * NKV) * HD
        p = tl.load(pos_ptr + row)
        n = tl.where(tl.load(active_ptr + row) != 0, p, 0)  # past positions this row reads
        q = tl.load(qkv_ptr + row * width + h * HD + d).to(tl.float32) * scale
        base = row.to(tl.int64) * stride_row + g * stride_head
        start = split * PIECE
        stop = tl.minimum(start + PIECE, n)
        # The current token, counted once (in piece 0): its key and value come from this step's product.
        k_new = tl.load(qkv_ptr + row * width + (NH + g) * HD + d)
        v_new = tl.load(qkv_ptr + row * width + (NH + NKV + g) * HD + d)
        first = split == 0
        m_i = tl.where(first, tl.sum(q * k_new.to(tl.float32), axis=0), -float("inf"))
        l_i = tl.where(first, 1.0, 0.0)
        acc = tl.where(first, v_new.to(tl.float32), 0.0)
        if first & (h % (NH // NKV) == 0):  # one program per key/value head writes them; all read only < p
            tl.store(k_ptr + base + p * HD + d, k_new)
            tl.store(v_ptr + base + p * HD + d, v_new)
        for s0 in range(start, stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < stop
            offs = base + s[:, None] * HD + d[None, :]
            keys = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
            scores = tl.where(ok, tl.sum(keys * q[None, :], axis=1), -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            probs = tl.exp(scores - m_new)
            values = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(probs, axis=0)
            acc = acc * alpha + tl.sum(probs[:, None] * values, axis=0)
            m_i = m_new
        at = (row * NH + h) * splits + split
        tl.store(m_ptr + at, m_i)
        tl.store(l_ptr + at, l_i)
        tl.store(acc_ptr + at * HD + d, acc)

    @triton.jit
    def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, splits, NH: tl.constexpr, HD: tl.constexpr,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0)
        h = tl.program_id(1)
        piece = tl.arange(0, BLOCK)
        ok = piece < splits
        at = (row * NH + h) * splits + piece
        m = tl.load(m_ptr + at, mask=ok, other=-float("inf"))
        weight = tl.exp(m - tl.max(m, axis=0))  # empty pieces have m = -inf: weight 0
        total = tl.sum(weight * tl.load(l_ptr + at, mask=ok, other=0.0), axis=0)
        d = tl.arange(0, HD)
        acc = tl.load(acc_ptr + at[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(weight[:, None] * acc, axis=0) / total
        tl.store(out_ptr + row * NH * HD + h * HD + d, out.to(out_ptr.dtype.element_ty))
