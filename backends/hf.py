"""`HFBackend`: chat with any transformers causal LM (hub id, local directory, or GGUF file).

    from backends import create_backend, GenerationConfig
    backend = create_backend("smollm2")                             # the bundled SmolLM2 GGUF (configs/app.toml)
    backend = create_backend("hf", model="gpt2")                    # hub id (cached, or online)
    backend = create_backend("hf", model="path/to/dir")             # a save_pretrained directory
    backend = create_backend("hf", gguf_file="path/to/model.gguf")  # dequantised by transformers, then cached
    print(backend.generate(backend.format_chat([{"role": "user", "content": "Hi"}]), GenerationConfig()))

Prompts are rendered by gpt.chat_format.ChatFormat (the tokenizer's chat template when it has one, else the
same plain-text turns as the native engine). Replies stream from `model.generate` in a thread through a
`TextIteratorStreamer`. Every GenerationConfig field maps onto transformers' own logits processors; only the
final random draw is the native engine's (a uniform number hashed from (seed, step), gpt/sampling.py): the
seed is private to the call (`torch.manual_seed` is process-wide, and two sessions sampling at once would
otherwise share one random stream), and the same seed gives the same reply in both engines.
Generation halts at the token that completes a stop string, at end-of-text, or when the consumer closes
the stream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from backends.base import GenerationConfig, LazyModelBackend
from backends.hf_loading import ModelSource, load_model_and_tokenizer, resolve_source
from backends.reply import ReplyStream, as_generation_config, check_prompt_fits, emit_until_stop
from backends.stops import StopMatcher
from gpt.chat_format import ChatFormat
from gpt.device import pick_device, pick_dtype
from gpt.sampling import SamplingParams, counter_uniforms, pick_by_uniform, top_candidates, top_k_of
from gpt.tokenizer import IncrementalDecoder

# End-of-turn tokens of common chat models, besides the tokenizer's own eos.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")


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
                                 bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
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

    @property
    def context_length(self) -> int:
        return self._model().context_length



    def _encode(self, loaded: _Loaded, text: str) -> list[int]:
        split = not loaded.chat_format.uses_template
        return list(loaded.tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._model().text.decode(ids)

    def stream(self, prompt: str, cfg=None) -> ReplyStream:
        cfg = as_generation_config(cfg)
        loaded = self._model()
        ids = self._encode(loaded, prompt)
        check_prompt_fits(len(ids), loaded.context_length)
        limit = min(cfg.max_new_tokens, loaded.context_length - len(ids))
        device = loaded.model.device

        def pieces(reply: ReplyStream):
            halt = threading.Event()
            streamer = _ReplyStreamer(loaded, reply)
            failure: list[BaseException] = []

            def run():
                try:
                    loaded.model.generate(
                        input_ids=torch.tensor([ids], device=device),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                        generation_config=_hf_generation_config(loaded, cfg, limit),
                        logits_processor=_sampling_processors(cfg, device),
                        stopping_criteria=StoppingCriteriaList([_StopWatch(loaded, cfg.stop, halt)]),
                        streamer=streamer)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread below
                    failure.append(e)
                    streamer.end()

            thread = threading.Thread(target=run, name=f"{self.name}-generate", daemon=True)
            thread.start()
            try:
                yield from emit_until_stop(reply, streamer, cfg.stop)
            finally:
                halt.set()  # a stop string or a closed stream: the model stops after its current token
                thread.join()
            if failure:
                raise failure[0]
            if reply.finish_reason is None:
                reply.finish_reason = "eot" if streamer.saw_eot or reply.n_tokens < limit else "length"

        return ReplyStream(pieces)


def _stop_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for candidate in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, (list, tuple)):
            ids.update(int(i) for i in candidate)
    added = tokenizer.added_tokens_encoder
    ids.update(added[text] for text in END_TOKENS if text in added)
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


class _StopWatch(StoppingCriteria):
    """Ends generation at the token that completes a stop string, or once `halt` is set (the consumer closed
    the stream). transformers calls this right after appending each token, before streaming it."""

    def __init__(self, loaded: _Loaded, stops: tuple[str, ...], halt: threading.Event):
        self.stop_ids = loaded.stop_ids
        self.halt = halt
        self._text = IncrementalDecoder(loaded.text)
        self._stops = StopMatcher(stops)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        token = int(input_ids[0, -1])
        if self._stops.stops and token not in self.stop_ids:
            self._stops.push(self._text.push(token))
        done = self._stops.stopped or self.halt.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _ReplyStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that records the generated ids and leaves end-of-text ids out of the text."""

    def __init__(self, loaded: _Loaded, reply: ReplyStream):
        super().__init__(loaded.tokenizer, skip_prompt=True, skip_special_tokens=False,
                         clean_up_tokenization_spaces=False)
        self.reply = reply
        self.stop_ids = loaded.stop_ids
        self.saw_eot = False

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        kept = []
        for token in value.reshape(-1).tolist():
            if token in self.stop_ids:
                self.saw_eot = True
                break
            kept.append(token)
        if kept:
            self.reply.token_ids.extend(kept)
            super().put(torch.tensor(kept))
