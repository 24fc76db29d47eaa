"""Incremental decoding over token ids: prefill the prompt once, then one position per new token.

    engine = Engine(model)
    for token_id in engine.generate(prompt_ids, max_new_tokens=64, params=SamplingParams(temperature=0),
                                    stop_ids={50256}, seed=1):
        ...

The engine speaks token ids only; text, stop strings and chat formats belong to the callers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from gpt.model import GPT
from gpt.sampling import SamplingParams, sample_next


class Engine:
    def __init__(self, model: GPT):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def context_length(self) -> int:
        return self.model.config.block_size

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 stop_ids: Iterable[int] = (), seed: int | None = None) -> Iterator[int]:
        """Yield up to `max_new_tokens` new ids; a stop id ends generation and is not yielded."""
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context_length}")
        max_new_tokens = min(max_new_tokens, room)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        stop_ids = set(stop_ids)
        cache = self.model.new_cache(1, len(prompt_ids) + max_new_tokens)
        seen = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        logits = self.model(seen, cache=cache, last_only=True)[:, -1, :]
        penalise = params.repetition_penalty != 1.0
        for step in range(max_new_tokens):
            next_id = sample_next(logits, params, seen if penalise else None, generator)
            token = int(next_id.item())
            if token in stop_ids:
                return
            yield token
            if step == max_new_tokens - 1:
                return
            if penalise:
                seen = torch.cat([seen, next_id.view(1, 1)], dim=1)
            logits = self.model(next_id.view(1, 1), cache=cache)[:, -1, :]
