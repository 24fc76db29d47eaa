"""`HFBackend`: chat with any transformers causal LM (hub id, local directory, or GGUF file).

    from backends import create_backend, GenerationConfig
    backend = create_backend("smollm2")                             # the bundled SmolLM2 GGUF (configs/app.toml)
    backend = create_backend("hf", model="gpt2")                    # hub id (cached, or online)
    backend = create_backend("hf", model="path/to/dir")             # a save_pretrained directory
    backend = create_backend("hf", gguf_file="path/to/model.gguf")  # dequantised by transformers, then cached
    print(backend.generate(backend.prompt_ids([{"role": "user", "content": "Hi"}]), GenerationConfig()))

Prompts are rendered and encoded by gpt.chat_format.ChatFormat bound to the transformers tokenizer (its chat
template when it has one, else the same plain-text turns as the native engine). Replies stream from
`model.generate` in a thread: the reply's one stop matcher runs on that thread right after each token
(`_ReplyPump`), so generation halts at the token that completes a stop string and only safe text is queued.
Every GenerationConfig field maps onto transformers' own logits processors; only the final random draw is the native engine's (a uniform number hashed from (seed, step), gpt/sampling.py): the
seed is private to the call (`torch.manual_seed` is process-wide, and two sessions sampling at once would
otherwise share one random stream), and the same seed gives the same reply in both engines.
Generation halts at the token that completes a stop string, at end-of-text, or when the consumer closes
the stream.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from functools import partial

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from backends.base import GenerationConfig, LazyModelBackend
from backends.hf_loading import ModelSource, load_model_and_tokenizer, resolve_source
from backends.reply import ReplyStream, StopMatcher
from gpt.chat_format import ChatFormat
from gpt.device import pick_device, pick_dtype
from gpt.sampling import SamplingParams, counter_uniforms, pick_by_uniform, top_candidates, top_k_of
from gpt.tokenizer import END_OF_TURN_TOKENS, IncrementalDecoder


class _TextDecoder:
    """Token ids to raw text: special tokens kept as text, no clean-up (what the native engine does)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class _Loaded:
    model: object
    tokenizer: object
    text: _TextDecoder
    chat_format: ChatFormat
    stop_ids: frozenset[int]
    context_length: int


class HFBackend(LazyModelBackend):
    def __init__(self, model: str | None = None, gguf_file: str | None = None, device: str | None = None,
                 dtype: str | None = None, name: str = "hf"):
        self.name = name
        self.source: ModelSource = resolve_source(model, gguf_file)  # local paths checked now
        self.device = device
        self.dtype = dtype
        super().__init__()

    def _load(self) -> _Loaded:
        device = pick_device(self.device)
        model, tokenizer = load_model_and_tokenizer(self.source, device, pick_dtype(self.dtype, device))
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        specials = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
        chat_format = ChatFormat(chat_template=template, special_tokens=tuple(sorted(specials)),
                                 bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                                 encode_text=partial(_encode, tokenizer, True),
                                 encode_special=partial(_encode, tokenizer, False), eot_id=tokenizer.eos_token_id)
        # Plain-format prompts are all text: a typed <|endoftext|> must not become the special token.
        tokenizer.split_special_tokens = not chat_format.uses_template
        config = model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) \
            or tokenizer.model_max_length
        return _Loaded(model, tokenizer, _TextDecoder(tokenizer), chat_format, _stop_ids(model, tokenizer),
                       int(context))


    @property
    def model_name(self) -> str:
        return self.source.description

    def decode(self, ids: list[int]) -> str:
        return self._model().text.decode(ids)

    def stream(self, prompt, cfg=None) -> ReplyStream:
        request = self._prepare(prompt, cfg)
        loaded, cfg, ids, limit = request.loaded, request.cfg, request.ids, request.limit
        device = loaded.model.device

        def pieces(reply: ReplyStream):
            halt = threading.Event()
            pump = _ReplyPump(loaded, reply, request.stops, limit, halt)
            failure: list[BaseException] = []

            def run():
                try:
                    loaded.model.generate(
                        input_ids=torch.tensor([ids], device=device),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                        generation_config=_hf_generation_config(loaded, cfg, limit),
                        logits_processor=_sampling_processors(cfg, device),
                        stopping_criteria=StoppingCriteriaList([pump]))
                except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread below
                    failure.append(e)
                finally:
                    pump.finish()

            thread = threading.Thread(target=run, name=f"{self.name}-generate", daemon=True)
            thread.start()
            try:
                while (piece := pump.pieces.get()) is not _ReplyPump.END:
                    yield piece
            finally:
                halt.set()  # a closed stream: the model stops after its current token
                thread.join()
            if failure:
                raise failure[0]
            if pump.matcher.stopped:
                reply.finish_reason = "stop"
            elif reply.finish_reason is None:
                reply.finish_reason = "eot" if pump.saw_eot or reply.n_tokens < limit else "length"

        return ReplyStream(pieces)


def _encode(tokenizer, split_special: bool, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"])


def _stop_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for candidate in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, (list, tuple)):
            ids.update(int(i) for i in candidate)
    added = tokenizer.added_tokens_encoder
    ids.update(added[text] for text in END_OF_TURN_TOKENS if text in added)
    return frozenset(ids)


def _hf_generation_config(loaded: _Loaded, cfg: GenerationConfig, limit: int) -> HFGenerationConfig:
    # do_sample stays False: sampling happens in _SeededSampler, which leaves one token for argmax to pick.
    stop_ids = sorted(loaded.stop_ids)
    return HFGenerationConfig(max_new_tokens=limit, do_sample=False, num_beams=1,
                              repetition_penalty=cfg.repetition_penalty, eos_token_id=stop_ids,
                              pad_token_id=stop_ids[0] if stop_ids else None,
                              temperature=None, top_k=None, top_p=None)


def _sampling_processors(cfg: GenerationConfig, device) -> LogitsProcessorList:
    """transformers' own warpers in the order it applies them (after the repetition penalty), then the draw."""
    if cfg.temperature == 0:
        return LogitsProcessorList()
    processors = []
    if cfg.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        processors.append(TopKLogitsWarper(top_k=cfg.top_k))
    if cfg.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=cfg.top_p))
    seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    processors.append(_SeededSampler(seed, top_k_of(SamplingParams(cfg.temperature, cfg.top_k), 1 << 62)))
    return LogitsProcessorList(processors)


class _SeededSampler(LogitsProcessor):
    """Draw the next token from the warped scores with the native engine's draw (gpt/sampling.py: the
    uniform number of (seed, step), inverse CDF over the best `candidates` ids), so that a seed gives the
    same reply in both engines; leave only the drawn token standing."""

    def __init__(self, seed: int, candidates: int):
        self.seed = seed % 2**63
        self.candidates = candidates
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, V = scores.shape
        vals, idx = top_candidates(scores.float(), self.candidates)
        seeds = torch.full((B,), self.seed, dtype=torch.long, device=scores.device)
        steps = torch.full((B,), self.step, dtype=torch.long, device=scores.device)
        self.step += 1
        choice = idx.gather(1, pick_by_uniform(vals, counter_uniforms(seeds, steps))[:, None])
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)


class _ReplyPump(StoppingCriteria):
    """A reply's one stop matcher, on the generating thread: transformers calls it right after appending each
    token, so it records the id, decodes it, queues the text that is safe to show (`pieces`), and ends
    generation at the token that completes a stop string, at end-of-text, or once `halt` is set (the consumer
    closed the stream). Tokens past the end (a deferred stop check runs one extra step) are ignored."""

    END = object()

    def __init__(self, loaded: _Loaded, reply: ReplyStream, stops: tuple[str, ...], limit: int,
                 halt: threading.Event):
        self.stop_ids, self.reply, self.limit, self.halt = loaded.stop_ids, reply, limit, halt
        self.text = IncrementalDecoder(loaded.text)
        self.matcher = StopMatcher(stops)
        self.pieces: queue.SimpleQueue = queue.SimpleQueue()
        self.saw_eot = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if not (self.saw_eot or self.matcher.stopped or self.reply.n_tokens >= self.limit):
            token = int(input_ids[0, -1])
            if token in self.stop_ids:
                self.saw_eot = True
            else:
                self.reply.token_ids.append(token)
                self._put(self.matcher.push(self.text.push(token)))
        done = self.saw_eot or self.matcher.stopped or self.halt.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def finish(self) -> None:
        """Generation ended: release what the decoder and the matcher still hold, then the end mark."""
        if not self.matcher.stopped:
            self._put(self.matcher.push(self.text.flush()))
            self._put(self.matcher.flush())
        self.pieces.put(self.END)

    def _put(self, text: str) -> None:
        if text:
            self.pieces.put(text)
