"""The backend contract: `ChatBackend`, `GenerationConfig`, `BackendError`.

Every backend (the native engine, transformers, a remote OpenAI-style server) behaves the same way:
- `prompt_ids(messages)` is the prompt for a conversation as token ids, rendered and encoded once by the
  model's chat format; `stream(ids, cfg)` continues those ids (rendered prompt text is encoded once, the same
  way), yielding raw text pieces; `"".join(pieces) == generate(prompt, cfg)`;
- the backend owns stopping: a reply stops at the first stop string of `cfg.stop` or of the chat format's
  own turn markers (none of which ever appears in it), at `max_new_tokens`, or at end-of-text; the same
  `seed` gives the same reply; `temperature == 0` is greedy;
- errors a user can cause raise `BackendError` (or `ValueError` for bad settings) saying what to do;
- `load()` loads the model now, `reload()` picks up a model that changed on disk (each a no-op where
  nothing can change), `release()` frees it.

    ids = backend.prompt_ids([{"role": "user", "content": "Hi"}])
    reply = backend.stream(ids, GenerationConfig.parse({"temperature": 0}))
"""

from __future__ import annotations

import gc
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

from backends.reply import check_prompt_fits, reply_stops


class BackendError(RuntimeError):
    """A failure the user can fix (unknown backend, missing checkpoint, offline hub, bad config)."""


# Bounds that keep sampling finite: logits / 1e-40 overflow to inf and softmax turns them into NaN, and a
# penalty of 1e40 does the same to every negative logit. Between 0.01 and 100 fp32 logits stay finite.
MIN_SCALE, MAX_SCALE = 0.01, 100.0
MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed
MAX_NEW_TOKENS = 1_000_000  # far beyond any context; keeps the number a plain machine integer


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int | None = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(_is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS, "max_new_tokens",
               self.max_new_tokens, f"a whole number from 1 to {MAX_NEW_TOKENS}")
        _check(_is_number(self.temperature) and (self.temperature == 0 or MIN_SCALE <= self.temperature <= MAX_SCALE),
               "temperature", self.temperature, f"0 (greedy) or a number from {MIN_SCALE} to {MAX_SCALE}")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0), "top_k", self.top_k,
               "None or a whole number >= 0 (0 means off)")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(_is_number(self.repetition_penalty) and MIN_SCALE <= self.repetition_penalty <= MAX_SCALE,
               "repetition_penalty", self.repetition_penalty, f"a number from {MIN_SCALE} to {MAX_SCALE} (1 is off)")
        _check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop), "stop",
               self.stop, "a list of non-empty strings")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED), "seed", self.seed,
               f"None (random) or a whole number from 0 to {MAX_SEED} (2**63-1)")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def parse(cls, values=None, defaults: GenerationConfig | None = None) -> GenerationConfig:
        """The one parser from loose values to a config: a GenerationConfig, None, or a dict of its fields
        (a TOML table, a JSON body, a model's settings), laid over `defaults` (else the class defaults).

        Loose spellings are read once here: `top_k = 0` means off (TOML and sliders have no null); a stop
        list or string becomes a tuple. An unknown field or a bad value raises ValueError naming it.
        """
        if isinstance(values, GenerationConfig):
            return values
        if values is not None and not isinstance(values, dict):
            raise TypeError(f"generation settings must be a GenerationConfig or a dict of its fields, got "
                            f"{type(values).__name__}")
        unknown = sorted(set(values or {}) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"Unknown generation setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(cls.field_names())}")
        settings = {f.name: getattr(defaults, f.name) for f in fields(cls)} if defaults is not None else {}
        for name, value in (values or {}).items():
            settings[name] = None if name == "top_k" and _is_int(value) and value == 0 else value
        return cls(**settings)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {shown(value)}")


def shown(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: a refusal quotes what was sent, never megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({type(value).__name__})"


class ChatBackend(ABC):
    """A model that turns a prompt into a streamed reply. Subclasses load lazily where they can."""

    name: str
    # True for a backend whose server applies its own chat template (backends/openai.py): the chat loop sends
    # it the messages its budget kept (`stream_messages`) instead of prompt ids.
    takes_messages: bool = False

    @property
    @abstractmethod
    def context_length(self) -> int:
        """How many tokens the model sees at once (prompt + reply)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of rendered prompt text, exactly as `stream` tokenizes text."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def format_chat(self, messages: list[dict]) -> str:
        """The prompt for `messages` ([{"role", "content": str}]) as text, ending with the assistant's cue."""

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt for `messages` as the ids `stream` takes (what the chat loop's budget counts)."""
        return self.encode(self.format_chat(messages))

    @abstractmethod
    def stream(self, prompt: str | Sequence[int], cfg: GenerationConfig) -> Iterator[str]:
        """Yield the reply to `prompt` (prompt ids, or rendered text encoded once) in raw text pieces."""

    def generate(self, prompt: str | Sequence[int], cfg: GenerationConfig) -> str:
        return "".join(self.stream(prompt, cfg))

    def load(self) -> None:  # noqa: B027 (optional hook: a backend with nothing to load keeps it)
        """Load the model now, off the request path (backends load lazily on first use otherwise)."""

    def reload(self) -> object:
        """Pick up a model that may have changed where it lives (a newer checkpoint); a no-op by default."""
        return None

    def release(self) -> None:  # noqa: B027 (optional hook: a backend with nothing to free keeps it)
        """Free the model's memory; the backend may load again on next use."""


class LazyModelBackend(ChatBackend):
    """A backend whose model loads on first use and can be released; shared safely between threads.

    Subclasses implement `_load()`, returning an object with a `context_length` and a `chat_format` bound to
    the model's tokenizer (gpt/chat_format.py), which renders and encodes every prompt. A reply under way
    keeps its own reference to what was loaded, so `release()` and `reload()` never pull a model from under it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._loaded = None

    @abstractmethod
    def _load(self): ...

    def _model(self):
        loaded = self._loaded
        if loaded is None:
            with self._lock:
                if self._loaded is None:
                    self._loaded = self._load()
                loaded = self._loaded
        return loaded

    def release(self) -> None:
        with self._lock:
            released, self._loaded = self._loaded, None
        if released is not None:
            del released
            gc.collect()
            import torch  # only here: the contract itself does not need torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def load(self) -> None:
        self._model()

    def reload(self):
        """Load the model again (its source may have changed) and swap it in; replies under way finish on
        the one they started with."""
        loaded = self._load()
        with self._lock:
            self._loaded = loaded
        return loaded

    def format_chat(self, messages: list[dict]) -> str:
        return self._model().chat_format.render(messages)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self._model().chat_format.prompt_ids(messages)

    def encode(self, text: str) -> list[int]:
        return self._model().chat_format.encode_prompt(text)

    def reply_stops(self, cfg: GenerationConfig, loaded=None) -> tuple[str, ...]:
        """The stops of one reply: `cfg.stop` and the chat format's turn markers (one matcher runs them)."""
        return reply_stops(cfg.stop, (loaded or self._model()).chat_format.stop_strings)

    @property
    def context_length(self) -> int:
        return self._model().context_length

    def _prepare(self, prompt: str | Sequence[int], cfg) -> Request:
        """What every reply starts from: the settings parsed, the model it runs on, the prompt ids (as given,
        or rendered text encoded once by the chat format) with room for at least one new token, its stops."""
        cfg = GenerationConfig.parse(cfg)
        loaded = self._model()
        ids = loaded.chat_format.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt_fits(len(ids), loaded.context_length)
        return Request(loaded, cfg, ids, min(cfg.max_new_tokens, loaded.context_length - len(ids)),
                       self.reply_stops(cfg, loaded))


@dataclass(frozen=True)
class Request:
    """One reply to generate (LazyModelBackend._prepare)."""

    loaded: object  # what the backend loaded: its `chat_format`, `context_length` and model
    cfg: GenerationConfig
    ids: list[int]  # the prompt
    limit: int  # the most tokens to generate: max_new_tokens, or what the context has room for
    stops: tuple[str, ...]  # cfg.stop and the chat format's turn markers
