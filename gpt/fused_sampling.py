"""gpt/sampling.py's `sample_rows` for the scheduler's CUDA step in a few launches, plus the step's bookkeeping.

    if fused_sampling.fits(candidates):
        ids = fused_sampling.sample_step(logits, slots, b, candidates)   # also advances rows [0, b) of slots

The torch form runs ~80 kernels per step (~160-210 µs on an H100), most of them on the (batch, vocabulary)
logits one operation at a time. Here `_keys_kernel` applies the repetition penalty and temperature and
packs each score with its id into one order-preserving int64 (the tie rule of `top_candidates`: equal
scores in id order) in one pass; `torch.topk` picks the best `candidates` keys (a Triton sort of each
vocabulary chunk instead measured no faster at batch 1 and slower at 16); `_pick_kernel` does the rest
per row in registers (top-k by rank, top-p, the draw from the row's (seed, step) uniform, greedy rows
take the best id) and advances the row: next input id, output id, penalty mask, position, step.
The arithmetic is sample_rows' (the same penalty, division and tie order), so the same ids come out up
to the rounding of the softmax sums; on CPU and for wide top-k the torch form runs.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_CANDIDATES = 1024  # the widest top-k the pick kernel holds in registers; wider runs the torch form
BLOCK_V = 2048  # vocabulary ids per program of the key kernel


def fits(candidates: int) -> bool:
    return triton is not None and candidates <= MAX_CANDIDATES


def sample_step(logits: torch.Tensor, slots, b: int, candidates: int) -> torch.Tensor:
    """One id per row of `logits` (b, V) with each row's settings in `slots` (gpt/slots.py); updates the
    rows' tokens, out, seen, pos and steps as the torch form of the step does; returns slots.out[:b]."""
    V = logits.shape[1]
    s = slots.settings
    keys = torch.empty(b, V, dtype=torch.int64, device=logits.device)
    _keys_kernel[(b, triton.cdiv(V, BLOCK_V))](logits, slots.seen, s.penalty, s.temperature, keys, V,
                                                BLOCK=BLOCK_V, num_warps=8)
    top = torch.topk(keys, candidates, dim=-1).values  # keys are unique: the same ids every run
    _pick_kernel[(b,)](top, s.temperature, s.top_k, s.top_p, slots.uniforms, slots.steps, slots.active,
                       slots.seen, slots.tokens, slots.out, slots.pos, V, slots.context, candidates,
                       BLOCK=max(16, triton.next_power_of_2(candidates)), num_warps=4)
    return slots.out[:b]


if triton is not None:

    @triton.jit
    def _keys_kernel(logits_ptr, seen_ptr, pen_ptr, temp_ptr, keys_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        ids = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = ids < V
        at = row.to(tl.int64) * V + ids
        x = tl.load(logits_ptr + at, mask=ok, other=0.0).to(tl.float32)
        seen = tl.load(seen_ptr + at, mask=ok, other=0).to(tl.int1)
        pen = tl.load(pen_ptr + row)
        x = tl.where(seen, tl.where(x < 0, x * pen, tl.math.div_rn(x, pen)), x)
        t = tl.load(temp_ptr + row)
        x = tl.math.div_rn(x, tl.where(t > 0, t, 1.0))
        bits = x.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # integer order == float order
        tl.store(keys_ptr + at, ordered * 4294967296 + (V - 1 - ids), mask=ok)  # equal scores rank by id

    @triton.jit
    def _pick_kernel(top_ptr, temp_ptr, topk_ptr, topp_ptr, uni_ptr, steps_ptr, active_ptr, seen_ptr,
                     tokens_ptr, out_ptr, pos_ptr, V, context, K, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        rank = tl.arange(0, BLOCK)
        key = tl.load(top_ptr + row * K + rank, mask=rank < K, other=0)  # best first
        ids = (V - 1 - (key & 4294967295)).to(tl.int32)
        ordered = (key >> 32).to(tl.int32)
        vals = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
        keep = (rank < K) & (rank < tl.load(topk_ptr + row))
        vals = tl.where(keep, vals, -float("inf"))
        best = tl.max(vals, axis=0)
        e = tl.exp(vals - best)
        probs = e / tl.sum(e, axis=0)
        tail = tl.sum(probs, axis=0) - tl.cumsum(probs, axis=0) + probs  # mass from each rank to the end
        remove = (tail <= 1 - tl.load(topp_ptr + row)) & (rank > 0)
        e = tl.where(remove, 0.0, e)
        cdf = tl.cumsum(e, axis=0)
        step = tl.load(steps_ptr + row)
        u = tl.load(uni_ptr + row * (context + 1) + tl.minimum(step, context))
        chosen = tl.minimum(tl.sum((cdf < u * tl.sum(e, axis=0)).to(tl.int32), axis=0), K - 1)
        sampled = tl.sum(tl.where(rank == chosen, ids, 0), axis=0)
        greedy = tl.sum(tl.where(rank == 0, ids, 0), axis=0)
        new = tl.where(tl.load(temp_ptr + row) > 0, sampled, greedy).to(tl.int64)
        tl.store(tokens_ptr + row, new)
        tl.store(out_ptr + row, new)
        live = tl.load(active_ptr + row).to(tl.int64)
        if live != 0:
            tl.store(seen_ptr + row.to(tl.int64) * V + new, 1)
        tl.store(pos_ptr + row, tl.load(pos_ptr + row) + live)
        tl.store(steps_ptr + row, step + live)
