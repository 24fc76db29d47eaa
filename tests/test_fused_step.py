"""The scheduler's fused CUDA step (gpt/fused_step.py, gpt/fused_sampling.py, gpt/gemv.py `fused_rows`).

The kernels run on CUDA only: these tests run on the GPU host (`python -m pytest tests/test_fused_step.py`
there) and are skipped elsewhere; on CPU the step runs the module forward, which tests/test_scheduler.py
pins. They check that the fused step computes what the module forward computes (up to the order of
additions), that a row's result does not depend on its batch, and that seeded replies reproduce.
"""

from __future__ import annotations

import pytest
import torch

from gpt.engine import Engine
from gpt.model import GPT, GPTConfig
from gpt.sampling import SamplingParams
from gpt.slots import DecodeView, Slots

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused step runs on CUDA (GPU host)")

APP_DEFAULT = SamplingParams(temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.1)
SETTINGS = [APP_DEFAULT, SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=20, top_p=0.5,
                                                                         repetition_penalty=1.3)]
LLAMA = dict(vocab_size=4096, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536, bias=False,
             norm="rmsnorm", mlp="swiglu", pos="rope")


def model_of(**arch) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=4096, block_size=512, n_layer=2, n_head=12, n_embd=768) | arch
    return GPT(GPTConfig(**cfg)).to("cuda", torch.bfloat16).eval()


def filled_slots(model: GPT, fused: bool, rows: int = 8) -> Slots:
    """Rows with prompts of different lengths, prefilled through the model, each with its first id."""
    slots = Slots(model, rows, 256, fused=fused)
    for r in range(rows):
        prompt = [(13 * r + 7 * j) % model.config.vocab_size for j in range(5 + 29 * r)]
        slots.start_rows(r, [prompt], [SETTINGS[r % 3]], [r])
        logits = model(torch.tensor([prompt], device="cuda"), cache=slots.prefill_view(r, 0), last_only=True)[:, -1]
        slots.activate(r, slots.first_token(r, logits), len(prompt))
    return slots


@pytest.mark.parametrize("act,norm", [(None, "layernorm"), ("gelu_tanh", "layernorm"), (None, None),
                                      ("swiglu", "rmsnorm")])
def test_fused_products_compute_the_modules_arithmetic_whatever_the_batch(act, norm):
    from gpt.gemv import fused_gemv_reference, fused_rows

    torch.manual_seed(0)
    K, N = 768, 1000
    w = torch.randn(2 * N if act == "swiglu" else N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(w.shape[0], device="cuda", dtype=torch.bfloat16) * 0.1
    nw, nb = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5, torch.randn(K, device="cuda").bfloat16()
    spec = {"layernorm": ("layernorm", nw, nb, 1e-5), "rmsnorm": ("rmsnorm", nw, None, 1e-5), None: None}[norm]
    x = torch.randn(19, K, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(19, N, device="cuda", dtype=torch.bfloat16) if norm is None else None
    got = fused_rows(x, w, bias, norm=spec, act=act, residual=res)
    torch.testing.assert_close(got, fused_gemv_reference(x, w, bias, norm=spec, act=act, residual=res),
                               atol=2e-2, rtol=2e-2)
    alone = fused_rows(x[3:4].contiguous(), w, bias, norm=spec, act=act,
                       residual=None if res is None else res[3:4].contiguous())
    assert torch.equal(alone[0], got[3])


def test_split_k_products_add_their_parts_in_a_fixed_order_whatever_the_batch():
    from gpt import gemv
    from gpt.gemv import fused_gemv_reference, fused_rows

    torch.manual_seed(0)
    K, N = 3072, 768
    assert gemv.SPLIT_K(N, K) > 1  # GPT-2's MLP output product: few tiles, long rows
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1
    x = torch.randn(19, K, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(19, N, device="cuda", dtype=torch.bfloat16)
    got = fused_rows(x, w, bias, residual=res)
    torch.testing.assert_close(got, fused_gemv_reference(x, w, bias, residual=res), atol=2e-2, rtol=2e-2)
    for _ in range(3):  # the arrival counters are back at zero after every launch
        assert torch.equal(fused_rows(x, w, bias, residual=res), got)
    assert torch.equal(fused_rows(x[5:6].contiguous(), w, bias, residual=res[5:6].contiguous())[0], got[5])


@pytest.mark.parametrize("nh,nkv", [(12, 12), (9, 3)])
def test_one_query_attention_reads_each_row_up_to_its_position_and_writes_its_key_and_value(nh, nkv):
    from gpt.fused_step import attend, attend_reference

    torch.manual_seed(0)
    hd, b = 64, 6
    k = torch.randn(b, nkv, 301, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qkv = torch.randn(b, (nh + 2 * nkv) * hd, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor([0, 1, 127, 128, 299, 300], device="cuda")  # the last row is inactive (scratch)
    active = torch.tensor([True] * 5 + [False], device="cuda")
    k2, v2 = k.clone(), v.clone()
    got = attend(qkv, k, v, pos, active, nh, nkv, hd)
    torch.testing.assert_close(got, attend_reference(qkv, k2, v2, pos, active, nh, nkv, hd), atol=1e-2, rtol=1e-2)
    assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])
def test_the_fused_step_gives_the_module_forwards_logits_and_rows_do_not_depend_on_the_batch(arch):
    from gpt import fused_step

    model = model_of(**arch)
    assert fused_step.available(model)
    with torch.inference_mode():
        fused, plain = filled_slots(model, True), filled_slots(model, False)
        agree = 0
        for _ in range(4):
            a = fused_step.forward(model, fused, 8).float()
            b = model(plain.tokens[:8].view(8, 1), cache=DecodeView(plain, 8, 256))[:, -1].float()
            assert (a - b).abs().max() < 0.1
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            for s in (fused, plain):
                s.tokens[:8], s.pos[:8] = b.argmax(-1), s.pos[:8] + 1
        assert agree >= 30  # of 32: bf16 near-ties may differ
        k, v = fused.k.clone(), fused.v.clone()
        batch = fused_step.forward(model, fused, 8)
        fused.k.copy_(k), fused.v.copy_(v)
        assert torch.equal(fused_step.forward(model, fused, 1)[0], batch[0])


@pytest.mark.parametrize("candidates", [1, 50, 200])
def test_fused_sampling_picks_what_sample_rows_picks_and_advances_the_rows(candidates):
    from gpt import fused_sampling

    model = model_of()
    with torch.inference_mode():
        fused, plain = filled_slots(model, True), filled_slots(model, False)
        for trial in range(5):
            logits = (torch.randn(8, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(trial)) * 3)
            logits = logits.bfloat16()
            got = fused_sampling.sample_step(logits, fused, 8, candidates).clone()
            want = plain._sample(logits, slice(0, 8), candidates)
            assert torch.equal(got, want)
            plain._note(slice(0, 8), want, plain.active[:8])
            plain.tokens[:8], plain.pos[:8], plain.steps[:8] = want, plain.pos[:8] + 1, plain.steps[:8] + 1
            for name in ("seen", "tokens", "pos", "steps"):
                assert torch.equal(getattr(fused, name), getattr(plain, name)), name


def test_seeded_replies_are_the_same_alone_and_batched_through_the_cuda_engine():
    import threading

    engine = Engine(model_of())
    assert engine.scheduler.graphs
    prompts = [[(5 * i + j) % 4096 for j in range(3 + 40 * i)] for i in range(6)]
    alone = [list(engine.generate(p, 40, SETTINGS[i % 3], seed=i)) for i, p in enumerate(prompts)]
    batched = [None] * 6

    def one(i):
        batched[i] = list(engine.generate(prompts[i], 40, SETTINGS[i % 3], seed=i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.scheduler.close()
    assert batched == alone


@pytest.mark.parametrize("K,N,bias", [(768, 2304, True), (576, 1000, False), (768, 4096, False)])
def test_prefill_products_give_a_row_the_same_bits_alone_and_among_others(K, N, bias):
    from gpt.prefill import linear

    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1 if bias else None
    x = torch.randn(2, 700, K, device="cuda", dtype=torch.bfloat16)
    got = linear(x, w, b)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), atol=2e-2, rtol=2e-2)
    for rows in (x[1, 300:301], x[1, 123:456], x[:, 5:9]):  # alone, a chunk, a group of two
        sub = linear(rows.contiguous(), w, b)
        want = got[1, 300:301] if rows.shape[0] == 1 else got[1, 123:456] if rows.dim() == 2 else got[:, 5:9]
        assert torch.equal(sub, want)


@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])
def test_prompts_prefilled_together_give_the_replies_they_give_alone(arch):
    from gpt.scheduler import Scheduler

    scheduler = Scheduler(model_of(**arch))
    prompts = [[(11 * i + 3 * j) % 4096 for j in range(2 + 57 * i)] for i in range(7)]
    alone = [list(scheduler.submit(p, 30, SETTINGS[i % 3], seed=i)) for i, p in enumerate(prompts)]
    with scheduler._cond:  # queued together: the thread admits them as one group, one prefill forward
        replies = [scheduler.submit(p, 30, SETTINGS[i % 3], seed=i) for i, p in enumerate(prompts)]
    together = [list(r) for r in replies]
    scheduler.close()
    assert together == alone


def test_a_prompt_prefilled_by_a_graph_and_one_cut_into_eager_chunks_give_the_same_reply():
    from gpt.scheduler import Scheduler

    model = model_of(**LLAMA)
    prompt = [(7 * j + 1) % 4096 for j in range(150)]
    whole = Scheduler(model)  # one recorded chunk of 192 positions
    chunked = Scheduler(model, prefill_chunk=64)  # a recorded first chunk of 64, then two eager ones
    want = list(whole.submit(prompt, 30, APP_DEFAULT, seed=3))
    got = list(chunked.submit(prompt, 30, APP_DEFAULT, seed=3))
    assert whole._prefill_graphs._graphs and chunked._prefill_graphs._graphs
    whole.close(), chunked.close()
    assert got == want


def test_requests_that_stop_mid_batch_leave_cleanly_while_the_next_step_runs_ahead():
    import threading

    engine = Engine(model_of())
    assert engine.scheduler.run_ahead  # on CUDA the next step is queued before a step's ids are read
    prompts = [[(7 * i + j) % 4096 for j in range(4 + 30 * i)] for i in range(6)]
    full = [list(engine.generate(p, 40, SETTINGS[i % 3], seed=i)) for i, p in enumerate(prompts)]
    stops = [{full[i][6 + 5 * i]} if i % 2 else set() for i in range(6)]  # three requests end mid-batch
    want = [f[:f.index(next(iter(s)))] if s else f for f, s in zip(full, stops, strict=True)]
    batched = [None] * 6

    def one(i):
        batched[i] = list(engine.generate(prompts[i], 40, SETTINGS[i % 3], stop_ids=stops[i], seed=i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = list(engine.generate(prompts[0], 40, SETTINGS[0], seed=0))  # rows freed and reused correctly
    engine.scheduler.close()
    assert batched == want and after == full[0]
