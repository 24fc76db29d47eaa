"""The native engine: a GPT-2 (and Llama-family) model, tokenizers, sampling, KV-cache decoding, checkpoints.

Imports nothing of this project outside gpt/; transformers only lazily in the conversion code. The model
classes load on first use, so light modules (gpt.chatlog, gpt.assets) import without torch.
"""

__all__ = ["GPT", "GPTConfig", "KVCache"]


def __getattr__(name):
    if name in __all__:
        from gpt import model

        return getattr(model, name)
    raise AttributeError(f"module 'gpt' has no attribute {name!r}")
