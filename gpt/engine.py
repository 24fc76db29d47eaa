"""Incremental decoding over token ids: prefill the prompt once, then one position per new token.

    engine = Engine(model)
    for token_id in engine.generate(prompt_ids, max_new_tokens=64, params=SamplingParams(temperature=0),
                                    stop_ids={50256}, seed=1):
        ...

The engine speaks token ids only; text, stop strings and chat formats belong to the callers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import torch

from gpt.model import GPT
from gpt.sampling import SamplingParams, sample_next


class Engine:
    def __init__(self, model: GPT, *, fast: bool | None = None, compile: bool = False):
        """`fast` (default: on CUDA) decodes through a static cache replayed as CUDA graphs
        (gpt/fast_decode.py); `compile` also compiles that step with torch.compile (slow first call)."""
        self.model = model.eval()
        self.fast = self.device.type == "cuda" if fast is None else fast
        self.compile = compile
        self._decoder = None  # the StaticDecoder, made on first use
        self._decoder_lock = threading.Lock()  # it has one cache: one generation at a time uses it

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
        # A second concurrent generation (another session) takes the plain path rather than wait.
        if self.fast and self._decoder_lock.acquire(blocking=False):
            try:
                yield from self._decode(prompt_ids, max_new_tokens, params, stop_ids, seed, self._static_decoder())
            finally:
                self._decoder_lock.release()
        else:
            yield from self._decode(prompt_ids, max_new_tokens, params, stop_ids, seed, None)

    def _static_decoder(self):
        if self._decoder is None:
            from gpt.fast_decode import StaticDecoder

            self._decoder = StaticDecoder(self.model, compile=self.compile)
        return self._decoder

    def _decode(self, prompt_ids, max_new_tokens, params, stop_ids, seed, decoder) -> Iterator[int]:
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        stop_ids = set(stop_ids)
        if decoder is None:
            cache = self.model.new_cache(1, len(prompt_ids) + max_new_tokens)
            prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            logits = self.model(prompt, cache=cache, last_only=True)[:, -1, :]

            def advance(next_id):
                return self.model(next_id.view(1, 1), cache=cache)[:, -1, :]
        else:
            logits = decoder.prefill(prompt_ids)
            advance = decoder.step
        # The repetition penalty sees prompt + reply so far: a preallocated row, filled as tokens come.
        penalise = params.repetition_penalty != 1.0
        if decoder is not None and params.temperature == 0 and not penalise:
            # Plain greedy: the static decoder picks ids on the device and runs a step ahead.
            first = sample_next(logits, params)
            for token in decoder.greedy(first, max_new_tokens):
                if token in stop_ids:
                    return
                yield token
            return
        seen = n_seen = None
        if penalise:
            seen = torch.empty(1, len(prompt_ids) + max_new_tokens, dtype=torch.long, device=self.device)
            seen[0, :len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
            n_seen = len(prompt_ids)
        for step in range(max_new_tokens):
            next_id = sample_next(logits, params, seen[:, :n_seen] if penalise else None, generator)
            token = int(next_id.item())
            if token in stop_ids:
                return
            yield token
            if step == max_new_tokens - 1:
                return
            if penalise:
                seen[0, n_seen] = next_id[0]
                n_seen += 1
            logits = advance(next_id)
