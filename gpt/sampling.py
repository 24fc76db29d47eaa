"""The one sampler: repetition penalty, temperature (0 = greedy), top-k, top-p, one uniform draw per row.

    ids = sample_next(logits, SamplingParams(temperature=0.7, top_k=50), seen=prompt_ids, generator=g)
    u = counter_uniforms(seeds, steps)          # each row's draw: a hash of its (seed, step)
    ids = sample_rows(logits, rows, uniforms)   # a batch where every row has its own settings (gpt/scheduler.py)

The order and the arithmetic follow transformers' logits processors (penalty, temperature, top-k, top-p),
so that greedy decoding with a repetition penalty picks the same tokens in both engines. A row's pick
depends only on its own logits, settings and uniform number: the same request picks the same ids alone or
in a batch. The scheduler draws each row's uniform from a counter-based hash of (seed, step)
(`counter_uniforms`), which needs no generator object, runs for the whole batch in a few kernels and can
be recorded in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 means greedy
    top_k: int | None = 50  # None or 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off


@dataclass
class RowSettings:
    """Per-row sampling settings as device tensors of shape (B,) (top_k: the vocabulary size when off)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor

    @classmethod
    def of(cls, params: list[SamplingParams], vocab_size: int, device) -> RowSettings:
        return cls(torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
                   torch.tensor([top_k_of(p, vocab_size) for p in params], dtype=torch.long, device=device),
                   torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
                   torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device))


def top_k_of(params: SamplingParams, vocab_size: int) -> int:
    """How many candidates a row keeps: 1 for greedy (only the argmax matters), the vocabulary when off."""
    if params.temperature == 0:
        return 1
    return min(params.top_k, vocab_size) if params.top_k else vocab_size


def sample_rows(logits: torch.Tensor, rows: RowSettings, uniforms: torch.Tensor, seen: torch.Tensor | None = None,
                candidates: int | None = None) -> torch.Tensor:
    """Pick one id per row of `logits` (B, V); returns ids (B,).

    `seen` (B, V) bool marks the ids the repetition penalty applies to (prompt and reply so far);
    `uniforms` (B,) in [0, 1) is each row's random draw; `candidates` (at least every sampled row's top-k,
    the vocabulary when a row has top-k off) is how many of the best ids are sorted.
    """
    logits = logits.float()
    V = logits.size(-1)
    if seen is not None:
        logits = penalised(logits, seen, rows.penalty)
    greedy = logits.argmax(dim=-1)
    temperature = torch.where(rows.temperature > 0, rows.temperature, torch.ones_like(rows.temperature))
    scaled = logits / temperature[:, None]
    vals, idx = top_candidates(scaled, candidates or V)
    rank = torch.arange(vals.size(-1), device=vals.device)
    vals = vals.masked_fill(rank[None, :] >= rows.top_k[:, None], float("-inf"))
    # top-p: drop the tokens whose probability, added up from the least likely, stays <= 1 - p; the most
    # likely token always stays.
    tail_mass = vals.softmax(dim=-1).flip(-1).cumsum(dim=-1).flip(-1)
    remove = tail_mass <= (1 - rows.top_p)[:, None]
    remove[:, 0] = False
    sampled = idx.gather(1, pick_by_uniform(vals.masked_fill(remove, float("-inf")), uniforms)[:, None])
    return torch.where(rows.temperature > 0, sampled.squeeze(1), greedy)


def penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """`logits` (B, V) with each row's repetition penalty (B,) applied where `seen` (B, V) is set: negative
    scores multiplied, positive ones divided (transformers' arithmetic). On CUDA as whole-vocabulary
    kernels (a fixed sequence, recordable in a CUDA graph); on CPU only at the seen ids, since each
    whole-vocabulary pass over a batch's logits costs more than the few hundred ids a reply has seen."""
    if logits.device.type != "cpu":
        pen = penalty[:, None]
        return torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)
    rows, cols = seen.nonzero(as_tuple=True)
    x, pen = logits[rows, cols], penalty[rows]
    return logits.index_put((rows, cols), torch.where(x < 0, x * pen, x / pen))


def top_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best scores of each row (B, V) and their ids, best first; equal scores in id order.

    bf16 logits tie often, and torch.topk on CUDA returns tied entries in no fixed order, which would
    make a seeded draw pick a different id from run to run. So the sort key is (score, -id) packed into one
    int64: the float's bits mapped to an order-preserving integer, then the id. On CPU that key costs five
    passes over a batch's whole vocabulary (a third of the sampler's time at 8 rows), so there a plain
    top-(k+1) picks the candidates and only they are ranked by the key; a row whose k-th and (k+1)-th
    scores tie (where the plain pick may hold the wrong tied ids) sends the batch the exact way.
    """
    V = scores.size(-1)
    k = min(k, V)
    if scores.device.type == "cpu" and k < V:
        vals, idx = torch.topk(scores.float(), k + 1, dim=-1)
        if bool((vals[:, k - 1] > vals[:, k]).all()):
            order = _sort_key(vals[:, :k], idx[:, :k], V).argsort(dim=-1, descending=True)
            return vals.gather(-1, order), idx.gather(-1, order)
    ids = torch.arange(V, device=scores.device).expand_as(scores)
    _, idx = torch.topk(_sort_key(scores, ids, V), k, dim=-1)
    return scores.gather(-1, idx), idx


def _sort_key(scores: torch.Tensor, ids: torch.Tensor, V: int) -> torch.Tensor:
    """int64 keys ordered as (score, -id): higher score first, then lower id."""
    bits = scores.float().contiguous().view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # integer order == float order
    return ordered * (1 << 32) + (V - 1 - ids)


def pick_by_uniform(sorted_logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The draw: the position in each row of `sorted_logits` (B, K; best first, -inf for dropped ids) where
    the cumulative probability first reaches the row's uniform number (B,)."""
    cdf = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    return (cdf < uniforms[:, None] * cdf[:, -1:]).sum(dim=-1).clamp(max=sorted_logits.size(-1) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values below 2**32."""
    mask = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) for each (seed, step) pair (int64 tensors): the same pair, the same number."""
    mask = 0xFFFFFFFF
    h = _mix32(seeds & mask)
    h = _mix32(h ^ ((seeds >> 32) & mask))
    h = _mix32(h ^ (steps & mask))
    return (h >> 8).float() * (1.0 / (1 << 24))


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of `logits` (B, V) with one setting for all rows; ids (B,).

    `seen` (B, N) holds the ids the repetition penalty applies to (prompt and reply so far).
    """
    B, V = logits.shape
    rows = RowSettings.of([params] * B, V, logits.device)
    mask = None
    if seen is not None and params.repetition_penalty != 1.0 and seen.numel():
        mask = torch.zeros(B, V, dtype=torch.bool, device=logits.device).scatter_(1, seen, True)
    uniforms = torch.rand(B, generator=generator, device=logits.device)
    return sample_rows(logits, rows, uniforms, mask, candidates=top_k_of(params, V))
