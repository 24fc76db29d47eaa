"""Per-request KV slots and the batched decode step the scheduler (gpt/scheduler.py) runs.

    slots = Slots(model, rows=8, context=1024)         # KV cache: 8 requests x 1025 positions, made once
    logits = model(chunk, cache=slots.prefill_view(row=3, start=0), last_only=True)   # a prompt chunk
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
from gpt.sampling import RowSettings, SamplingParams, counter_uniforms, sample_rows, top_k_of


def bytes_per_position(model: GPT) -> int:
    """Cache bytes one request needs per token of context (keys and values of every layer)."""
    cfg = model.config
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * model.transformer.wte.weight.element_size()


class PrefillView:
    """What the model's forward sees for a chunk of one row's prompt starting at position `start`."""

    def __init__(self, slots: Slots, row: int, start: int):
        self.slots, self.row, self.start = slots, row, start

    def positions(self, T: int, device) -> torch.Tensor:
        return torch.arange(self.start, self.start + T, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        r, start, end = self.row, self.start, self.start + k.shape[2]
        self.slots.k[layer, r:r + 1, :, start:end] = k
        self.slots.v[layer, r:r + 1, :, start:end] = v
        keys, values = self.slots.k[layer, r:r + 1, :, :end], self.slots.v[layer, r:r + 1, :, :end]
        if start == 0:
            return keys, values, None, True
        mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=start) if T > 1 else None
        return keys, values, mask, False

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

    def start_row(self, row: int, prompt_ids: list[int], params: SamplingParams, seed: int) -> None:
        """A request takes `row`: its settings, seed and penalty mask; inactive until `activate`."""
        device = self.tokens.device
        self.active[row] = False
        self.pos[row] = self.scratch
        self.steps[row] = 0
        s = self.settings
        s.temperature[row] = params.temperature
        s.top_k[row] = top_k_of(params, self.vocab_size)
        s.top_p[row] = params.top_p
        s.penalty[row] = params.repetition_penalty
        self.seen[row] = False
        steps = torch.arange(self.context + 1, device=device)
        self.uniforms[row] = counter_uniforms(torch.full_like(steps, seed), steps)
        if params.repetition_penalty != 1.0:
            self.seen[row, torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True

    def prefill_view(self, row: int, start: int) -> PrefillView:
        return PrefillView(self, row, start)

    def first_token(self, row: int, logits: torch.Tensor) -> torch.Tensor:
        """Pick a row's first id from its prompt's last logits (1, V) with the same sampler as `step`."""
        r = slice(row, row + 1)
        ids = self._sample(logits, r, int(self.settings.top_k[row]))
        self._note(r, ids, torch.ones(1, dtype=torch.bool, device=ids.device))
        return ids

    def activate(self, row: int, token: torch.Tensor, position: int) -> None:
        """The row decodes from now on: `token` (1,) is fed at `position`."""
        self.tokens[row:row + 1] = token
        self.pos[row] = position
        self.steps[row] = 1
        self.active[row] = True

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
        graph, out = self._graphs.get(key) or self._capture(key)
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
        return graph, out
