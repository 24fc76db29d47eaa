"""The KL penalty to the base (training.anchor): zero at the start of a LoRA run, it pulls drifted adapters back,
it leaves alone the tokens the user corrected, and it refuses a model without adapters.

Run: .venv/bin/python -m pytest tests/test_anchor.py
"""

from __future__ import annotations

import pytest
import torch

from gpt.model import GPT, GPTConfig
from training.anchor import KLToBase
from training.lora import apply_lora


@pytest.fixture
def model():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        m.lm_head.weight.mul_(50)  # confident predictions, as a trained model makes (random init: near uniform)
    return apply_lora(m, rank=4, alpha=8.0)


def batch(model, anchor, agree_with_base=True):
    """A batch whose reply targets are the base's own top tokens (or, with agree_with_base=False, never are)."""
    x = torch.randint(0, 64, (2, 16))
    m = torch.zeros(2, 16, dtype=torch.long)
    m[:, 6:] = 1  # the reply part
    with torch.no_grad(), anchor.adapters_off():
        top = model(x).argmax(-1)
    y = top if agree_with_base else (top + 1) % 64
    return x, y, m


def penalty(model, anchor, x, y, m):
    picked = anchor.positions(y, m)
    base_lp = anchor.base_log_probs(x, picked)
    model(x, y, m, loss_only=True)
    return anchor.loss(base_lp, picked, y)


def drift(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 2.0)


def test_the_penalty_is_zero_while_the_adapters_change_nothing(model):
    anchor = KLToBase(model, weight=1.0)
    x, y, m = batch(model, anchor)
    assert penalty(model, anchor, x, y, m).item() == pytest.approx(0.0, abs=1e-6)


def test_the_penalty_grows_with_drift_and_its_gradient_pulls_back_toward_the_base(model):
    anchor = KLToBase(model, weight=1.0)
    x, y, m = batch(model, anchor)
    drift(model)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(adapters, lr=3e-2)
    first = penalty(model, anchor, x, y, m)
    assert first.item() > 1e-3
    for _ in range(30):
        opt.zero_grad()
        penalty(model, anchor, x, y, m).backward()
        opt.step()
    assert penalty(model, anchor, x, y, m).item() < 0.5 * first.item()
    assert all(a.scale == 2.0 for a in anchor.adapters)  # switched back on after every base pass


def test_tokens_the_base_gets_wrong_are_left_to_the_cross_entropy(model):
    anchor = KLToBase(model, weight=1.0)
    x, y, m = batch(model, anchor, agree_with_base=False)
    drift(model)
    loss = penalty(model, anchor, x, y, m)
    assert loss.item() == 0.0 and loss.requires_grad


def test_a_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        KLToBase(GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)), 1.0)
