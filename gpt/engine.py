"""Token-id generation through the model's scheduler: every caller's request joins one batched decode loop.

    engine = Engine(model)
    for token_id in engine.generate(prompt_ids, max_new_tokens=64, params=SamplingParams(temperature=0),
                                    stop_ids={50256}, seed=1):
        ...

The engine speaks token ids only; text, stop strings and chat formats belong to the callers. It owns one
`gpt.scheduler.Scheduler`, whose thread is the only one that runs the model: any number of threads may
call `generate` at once (their requests are batched), and closing or dropping the returned iterator ends
the request at the scheduler's next step.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from gpt.model import GPT
from gpt.sampling import SamplingParams
from gpt.scheduler import Reply, Scheduler


class Engine:
    def __init__(self, model: GPT, *, graphs: bool | None = None, capacity: int | None = None,
                 kv_budget_bytes: int | None = None, deterministic: bool = True):
        """`graphs` (default: on CUDA) replays batched decode steps as CUDA graphs; `capacity` is how many
        requests decode at once, `kv_budget_bytes` the KV cache's size, `deterministic=False` (CUDA) allows
        faster attention kernels whose results vary slightly from run to run (see Scheduler)."""
        self.model = model.eval()
        self.scheduler = Scheduler(model, capacity=capacity, kv_budget_bytes=kv_budget_bytes, graphs=graphs,
                                   deterministic=deterministic)
        # When the engine goes (a model reload), its thread finishes the replies under way, then ends.
        weakref.finalize(self, self.scheduler.close)

    @property
    def device(self):
        return self.model.transformer.wte.weight.device

    @property
    def context_length(self) -> int:
        """The longest prompt + reply a request can have: the model's context, or less if the KV budget is."""
        return self.scheduler.context_length

    @property
    def capacity(self) -> int:
        return self.scheduler.capacity

    def generate(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 stop_ids: Iterable[int] = (), seed: int | None = None) -> Reply:
        """Up to `max_new_tokens` new ids (fewer if the context fills); a stop id ends it and is not yielded."""
        return self.scheduler.submit(prompt_ids, max_new_tokens, params, stop_ids, seed)
