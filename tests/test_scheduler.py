"""The batched scheduler (gpt/scheduler.py): one thread, one decode loop, every request its own settings.

CPU, tiny random models: replies alone equal replies in a batch, cancellation frees a row, waiting
requests see their place, stop ids and token limits hold, and no thread but the scheduler's runs the model.
"""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from gpt.engine import Engine
from gpt.model import GPT, GPTConfig
from gpt.sampling import SamplingParams
from gpt.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0.0)
APP_DEFAULT = SamplingParams(temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.1)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False)
SETTINGS = [APP_DEFAULT, GREEDY, SamplingParams(temperature=1.0, top_k=None, top_p=0.8),
            SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=1.2, top_k=5)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread (the scheduler takes its creator's count): tiny steps gain nothing from two, and on a
    loaded machine a second OpenMP thread mostly waits at barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**arch) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=128, n_layer=2, n_head=4, n_embd=64, **arch)).eval()


def prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 300 for j in range(4 + 5 * i)] for i in range(n)]


def plain_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy ids from the model's own forward with a batch-1 KVCache: the reference without any scheduler."""
    cache = model.new_cache(1, len(prompt) + n)
    out = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1]
        for _ in range(n):
            token = logits.argmax(-1)
            out.append(int(token))
            logits = model(token.view(1, 1), cache=cache)[:, -1]
    return out


@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])
def test_seeded_replies_are_the_same_alone_and_in_a_batch(arch):
    engine = Engine(tiny(**arch), capacity=8)
    jobs = [(p, SETTINGS[i % len(SETTINGS)], 100 + i) for i, p in enumerate(prompts(8))]
    alone = [list(engine.generate(p, 24, params, seed=seed)) for p, params, seed in jobs]
    replies = [engine.generate(p, 24, params, seed=seed) for p, params, seed in jobs]  # all in flight at once
    assert [list(r) for r in replies] == alone
    assert all(len(a) == 24 for a in alone)
    assert len({tuple(a) for a in alone}) == len(alone)


def test_greedy_replies_equal_the_plain_forward_whatever_the_batch():
    model = tiny()
    engine = Engine(model, capacity=4)
    ps = prompts(6)  # more requests than rows: some wait, then join as others leave
    replies = [engine.generate(p, 10 + 5 * i, GREEDY) for i, p in enumerate(ps)]
    assert [list(r) for r in replies] == [plain_greedy(model, p, 10 + 5 * i) for i, p in enumerate(ps)]


def test_a_long_prompt_prefilled_in_chunks_gives_the_same_reply():
    model = tiny(**LLAMA)
    prompt = prompts(20)[-1]  # 99 tokens
    chunked = Scheduler(model, prefill_chunk=8)
    other = chunked.submit(prompts(2)[1], 60, GREEDY)  # decodes while the long prompt is prefilled
    assert list(chunked.submit(prompt, 20, APP_DEFAULT, seed=5)) == \
        list(Scheduler(model, prefill_chunk=512).submit(prompt, 20, APP_DEFAULT, seed=5))
    assert list(other) == plain_greedy(model, prompts(2)[1], 60)


def submit_together(scheduler: Scheduler, jobs: list[tuple[list[int], int]]) -> list:
    """Submit greedy requests so that the scheduler thread sees them all at its next turn (it takes the lock
    they are queued under to admit them)."""
    with scheduler._cond:
        return [scheduler.submit(p, n, GREEDY) for p, n in jobs]


def prefill_batches(model: GPT) -> list[int]:
    """Rows of every forward that takes more than one position (the prefills), as they happen."""
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]) if args[0].shape[1] > 1 else None)
    return sizes


def test_requests_that_arrive_together_share_one_prefill_forward_per_chunk():
    model = tiny(**LLAMA)
    sizes = prefill_batches(model)
    ps = [prompts(7)[6][:30], prompts(2)[1][:2], prompts(3)[2][:13], prompts(6)[5][:5]]
    scheduler = Scheduler(model, prefill_chunk=24, prefill_group=8)  # the CUDA default; CPU's is 1
    replies = [list(r) for r in submit_together(scheduler, [(p, 12) for p in ps])]
    # Shortest first, 24 prompt tokens a forward: positions 0-5 of all four (the 2- and 5-token prompts end,
    # padded), 6-17 of the other two (13 ends), then 18-29 of the 30-token prompt alone.
    assert sizes == [4, 2, 1]
    assert replies == [plain_greedy(model, p, 12) for p in ps]


def test_on_cpu_requests_that_arrive_together_are_prefilled_one_at_a_time():
    model = tiny()
    sizes = prefill_batches(model)
    ps = [prompts(5)[4][:20], prompts(4)[3][:9], prompts(3)[2][:13]]
    replies = [list(r) for r in submit_together(Scheduler(model), [(p, 6) for p in ps])]
    assert sizes == [1, 1, 1]  # compute-bound: a group would only make the first wait for the last
    assert replies == [plain_greedy(model, p, 6) for p in ps]


def test_a_prefill_group_survives_cancelled_members_and_requests_that_end_beside_it():
    model = tiny()
    scheduler = Scheduler(model, prefill_chunk=8, prefill_group=8)
    short = scheduler.submit([5, 6, 7], 3, GREEDY)
    next(short)  # decoding: it ends while the group below is still being prefilled
    ps = [prompts(9)[8][:40], prompts(6)[5][:20], prompts(8)[7][:33]]
    replies = submit_together(scheduler, [(p, 8) for p in ps])
    stalls = iter(range(2))  # the group's first chunk runs, then the 20-token prompt's consumer leaves
    model.register_forward_pre_hook(
        lambda _m, args: replies[1].close() if args[0].shape[1] > 1 and next(stalls, None) == 1 else None)
    assert len(list(short)) == 2
    assert list(replies[0]) == plain_greedy(model, ps[0], 8)
    assert list(replies[2]) == plain_greedy(model, ps[2], 8)
    assert replies[1].finish_reason == "cancelled"
    assert scheduler.running == 0 and list(scheduler.submit(ps[1], 8, GREEDY)) == plain_greedy(model, ps[1], 8)


def test_a_closed_or_dropped_reply_frees_its_row_for_the_next_request():
    scheduler = Scheduler(tiny(), capacity=1)
    first = scheduler.submit([1, 2, 3], 100, GREEDY)
    waiting = scheduler.submit([4, 5, 6], 5, GREEDY)
    next(first)
    assert waiting.place == 1
    first.close()
    assert len(list(waiting)) == 5  # it got the row although `first` had 99 tokens to go
    assert first.finish_reason == "cancelled"

    dropped = scheduler.submit([1, 2, 3], 100, GREEDY)
    next(dropped)
    job = dropped._job
    del dropped
    gc.collect()
    assert len(list(scheduler.submit([7, 8], 4, GREEDY))) == 4
    assert job.finish_reason == "cancelled" and job.generated < 100


def test_waiting_requests_see_their_place_in_line():
    model = tiny()
    scheduler = Scheduler(model, capacity=2)
    running = [scheduler.submit([1, 2, 3], 100, GREEDY) for _ in range(2)]
    for r in running:
        next(r)
    go = threading.Event()
    hold = model.register_forward_pre_hook(lambda *_: go.wait())  # the loop stalls mid-step: nothing finishes
    queued = [scheduler.submit([9, 8, 7], 3, GREEDY) for _ in range(3)]
    assert [r.place for r in running] == [0, 0]
    assert [q.place for q in queued] == [1, 2, 3]
    assert scheduler.waiting == 3 and scheduler.running == 2
    hold.remove()
    go.set()
    running[0].close()
    assert len(list(queued[0])) == 3 and queued[0].place is None  # it ran and finished
    running[1].close()
    assert [len(list(q)) for q in queued[1:]] == [3, 3]


def test_a_stop_id_ends_the_reply_without_being_yielded():
    model = tiny()
    reference = plain_greedy(model, [10, 11, 12], 30)
    stop = reference[12]
    reply = Scheduler(model).submit([10, 11, 12], 30, GREEDY, stop_ids={stop})
    assert list(reply) == reference[:reference.index(stop)]
    assert reply.finish_reason == "stop"


def test_max_new_tokens_and_the_context_bound_the_reply():
    scheduler = Scheduler(tiny())
    reply = scheduler.submit([1, 2], 7, APP_DEFAULT, seed=1)
    assert len(list(reply)) == 7 and reply.finish_reason == "length"
    assert len(list(scheduler.submit(list(range(120)), 50, GREEDY))) == 128 - 120  # the context fills
    with pytest.raises(ValueError, match="context holds 128"):
        scheduler.submit(list(range(128)), 5, GREEDY)


def test_the_kv_budget_sets_the_context_each_request_gets():
    model = tiny()
    per_position = 2 * 2 * 4 * 16 * 4  # k and v, 2 layers, 4 heads of 16, fp32
    scheduler = Scheduler(model, capacity=4, kv_budget_bytes=4 * 65 * per_position)
    assert scheduler.context_length == 64
    with pytest.raises(ValueError, match="smaller capacity"):
        Scheduler(model, capacity=4, kv_budget_bytes=1000)


def test_only_the_scheduler_thread_runs_the_model():
    model = tiny()
    engine = Engine(model, capacity=3)
    seen: set[threading.Thread] = set()
    model.register_forward_pre_hook(lambda *_: seen.add(threading.current_thread()))
    results = {}

    def chat(i):
        results[i] = list(engine.generate(prompts(6)[i], 12, APP_DEFAULT, seed=i))

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {engine.scheduler.thread}
    assert all(len(r) == 12 for r in results.values())


def test_an_error_in_a_step_reaches_the_consumers_and_the_scheduler_serves_on():
    model = tiny()
    scheduler = Scheduler(model)
    fail = {"now": True}

    def hook(*_):
        if fail.pop("now", False):
            raise RuntimeError("device lost")

    handle = model.register_forward_pre_hook(hook)
    with pytest.raises(RuntimeError, match="device lost"):
        list(scheduler.submit([1, 2, 3], 5, GREEDY))
    handle.remove()
    assert list(scheduler.submit([1, 2, 3], 5, GREEDY)) == plain_greedy(model, [1, 2, 3], 5)


def test_a_dropped_engine_ends_its_thread_after_the_replies_under_way():
    engine = Engine(tiny())
    reply = engine.generate([1, 2, 3], 20, GREEDY)
    thread_of = engine.scheduler
    del engine
    gc.collect()
    assert len(list(reply)) == 20
    deadline = time.monotonic() + 5
    while thread_of.thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not thread_of.thread.is_alive()


def test_tied_scores_are_ranked_by_id_so_a_seeded_draw_never_depends_on_sort_order():
    from gpt.sampling import top_candidates

    scores = torch.tensor([[1.0, 3.0, -2.0, 3.0, float("-inf"), -0.5, 0.0, 3.0, 2.5]])
    values, ids = top_candidates(scores, 6)
    assert ids.tolist() == [[1, 3, 7, 8, 0, 6]]
    assert values.tolist() == [[3.0, 3.0, 3.0, 2.5, 1.0, 0.0]]


def test_the_app_streams_as_many_replies_at_once_as_the_engine_decodes():
    from backends.native import serving_capacity
    from chatapp.ui_service import GENERATE_LIMIT
    from gpt.scheduler import default_capacity

    assert GENERATE_LIMIT == serving_capacity() == default_capacity("cuda" if torch.cuda.is_available() else "cpu")


def test_native_backend_replies_streamed_at_once_equal_the_same_replies_one_by_one(tiny_native_ckpt):
    from backends import GenerationConfig, create_backend

    backend = create_backend("native", checkpoint=str(tiny_native_ckpt), device="cpu")
    prompt = backend.format_chat([{"role": "user", "content": "Tell me a story."}])
    configs = [GenerationConfig(max_new_tokens=12, seed=s, temperature=0.9) for s in range(4)]
    alone = [backend.generate(prompt, c) for c in configs]
    streams = [backend.stream(prompt, c) for c in configs]
    assert ["".join(s) for s in streams] == alone
    assert backend._model().engine.scheduler.thread.is_alive()
