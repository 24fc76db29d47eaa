"""The CPU batched decode step's fast paths: packed fp32 weights (gpt/packed_linear.py) and the sampler's CPU
routes (gpt/sampling.py) compute what the plain paths compute, and never get in the way of training."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.model import GPT, GPTConfig
from gpt.packed_linear import PackedLinear, available, pack_linears, unpack_linears
from gpt.sampling import RowSettings, SamplingParams, penalised, sample_rows, top_candidates
from gpt.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()


def test_packed_products_equal_plain_ones_and_training_still_gets_gradients():
    model = tiny()
    x = torch.randn(5, 3, 64)
    with torch.inference_mode():
        plain = model(x.new_zeros(2, 7, dtype=torch.long) + 11)
    assert pack_linears(model) == (9 if available() else 0)  # 2 layers x (2 attention + 2 MLP) + the head
    with torch.inference_mode():
        assert torch.allclose(model(x.new_zeros(2, 7, dtype=torch.long) + 11), plain, atol=1e-4)
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, nn.Linear)
    assert set(model.state_dict()) == set(tiny().state_dict())
    # Training: gradients flow through the plain product.
    model.train()
    _, loss = model(torch.randint(0, 300, (2, 8)), targets=torch.randint(0, 300, (2, 8)))
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_an_edited_weight_is_never_served_from_a_stale_packed_copy():
    layer = nn.Linear(16, 8)
    pack_linears(layer)
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # e.g. a fine-tuned weight loaded in place
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
        pack_linears(layer)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
    unpack_linears(layer)
    assert type(layer) is nn.Linear


def test_the_cpu_scheduler_packs_the_model_and_greedy_replies_stay_those_of_the_plain_forward():
    model = tiny()
    reference = []
    with torch.inference_mode():
        for prompt in ([1, 2, 3], [5, 9, 200, 7, 7]):
            ids = list(prompt)
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            reference.append(ids[len(prompt):])
    scheduler = Scheduler(model, capacity=2)
    replies = [scheduler.submit(p, 12, GREEDY) for p in ([1, 2, 3], [5, 9, 200, 7, 7])]
    assert [list(r) for r in replies] == reference
    assert type(model.lm_head) is PackedLinear or not available()
    scheduler.close()
    scheduler.thread.join(timeout=10)
    # A closed scheduler gives the packed copies' memory back: its model goes on to other work (fine-tuning).
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_the_penalty_on_cpu_touches_only_seen_ids_with_transformers_arithmetic():
    logits = torch.randn(3, 50) * 4
    seen = torch.rand(3, 50) < 0.2
    penalty = torch.tensor([1.3, 1.0, 2.0])
    expected = torch.where(seen, torch.where(logits < 0, logits * penalty[:, None], logits / penalty[:, None]),
                           logits)
    assert torch.equal(penalised(logits, seen, penalty), expected)


def test_a_tie_at_the_kth_candidate_keeps_the_lowest_ids():
    scores = torch.tensor([[0.5, 2.0, 1.0, 2.0, 1.0, 1.0, -1.0]])
    values, ids = top_candidates(scores, 4)  # three 1.0s compete for two places: ids 2 and 4 win
    assert ids.tolist() == [[1, 3, 2, 4]]
    assert values.tolist() == [[2.0, 2.0, 1.0, 1.0]]


def test_each_row_samples_the_same_id_alone_as_in_a_batch():
    torch.manual_seed(3)
    logits = torch.randn(6, 300) * 3
    params = [SamplingParams(temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.1), GREEDY,
              SamplingParams(temperature=1.0, top_k=5, top_p=0.8)] * 2
    rows = RowSettings.of(params, 300, "cpu")
    seen = torch.rand(6, 300) < 0.1
    uniforms = torch.rand(6)
    batch = sample_rows(logits, rows, uniforms, seen, candidates=50)
    for i in range(6):
        one = RowSettings(rows.temperature[i:i + 1], rows.top_k[i:i + 1], rows.top_p[i:i + 1], rows.penalty[i:i + 1])
        assert sample_rows(logits[i:i + 1], one, uniforms[i:i + 1], seen[i:i + 1], candidates=50) == batch[i]
