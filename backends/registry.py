"""The backend registry: configs/app.toml names the backends users can pick; `create_backend` builds one.

    from backends import create_backend, list_backends
    list_backends()                                   # [{"key": "smollm2", "label": ..., "kind": "hf"}, ...]
    backend = create_backend("smollm2")               # a configured key
    backend = create_backend("native", checkpoint="models/native/my-run")   # options override the config
    backend = create_backend("hf", model="gpt2")      # a bare kind: native or hf

The config file is `path`, else $NANOGPT_CHAT_CONFIG, else configs/app.toml of this repository.
Backend classes are imported only when built, so the native path never imports transformers.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

from backends.base import BackendError, ChatBackend, GenerationConfig
from gpt.assets import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "configs" / "app.toml"
KINDS = ("native", "hf")


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
    for key, section in config.get("backends", {}).items():
        if not isinstance(section, dict) or section.get("kind") not in KINDS:
            kind = section.get("kind") if isinstance(section, dict) else None
            raise BackendError(f"[backends.{key}] in {path} has kind {kind!r}: set kind to one of "
                               f"{', '.join(KINDS)}.")
    default = config.get("app", {}).get("default_backend")
    if default is not None and default not in config.get("backends", {}) and default not in KINDS:
        raise BackendError(f"default_backend {default!r} in {path} is not configured: use one of "
                           f"{', '.join(config.get('backends', {}))}.")
    return config


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
    raise BackendError(f"Unknown backend kind {kind!r}: use one of {', '.join(KINDS)}.")
