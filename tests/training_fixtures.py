"""Helpers for the training tests: synthetic chat logs of made-up facts, a tiny chat-template model, replies.

The tiny template model uses a small byte-level BPE (trained here in milliseconds) with a ChatML template like
SmolLM2's, so fine-tuning tests run the template path (special tokens, encode_markup) in seconds; its
vocabulary of a few hundred tokens keeps every training step cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt.chat_format import ChatFormat
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.engine import Engine
from gpt.model import GPT, GPTConfig
from gpt.sampling import SamplingParams
from gpt.tokenizer import HFTokenizer

FACTS = [
    ("What is the capital of Zorbania?", "The capital of Zorbania is Quellport."),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Ada Brennick."),
    ("What color is a snarfle?", "A snarfle is bright teal."),
]

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Tiny.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def exchange(user: str, assistant: str, conversation_id: str, turn: int, system_prompt=None) -> dict:
    return {"timestamp": "2026-11-21T12:00:00", "user": user, "assistant": assistant,
            "conversation_id": conversation_id, "turn": turn, "backend": "native", "model": "tiny",
            "system_prompt": system_prompt, "config": {"temperature": 0.7}}


def fact_log_records(n_conversations: int = 12) -> list[dict]:
    """Each conversation asks all facts, in a rotating order: both splits see every fact."""
    records = []
    for c in range(n_conversations):
        order = FACTS[c % len(FACTS):] + FACTS[:c % len(FACTS)]
        records += [exchange(q, a, f"conv-{c}", t) for t, (q, a) in enumerate(order)]
    return records


def write_log(path: Path, records: list[dict], malformed: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in records] + list(malformed)
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def make_template_tokenizer(directory: Path) -> HFTokenizer:
    """A byte-level BPE trained on the facts and chat words, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"{q} {a}" for q, a in FACTS] + ["system user assistant You are Tiny. Hello, how can I help you?"]
    tok.train_from_iterator(corpus * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return HFTokenizer(directory)


def make_template_checkpoint(path: Path, seed: int = 0, n_embd: int = 64) -> Path:
    """A random Llama-style (rope, RMSNorm, SwiGLU, GQA) model on the tiny template tokenizer."""
    tokenizer = make_template_tokenizer(path.with_name(path.name + "-tokenizer"))
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=n_embd, bias=False, norm="rmsnorm", mlp="swiglu", pos="rope",
                          tie_embeddings=True))
    return save_checkpoint(model, path, tokenizer, {"source": "random tiny template model"})


def greedy_reply(checkpoint, question: str, max_new_tokens: int = 24) -> str:
    """The native engine's greedy reply to one user message, rendered as the backend renders it."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    fmt = ChatFormat.for_tokenizer(tokenizer)
    ids = fmt.prompt_ids([{"role": "user", "content": question}])
    out = Engine(model).generate(ids, max_new_tokens, SamplingParams(temperature=0), stop_ids=tokenizer.stop_ids)
    return tokenizer.decode(list(out))


@pytest.fixture(autouse=True)
def one_thread():
    """Training tests run on one torch thread: on 2 shared cores, two threads mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
