"""Which generation settings a backend starts with: its entry's table, its model's file, or the app's.

    from backends.registry import generation_defaults, load_config
    generation_defaults(load_config(), "smollm2")   # GenerationConfig(temperature=0.2, top_p=0.9, ...)

The layers, later ones winning field by field:
1. the app-wide `[generation]` table of configs/app.toml (the fallback for every backend);
2. the model's own `generation_config.json` (the Hugging Face convention: `temperature`, `top_k`, `top_p`,
   `repetition_penalty`, `max_new_tokens`, `do_sample = false` meaning greedy) where the backend's model
   is a local directory: a native checkpoint, or a transformers save_pretrained directory;
3. the entry's own `[backends.KEY.generation]` table: what whoever wrote the config chose for this entry.

`backends.registry.generation_defaults(config, key)` is the one entry point (the UI, /chat and the
benchmarks use it); this module holds the pieces. Nothing here loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from backends.base import BackendError, GenerationConfig

GENERATION_TABLE = "generation"  # [backends.KEY.generation]
HF_FILE = "generation_config.json"
# generation_config.json keys this app understands; the rest (bos/eos ids, max_length, ...) are not ours.
HF_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def hf_file_settings(directory: Path) -> dict:
    """The fields a model directory's generation_config.json sets; {} when it has none or it is unreadable."""
    path = Path(directory) / HF_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or not JSON: the model states no preference
        return {}
    if not isinstance(data, dict):
        return {}
    settings = {k: data[k] for k in HF_KEYS if data.get(k) is not None}
    if data.get("do_sample") is False:
        settings["temperature"] = 0.0  # transformers' meaning: greedy, whatever temperature says
    return settings


def model_directory(kind: str, settings: dict) -> Path | None:
    """The local directory a backend entry's model lives in, if it has one (found without loading it)."""
    if kind == "native":
        from gpt.checkpoint import CheckpointError, resolve_checkpoint

        try:
            return resolve_checkpoint(settings.get("checkpoint", "latest"))
        except CheckpointError:
            return None  # the backend itself reports this, with what to do, when it is built
    model = settings.get("model")
    if kind == "hf" and model and not settings.get("gguf_file") and Path(model).is_dir():
        return Path(model)
    return None


def resolve(config: dict, key: str | None) -> GenerationConfig:
    """The defaults for backend `key` (a configured key, a bare kind, or None for the app-wide ones)."""
    settings = dict(config.get("generation") or {})
    entry = (config.get("backends") or {}).get(key) if key else None
    kind = entry.get("kind") if isinstance(entry, dict) else key
    directory = model_directory(kind, entry or {}) if kind in ("native", "hf") else None
    if directory is not None:
        settings.update(hf_file_settings(directory))
    if isinstance(entry, dict):
        settings.update(entry.get(GENERATION_TABLE) or {})
    where = f"[backends.{key}.generation] or [generation]" if entry else "[generation]"
    try:
        return GenerationConfig.parse(settings)  # the one parser (TOML's top_k = 0 means off)
    except (ValueError, TypeError) as exc:
        raise BackendError(f"The generation defaults for {key or 'the app'} are invalid ({exc}): fix {where} "
                           f"in the config.") from None
