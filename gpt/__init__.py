"""The native engine: a GPT-2 (and Llama-family) model, tokenizers, sampling, KV-cache decoding, checkpoints.

Imports nothing of this project outside gpt/; transformers only lazily in gpt/convert.py.
"""

from gpt.model import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
