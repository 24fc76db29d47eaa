"""The backend registry: configs/app.toml names the backends users can pick; `create_backend` builds one.

    from backends import create_backend, list_backends
    list_backends()                                   # [{"key": "smollm2", "label": ..., "kind": "hf"}, ...]
    backend = create_backend("smollm2")               # a configured key
    backend = create_backend("native", checkpoint="models/native/my-run")   # options override the config
    backend = create_backend("hf", model="gpt2")      # a bare kind: native, hf or openai
    backend = create_backend("openai", base_url="http://127.0.0.1:8000/v1", model="m")  # any OpenAI-style server

The config file is `path`, else $NANOGPT_CHAT_CONFIG, else configs/app.toml of this repository.
Backend classes are imported only when built, so the native path never imports transformers.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

from backends.base import BackendError, ChatBackend, GenerationConfig
from gpt.assets import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "configs" / "app.toml"
KINDS = ("native", "hf", "openai")


def config_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("NANOGPT_CHAT_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike | None = None) -> dict:
    """The parsed app config; a missing or malformed file, or a bad backend entry, is one BackendError."""
    path = config_path(path)
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        raise BackendError(f"Config file {path} does not exist: pass an existing file with --config or "
                           f"NANOGPT_CHAT_CONFIG, or restore configs/app.toml.") from None
    except tomllib.TOMLDecodeError as e:
        raise BackendError(f"Config file {path} is not valid TOML ({e}): fix that line.") from None
    _check_types(config, path)
    for key, section in config.get("backends", {}).items():
        if not isinstance(section, dict) or section.get("kind") not in KINDS:
            kind = section.get("kind") if isinstance(section, dict) else None
            raise BackendError(f"[backends.{key}] in {path} has kind {kind!r}: set kind to one of "
                               f"{', '.join(KINDS)}.")
        if not isinstance(section.get("label", key), str):
            raise BackendError(f"label of [backends.{key}] in {path} must be a string, got "
                               f"{section['label']!r}: put it in quotes.")
    default = config.get("app", {}).get("default_backend")
    if default is not None and default not in config.get("backends", {}) and default not in KINDS:
        raise BackendError(f"default_backend {default!r} in {path} is not configured: use one of "
                           f"{', '.join(config.get('backends', {}))}.")
    return config


# [app] settings read before the app is built; other [app] keys are checked where they are used
# (chatapp/limits.py, chatapp/model_slot.py), each with a sentence naming the key.
APP_TYPES = {"default_backend": (str, "a string"), "history": (str, "a string (a file path)"),
             "system_prompt": (str, "a string"), "ready_for_finetune": (int, "a whole number")}


def _check_types(config: dict, path: Path) -> None:
    """Sections must be tables and known [app] values of their type; [generation] must make a GenerationConfig."""
    for name in ("app", "generation", "backends"):
        if name in config and not isinstance(config[name], dict):
            raise BackendError(f"{name} in {path} must be a [{name}] section (a table), got {config[name]!r}: "
                               f"write its settings under a [{name}] line.")
    app = config.get("app", {})
    for key, (kind, what) in APP_TYPES.items():
        value = app.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise BackendError(f"[app] {key} in {path} must be {what}, got {value!r}: fix it or remove the line.")
    if app.get("ready_for_finetune", 0) < 0:
        raise BackendError(f"[app] ready_for_finetune in {path} must be 0 or more, got {app['ready_for_finetune']}.")
    try:
        generation_defaults(config)
    except (ValueError, TypeError) as exc:
        raise BackendError(f"[generation] in {path}: {exc}; fix that line.") from None


def list_backends(config: dict | None = None) -> list[dict]:
    """The configured backends in file order: [{"key", "label", "kind"}]."""
    config = load_config() if config is None else config
    return [{"key": key, "label": section.get("label", key), "kind": section["kind"]}
            for key, section in config.get("backends", {}).items()]


def generation_defaults(config: dict | None = None, key: str | None = None) -> GenerationConfig:
    """The generation settings backend `key` starts with (None: the app-wide [generation] ones).

    The app's [generation], then the model directory's generation_config.json, then the entry's own
    [backends.KEY.generation] table; backends/generation_defaults.py says how. The UI, /chat and the
    benchmarks all ask here.
    """
    from backends.generation_defaults import resolve

    return resolve(load_config() if config is None else config, key)


def create_backend(name: str, config: dict | None = None, **options) -> ChatBackend:
    """A configured backend (`name` is a key; `options` override its settings) or a bare kind."""
    config = load_config() if config is None else config
    configured = config.get("backends", {})
    if name in configured:
        settings = {k: v for k, v in configured[name].items() if k not in ("kind", "label", "generation")}
        kind = configured[name]["kind"]
    elif name in KINDS:
        settings, kind = {}, name
    else:
        raise BackendError(f"Unknown backend {name!r}: choose one of {', '.join(configured) or '(none configured)'}"
                           f", or a kind ({', '.join(KINDS)}) with its options.")
    settings.update(options)
    cls = backend_class(kind)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "name")]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise BackendError(f"Backend {name!r} got unknown option(s) {', '.join(unknown)}: a {kind} backend takes "
                           f"{', '.join(accepted)}.")
    return cls(name=name, **settings)


def backend_class(kind: str) -> type[ChatBackend]:
    if kind == "native":
        from backends.native import NativeBackend

        return NativeBackend
    if kind == "hf":
        from backends.hf import HFBackend

        return HFBackend
    if kind == "openai":
        from backends.openai import OpenAIBackend

        return OpenAIBackend
    raise BackendError(f"Unknown backend kind {kind!r}: use one of {', '.join(KINDS)}.")


# --- the app's settings: [app] and [generation], read once ----------------------------------------------------

DEFAULT_HISTORY = "chat_history.jsonl"
RELEASE_UNUSED_AFTER_S = 600.0


@dataclass(frozen=True)
class AppSettings:
    """The [app] settings every entry point starts from (the web app, the console chat), with one set of
    fallbacks, and each backend's generation defaults ([generation] + the model's file + its entry):

        settings = AppSettings.load()              # or AppSettings(load_config(path))
        settings.default_backend                   # [app] default_backend, else the first configured backend
        settings.history, settings.system_prompt, settings.ready_for_finetune, settings.log_api
        settings.finetune_config, settings.release_unused_after_s
        settings.generation("smollm2")             # GenerationConfig: what backend "smollm2" starts with

    The size limits of [app] are read by chatapp/limits.py (`Limits.from_config`), which owns them.
    """

    config: dict

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> AppSettings:
        return cls(load_config(path))

    @property
    def app(self) -> dict:
        return self.config.get("app") or {}

    @property
    def default_backend(self) -> str:
        configured = list(self.config.get("backends") or {})
        key = self.app.get("default_backend") or (configured[0] if configured else None)
        if key is None:
            raise BackendError("The config has no backends: add a [backends.KEY] section (see "
                               "configs/app.toml).")
        return key

    @property
    def history(self) -> str:
        return self.app.get("history") or DEFAULT_HISTORY

    @property
    def system_prompt(self) -> str:
        return self.app.get("system_prompt") or ""  # "" means none

    @property
    def ready_for_finetune(self) -> int:
        return self.app.get("ready_for_finetune", 10)

    @property
    def log_api(self) -> bool:
        """Whether replies to the /v1 API are logged like the page's."""
        return bool(self.app.get("log_api", True))

    @property
    def finetune_config(self) -> str | None:
        """The fine-tune panel's TOML (None: configs/finetune.toml)."""
        return self.app.get("finetune_config")

    @property
    def release_unused_after_s(self) -> float:
        """Idle seconds after which a model no session chose is released (0 keeps it)."""
        value = self.app.get("release_unused_after_s", RELEASE_UNUSED_AFTER_S)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
            raise ValueError(f"[app] release_unused_after_s in the config must be a number of seconds >= 0, "
                             f"got {value!r}: fix it or remove it for the default ({RELEASE_UNUSED_AFTER_S:g}).")
        return float(value)

    def generation(self, key: str | None = None) -> GenerationConfig:
        """The generation settings backend `key` starts with (None: the app-wide [generation] ones)."""
        return generation_defaults(self.config, key)
