"""Per-request KV slots and the batched decode step the scheduler (gpt/scheduler.py) runs.

    slots = Slots(model, rows=8, context=1024)         # KV cache: 8 requests x 1025 positions, made once
    logits = model(chunks, cache=slots.prefill_view(row=3, start=0, n=2), last_at=ends)  # rows 3-4's prompts
    ids = slots.step(b=4, span=256, candidates=50)      # one token for rows 0..3: forward + sampling

Each request owns one row of a preallocated cache; rows 0..n-1 are the requests that decode (the
scheduler keeps them packed), so one decode step is one call of the model's own forward on a (b, 1)
batch with a per-row position and an attention mask over cache positions [0, span). Going through the
model's forward keeps every weight format the model loads (plain or quantised linear layers) working.
On CUDA with bf16/fp16 plain weights the step runs the same computation in fused kernels instead
(gpt/fused_step.py: each row's attention reads its own positions only, so no span or mask; sampling in
gpt/fused_sampling.py), which takes about half the time of the module forward (docs/benchmarks.md).
On CPU the model's fp32 products get weights packed once for oneDNN (gpt/packed_linear.py): a step of 8
rows then costs ~1.8x one row's instead of ~2.4x.
Rows past the live ones (padding up to a batch-size bucket, or a request still in prefill) are inactive:
they write their keys at the scratch position (the last one, which no request uses) and stay put.

Everything a step needs lives in device buffers (`tokens`, `pos`, per-row sampling settings, uniform draws, the
repetition-penalty mask `seen`), and the step advances them itself, so one step is a fixed sequence of
kernels: on CUDA it is recorded once per (bucket, span, candidates) as a CUDA graph (the fused step: per
(bucket, candidates)) and replayed. Only the
thread that owns the model (the scheduler's) may call anything here.
"""

from __future__ import annotations

import torch

from gpt import fused_sampling, fused_step, packed_linear
from gpt.model import GPT
from gpt.sampling import RowSettings, SamplingParams, counter_uniforms, sample_rows


def batch_buckets(rows: int) -> list[int]:
    """Batch sizes steps and prefills are recorded for: powers of two, and the row count itself."""
    return [1 << i for i in range(rows.bit_length()) if 1 << i < rows] + [rows]


def bytes_per_position(model: GPT) -> int:
    """Cache bytes one request needs per token of context (keys and values of every layer)."""
    cfg = model.config
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * model.transformer.wte.weight.element_size()


class PrefillView:
    """What the model's forward sees for one chunk of the prompts of rows [row, row + n) of the caches `k`,
    `v` (n_layer, rows, n_kv_head, positions, head_dim), all at positions [start, start + T). A row whose
    prompt ends inside the chunk is padded to T: what the padding writes past the prompt's end is
    overwritten by the row's own decode steps before any of them reads it (a step writes its position,
    then attends up to it)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, row: int, start: int, n: int = 1, *,
                 invariant: bool = False, group: int = 1):
        """`invariant`: attention whose result for a row does not depend on the other rows (gpt/prefill.py
        says why): always an explicit mask, and each key/value head repeated for its `group` query heads, so
        that attention never takes the flash kernel, which splits the keys by how many rows and heads
        there are to fill the GPU."""
        self.k, self.v, self.rows, self.start = k, v, slice(row, row + n), start
        self.invariant, self.group = invariant, group
        self._mask: torch.Tensor | None = None  # the same for every layer: made once

    def _mask_of(self, T: int, end: int, device) -> torch.Tensor:
        """Additive: row i sees positions 0..start + i. Its rows start at multiples of 16 elements, which the
        memory-efficient attention kernel needs (SDPA would pad a copy in every layer otherwise)."""
        if self._mask is None:
            full = torch.full((T, -(-end // 16) * 16), float("-inf"), dtype=self.k.dtype, device=device)
            self._mask = full.triu_(self.start + 1)[:, :end]
        return self._mask

    def positions(self, T: int, device) -> torch.Tensor:
        return torch.arange(self.start, self.start + T, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        r, start, end = self.rows, self.start, self.start + k.shape[2]
        self.k[layer, r, :, start:end] = k
        self.v[layer, r, :, start:end] = v
        keys, values = self.k[layer, r, :, :end], self.v[layer, r, :, :end]
        if self.invariant:
            if self.group > 1:  # without a copy that syncs (repeat_interleave may): CUDA graphs record this
                B, nkv, S, hd = keys.shape
                keys = keys[:, :, None].expand(B, nkv, self.group, S, hd).reshape(B, nkv * self.group, S, hd)
                values = values[:, :, None].expand(B, nkv, self.group, S, hd).reshape(B, nkv * self.group, S, hd)
            return keys, values, self._mask_of(T, end, k.device), False
        if start == 0:
            return keys, values, None, True
        return keys, values, self._mask_of(T, end, k.device) if T > 1 else None, False

    def advance(self, T: int) -> None:
        pass


class DecodeView:
    """What the model's forward sees for one token of each of rows [0, b) at their own positions."""

    def __init__(self, slots: Slots, b: int, span: int):
        self.slots, self.span = slots, span
        self.pos = slots.pos[:b]
        self.rows = torch.arange(b, device=self.pos.device)
        # One mask for all layers: row i sees cache positions 0..pos[i]. Additive, in the cache's dtype:
        # attention would otherwise turn a boolean mask into this once per layer.
        hidden = torch.arange(span, device=self.pos.device)[None, :] > self.pos[:, None]
        self.mask = torch.zeros(b, 1, 1, span, dtype=slots.k.dtype, device=self.pos.device).masked_fill_(
            hidden.view(b, 1, 1, span), float("-inf"))

    def positions(self, T: int, device) -> torch.Tensor:
        return self.pos.clamp(max=self.slots.context - 1).view(-1, 1)  # inactive rows sit past the context

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        b = k.shape[0]
        self.slots.k[layer][self.rows, :, self.pos] = k[:, :, 0]
        self.slots.v[layer][self.rows, :, self.pos] = v[:, :, 0]
        return (self.slots.k[layer, :b, :, :self.span], self.slots.v[layer, :b, :, :self.span], self.mask, False)

    def advance(self, T: int) -> None:
        pass


class Slots:
    """The KV cache of `rows` requests, each `context` positions (+1 scratch), and the decode step's buffers."""

    def __init__(self, model: GPT, rows: int, context: int, *, graphs: bool = False, fused: bool | None = None):
        """`fused` (default: where it runs, CUDA with bf16/fp16 plain weights) runs the step through
        gpt/fused_step.py instead of the model's module forward."""
        cfg = model.config
        w = model.transformer.wte.weight
        self.model, self.rows, self.context = model, rows, context
        self.scratch = context  # the position inactive rows write to; no request reaches it
        self.graphs = graphs
        self.fused = fused_step.available(model) if fused is None else fused
        if w.device.type == "cpu":  # fp32 products with the weights packed once, not on every call
            packed_linear.pack_linears(model)
        shape = (cfg.n_layer, rows, cfg.n_kv_head, context + 1, cfg.head_dim)
        device = w.device
        self.k = torch.zeros(shape, device=device, dtype=w.dtype)
        self.v = torch.zeros(shape, device=device, dtype=w.dtype)
        V = cfg.vocab_size
        self.vocab_size = V
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.full((rows,), self.scratch, dtype=torch.long, device=device)
        self.active = torch.zeros(rows, dtype=torch.bool, device=device)
        self.steps = torch.zeros(rows, dtype=torch.long, device=device)
        self.settings = RowSettings.of([SamplingParams(temperature=0)] * rows, V, device)
        self.seen = torch.zeros(rows, V, dtype=torch.bool, device=device)
        # Each row's uniform numbers for every step it can take, hashed once when it starts (a step then
        # reads its draw with one gather instead of hashing on the device every step).
        self.uniforms = torch.zeros(rows, context + 1, dtype=torch.float32, device=device)
        self.out = torch.zeros(rows, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    # --- rows: set up by the scheduler between steps -------------------------------------------------

    def start_rows(self, row: int, prompts: list[list[int]], params: list[SamplingParams], seeds: list[int]) -> None:
        """Requests take rows [row, row + n): their settings, seeds and penalty masks, in a few whole-group
        writes (one request at a time cost ~0.5 ms of host launches each, sixteen of them a time to first
        token of their own); inactive until `activate`."""
        n = len(prompts)
        r = slice(row, row + n)
        device = self.tokens.device
        self.active[r] = False
        self.pos[r] = self.scratch
        self.steps[r] = 0
        settings = RowSettings.of(params, self.vocab_size, device)
        for name in ("temperature", "top_k", "top_p", "penalty"):
            getattr(self.settings, name)[r] = getattr(settings, name)
        self.seen[r] = False
        steps = torch.arange(self.context + 1, device=device)
        self.uniforms[r] = counter_uniforms(torch.tensor(seeds, device=device)[:, None], steps[None, :])
        penalised = [(i, ids) for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
                     if p.repetition_penalty != 1.0]
        if penalised:
            which = torch.tensor([row + i for i, ids in penalised for _ in ids], device=device)
            ids = torch.tensor([t for _, ids in penalised for t in ids], device=device)
            self.seen[which, ids] = True

    def prefill_view(self, row: int, start: int, n: int = 1, invariant: bool = False) -> PrefillView:
        """The cache as a prompt chunk of rows [row, row + n) sees it (see PrefillView)."""
        cfg = self.model.config
        return PrefillView(self.k, self.v, row, start, n, invariant=invariant, group=cfg.n_head // cfg.n_kv_head)

    def first_token(self, row: int, logits: torch.Tensor) -> torch.Tensor:
        """Pick the first ids of rows [row, row + n) from their prompts' last logits (n, V), with the same
        sampler as `step`."""
        r = slice(row, row + logits.shape[0])
        ids = self._sample(logits, r, int(self.settings.top_k[r].max()))
        self._note(r, ids, torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device))
        return ids

    def activate(self, row: int, tokens: torch.Tensor, positions: int | list[int]) -> None:
        """Rows [row, row + n) decode from now on: `tokens` (n,) are fed at `positions` (one per row)."""
        r = slice(row, row + tokens.shape[0])
        self.tokens[r] = tokens
        self.pos[r] = torch.as_tensor(positions, dtype=torch.long).to(self.pos.device, non_blocking=True)
        self.steps[r] = 1
        self.active[r] = True

    def deactivate(self, row: int) -> None:
        self.active[row] = False
        self.pos[row] = self.scratch

    def move(self, src: int, dst: int, length: int) -> None:
        """Row `src`'s request moves to row `dst` (keys, values of its first `length` positions, state)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        for buf in (self.tokens, self.pos, self.active, self.steps, self.seen, self.uniforms,
                    self.settings.temperature, self.settings.top_k, self.settings.top_p, self.settings.penalty):
            buf[dst] = buf[src]
        self.deactivate(src)

    # --- the step ----------------------------------------------------------------------------------------

    def step(self, b: int, span: int, candidates: int) -> torch.Tensor:
        """One token for each of rows [0, b): returns the (b,) buffer of new ids (read it before the next step)."""
        if not self.graphs:
            return self._step(b, span, candidates)
        key = (b, 0 if self.fused else span, candidates)  # the fused step reads each row's own length
        if key not in self._graphs:
            # Every batch size at once: which sizes a run passes through depends on how requests arrive
            # (a group of prefills joins at once), and a recording mid-run stalls every reply.
            for size in batch_buckets(self.rows):
                if (size, *key[1:]) not in self._graphs:
                    self._capture((size, *key[1:]))
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _step(self, b: int, span: int, candidates: int) -> torch.Tensor:
        if self.fused:
            logits = fused_step.forward(self.model, self, b)
            if fused_sampling.fits(candidates):  # sampling and the rows' advance in three launches
                return fused_sampling.sample_step(logits, self, b, candidates)
        else:
            logits = self.model(self.tokens[:b].view(b, 1), cache=DecodeView(self, b, span))[:, -1, :]
        r = slice(0, b)
        ids = self._sample(logits, r, candidates)
        self.tokens[:b] = ids
        act = self.active[:b]
        self._note(r, ids, act)
        self.pos[:b] += act
        self.steps[:b] += act
        self.out[:b] = ids
        return self.out[:b]

    def _sample(self, logits: torch.Tensor, r: slice, candidates: int) -> torch.Tensor:
        s = self.settings
        rows = type(s)(s.temperature[r], s.top_k[r], s.top_p[r], s.penalty[r])
        uniforms = self.uniforms[r].gather(1, self.steps[r, None].clamp(max=self.context)).squeeze(1)
        return sample_rows(logits, rows, uniforms, self.seen[r], candidates)

    def _note(self, r: slice, ids: torch.Tensor, live: torch.Tensor) -> None:
        """Add the new ids to the live rows' penalty masks (other rows' masks keep what they had)."""
        keep = self.seen[r].gather(1, ids[:, None]) | live[:, None]
        self.seen[r].scatter_(1, ids[:, None], keep)

    def _capture(self, key: tuple[int, int, int]):
        """Record one step as a CUDA graph (on the scheduler's thread, the only one touching the GPU here).
        Warm-up runs on a side stream; what they advance is put back, and the keys and values they write
        at the current positions are what the real step writes again."""
        b = key[0]
        saved = [t.clone() for t in (self.tokens, self.pos, self.steps, self.seen[:b], self.out)]

        def restore():
            for t, s in zip((self.tokens, self.pos, self.steps, self.seen[:b], self.out), saved, strict=True):
                t.copy_(s)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(*key)
                restore()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(*key)
        restore()  # recording does not run the kernels, but be explicit: state is as before the step
        self._graphs[key] = (graph, out)
