"""Shared fixtures: a small random GPT-2 (transformers directory and native checkpoint of the same weights).

Nothing here touches the network: the hub is switched off for the whole test session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs a fixed set of property-test examples (a red CI then always means a change broke something);
# local runs draw new examples every time, which is how rare bugs get found.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

TINY_GPT2 = dict(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)


@pytest.fixture(scope="session")
def tiny_gpt2_hf_dir(tmp_path_factory):
    """A save_pretrained directory of a seeded random GPT-2 (no tokenizer files, as many GPT-2 dirs are)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2))
    path = tmp_path_factory.mktemp("tiny-gpt2-hf")
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_native_ckpt(tiny_gpt2_hf_dir, tmp_path_factory):
    """The same weights as `tiny_gpt2_hf_dir`, as a native checkpoint directory."""
    from gpt.convert import convert_to_native

    return convert_to_native(str(tiny_gpt2_hf_dir), tmp_path_factory.mktemp("native") / "tiny")
