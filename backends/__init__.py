"""Backends: one interface (`ChatBackend`) in front of the native engine and Hugging Face transformers.

    from backends import create_backend, list_backends, GenerationConfig
    backend = create_backend("smollm2")            # a key of configs/app.toml, or a kind: native, hf, openai
    ids = backend.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    for piece in backend.stream(ids, GenerationConfig(temperature=0)):   # the backend stops at its turn markers
        print(piece, end="", flush=True)
"""

from backends.base import BackendError, ChatBackend, GenerationConfig
from backends.registry import AppSettings, create_backend, generation_defaults, list_backends, load_config

__all__ = ["AppSettings", "BackendError", "ChatBackend", "GenerationConfig", "create_backend", "generation_defaults",
           "list_backends", "load_config"]
