"""`NativeBackend`: chat with a native checkpoint through the home-grown engine in gpt/.

    from backends import create_backend, GenerationConfig
    backend = create_backend("native")                                # newest checkpoint under models/native/
    backend = create_backend("native", checkpoint="models/native/my-run", device="cpu", dtype="fp32")
    backend = create_backend("native", weights="int8")                # int8 / bf16 / fp32 weights (gpt/quantize.py)
    ids = backend.prompt_ids([{"role": "user", "content": "Hi"}])   # rendered and encoded once
    print(backend.generate(ids, GenerationConfig(temperature=0)))

The model loads on first use. One backend serves many chat sessions at once: every reply is a request
to the engine's scheduler (gpt/scheduler.py), whose one thread decodes all live replies as one batch,
each with its own KV row, settings and seed; closing a reply's stream frees its row at the next step.
`release()`/`reload()` swap the model under a lock while replies already under way finish on the model
they started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backends.base import BackendError, LazyModelBackend
from backends.reply import ReplyStream, emit_until_stop
from gpt.chat_format import ChatFormat
from gpt.checkpoint import CheckpointError, load_checkpoint, native_models_dir, resolve_checkpoint
from gpt.device import pick_device
from gpt.engine import Engine
from gpt.quantize import apply_weight_format, resolve_weight_format
from gpt.sampling import SamplingParams
from gpt.scheduler import default_capacity
from gpt.tokenizer import IncrementalDecoder, Tokenizer


def serving_capacity(device: str | None = None) -> int:
    """How many replies the native engine decodes at once on `device` (default: the one it would pick);
    the app lets that many stream at once, and queues the rest."""
    return default_capacity(pick_device(device))


@dataclass(frozen=True)
class _Loaded:
    engine: Engine
    tokenizer: Tokenizer
    chat_format: ChatFormat
    path: Path
    meta: dict

    @property
    def context_length(self) -> int:
        return self.engine.context_length


def _checkpoint_spec(checkpoint) -> str:
    """`latest`, also when written as a path (models/native/latest, as in the docs) that is not a directory."""
    path = Path(checkpoint)
    if path.name == "latest" and not path.exists() and path.parent.resolve() == native_models_dir().resolve():
        return "latest"
    return str(checkpoint)


class NativeBackend(LazyModelBackend):
    def __init__(self, checkpoint: str = "latest", device: str | None = None, dtype: str | None = None,
                 weights: str = "auto", name: str = "native"):
        self.name = name
        self.checkpoint = _checkpoint_spec(checkpoint)
        self.device = device
        self.dtype = dtype
        try:
            resolve_weight_format(weights, pick_device(device), dtype)  # a bad value fails now, not at load
        except ValueError as e:
            raise BackendError(f"{e} Fix it in configs/app.toml or the --weights / --dtype flags.") from None
        self.weights = weights
        super().__init__()
        self._resolve()  # fail now, with what to do, rather than at the first message

    def _resolve(self) -> Path:
        try:
            return resolve_checkpoint(self.checkpoint)
        except CheckpointError as e:
            raise BackendError(str(e)) from None

    def _load(self) -> _Loaded:
        path = self._resolve()
        device = pick_device(self.device)
        weights, dtype = resolve_weight_format(self.weights, device, self.dtype)
        try:
            model, tokenizer, meta = load_checkpoint(path, device=device, dtype=dtype)
        except CheckpointError as e:
            raise BackendError(str(e)) from None
        apply_weight_format(model, weights)  # checkpoints stay full precision; serving quantises at load
        engine = Engine(model)
        # One tiny greedy reply now, while the page says the model is loading: the first one pays for the
        # scheduler thread, the KV cache and the first calls of every op (~1.1 s of a 1.5 s first token on
        # the 2-core CPU), and that should not be the first user's wait.
        for _ in engine.generate(tokenizer.encode("Hello"), 2, SamplingParams(temperature=0.0), stop_ids=()):
            pass
        return _Loaded(engine, tokenizer, ChatFormat.for_tokenizer(tokenizer), path, meta)

    def reload(self) -> Path:
        """Resolve the checkpoint spec again (`latest` may be newer now) and load it; returns its path."""
        return super().reload().path

    @property
    def model_name(self) -> str:
        return str(self._model().path)

    def decode(self, ids: list[int]) -> str:
        return self._model().tokenizer.decode(ids)

    def stream(self, prompt, cfg=None) -> ReplyStream:
        request = self._prepare(prompt, cfg)
        loaded, cfg, ids, limit = request.loaded, request.cfg, request.ids, request.limit
        params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                repetition_penalty=cfg.repetition_penalty)

        def pieces(reply: ReplyStream):
            tokens = loaded.engine.generate(ids, limit, params, stop_ids=loaded.tokenizer.stop_ids, seed=cfg.seed)
            decoder = IncrementalDecoder(loaded.tokenizer)

            def decoded():
                for token in tokens:
                    reply.token_ids.append(token)
                    piece = decoder.push(token)
                    if piece:
                        yield piece
                tail = decoder.flush()
                if tail:
                    yield tail

            try:
                yield from emit_until_stop(reply, decoded(), request.stops)
            finally:
                tokens.close()  # a stop string or a closed stream ends the model's work right here
            if reply.finish_reason is None:
                reply.finish_reason = "length" if reply.n_tokens >= limit else "eot"

        return ReplyStream(pieces)
