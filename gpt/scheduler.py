"""One thread owns the model and decodes every live request in one batch (continuous batching).

    scheduler = Scheduler(model)                      # capacity and KV budget default by device
    reply = scheduler.submit(prompt_ids, max_new_tokens=64, params=SamplingParams(), stop_ids={2}, seed=1)
    reply.place                                        # 0 once it runs; 1, 2, ... its place in line while it waits
    for token_id in reply:                             # ids arrive as the batch produces them
        ...
    reply.close()                                      # or just drop it: the request leaves at the next step

Each loop turn of the scheduler thread: drop requests whose consumer went away, admit waiting requests
into free KV rows (gpt/slots.py) as one prefill group (on CUDA every one a free row can take, on CPU one),
queue one decode step for every request that is decoding, run one chunk of the group's prompts (one
forward over all of them, at most `prefill_chunk` tokens in all; on CUDA the device runs the queued step
meanwhile), and hand each decoding request its new id. Requests join and leave between steps; the group's
prefill is interleaved with the others' decoding, a chunk at a time, so long prompts never freeze the
other replies, and on a GPU sixteen users who arrive together wait for one prefill, not for fifteen
others in turn (gpt/prefill.py). Each request keeps its own sampling
settings, seed, stop ids and token limit; its draws depend only on (seed, step), so a seeded request
gives the same reply alone or in any batch (up to floating-point differences batching makes in the
logits; docs/benchmarks.md says how often greedy ids differed).

No other thread runs the model: callers only put requests in and take ids out. That is also what makes
CUDA-graph capture safe: graphs are captured on this thread, between its own steps, never beside other
work on the GPU.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import torch

from gpt import packed_linear, prefill
from gpt.model import GPT
from gpt.sampling import SamplingParams, top_k_of
from gpt.slots import Slots, batch_buckets, bytes_per_position

_END = object()
_seed_counter = itertools.count(1)
_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def stop_all() -> None:
    """Stop every scheduler thread between steps (not inside a kernel launch) and wait for it to end. Runs at
    interpreter exit; a program that ends by itself calls it first, so no thread is still winding down
    while the interpreter tears torch down (that can abort the process)."""
    for scheduler in list(_live):
        scheduler.close(cancel=True)
    for scheduler in list(_live):
        if scheduler.thread is not None:
            scheduler.thread.join(timeout=5)


def default_capacity(device: torch.device | str) -> int:
    """Requests decoded at once by default: 16 on a GPU, 8 on a CPU (where 8 already fill the cores)."""
    return 16 if torch.device(device).type == "cuda" else 8


class _Job:
    def __init__(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams, stop_ids: set[int],
                 seed: int, wake):
        self.prompt_ids, self.max_new_tokens, self.params = prompt_ids, max_new_tokens, params
        self.stop_ids, self.seed = stop_ids, seed
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.row: int | None = None
        self.filled = 0  # cache positions written (prompt chunks, then one per decode step)
        self.generated = 0
        self.cancelled = False
        self.finished = False
        self.finish_reason: str | None = None
        self._wake = wake

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()


class Reply(Iterator[int]):
    """The ids of one request, as they come; `place` is its place in line (0 once it runs)."""

    def __init__(self, scheduler: Scheduler, job: _Job):
        self._scheduler, self._job = scheduler, job
        self._done = False
        weakref.finalize(self, job.cancel)  # a consumer that goes away frees the request's row

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> int:
        if self._done:
            raise StopIteration
        item = self._job.queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    @property
    def place(self) -> int | None:
        """0 while it runs, n >= 1 while n - 1 requests wait ahead of it, None once it has finished."""
        return self._scheduler._place_of(self._job)

    @property
    def finish_reason(self) -> str | None:
        """"stop" (a stop id), "length" (max_new_tokens), "cancelled", or None while it runs."""
        return self._job.finish_reason

    def close(self) -> None:
        self._done = True
        self._job.cancel()


class Scheduler:
    def __init__(self, model: GPT, *, capacity: int | None = None, kv_budget_bytes: int | None = None,
                 prefill_chunk: int | None = None, prefill_group: int | None = None, graphs: bool | None = None,
                 window: int | None = None, deterministic: bool = True):
        """`capacity`: requests decoded at once (default_capacity). `kv_budget_bytes`: the KV cache's size;
        the context each request gets is what fits (at most the model's); default 1 GiB on CPU, a quarter of
        the free memory on CUDA. `graphs` (default: on CUDA) replays decode steps as CUDA graphs; `window`
        rounds the attention span up (fewer graphs; default 256 with graphs, 1 without). `prefill_chunk`:
        prompt tokens one prefill forward takes; `prefill_group`: prompts prefilled together (defaults by
        device, below). `deterministic` (CUDA): keep to attention kernels that give the same result every
        run, so seeds reproduce."""
        self.model = model.eval()
        device = self.device
        self.capacity = capacity or default_capacity(device)
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.run_ahead = self.graphs  # queue the next step before reading this one's ids (_collect)
        self.window = window or (256 if self.graphs else 1)
        # Prompt tokens one prefill forward takes, over all the prompts of a group, and how many prompts a
        # group takes. On CUDA an eager prefill is bound by the host launching kernels (5-7 ms whether it is
        # 1 x 400 or 16 x 400 tokens), so the requests that arrive together are prefilled at once. On CPU a
        # prefill is compute: grouping saves nothing and only makes the first arrivals wait for the last
        # ones' prompts, so one request at a time is prefilled, a chunk between decode steps.
        self.prefill_chunk = prefill_chunk or (8192 if device.type == "cuda" else 128)
        self.prefill_group = prefill_group or (self.capacity if device.type == "cuda" else 1)
        if kv_budget_bytes is None:
            if device.type == "cuda":
                kv_budget_bytes = torch.cuda.mem_get_info(device)[0] // 4
            else:
                kv_budget_bytes = 1 << 30
        fits = kv_budget_bytes // (self.capacity * bytes_per_position(model)) - 1
        self.context_length = min(model.config.block_size, fits)
        if self.context_length < 16:
            raise ValueError(f"a KV budget of {kv_budget_bytes} bytes holds under 16 positions for each of "
                             f"{self.capacity} requests: give a larger budget or a smaller capacity")
        if device.type == "cuda" and deterministic:
            # cuDNN's attention kernel gave different results for the same inputs from run to run (H100,
            # torch 2.11), so a seeded reply did not reproduce; the memory-efficient kernel that runs instead
            # is deterministic but slower at batch 1 (docs/benchmarks.md). The switch is process-wide.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self._slots: Slots | None = None  # made by the scheduler thread on first use
        self._prefill_graphs: prefill.PrefillGraphs | None = None
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._decoding: list[_Job] = []  # index = row
        self._prefilling: list[_Job] = []  # the prefill group: rows after the decoding ones, shortest first
        self._in_flight: tuple[torch.Tensor, object] | None = None  # a queued step's new ids (and its event)
        self._in_flight_jobs: list[_Job] = []  # the requests of that step, in row order
        self._ending: list[_Job] = []  # requests that ended while a step run ahead was in flight
        self._host: torch.Tensor | None = None  # two pinned buffers the ids of steps in flight are copied to
        self._flip = 0
        self._closed = False
        self.thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()  # the CPU threads the creator gave torch, for the loop too
        _live.add(self)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    # --- the callers' side ------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
               stop_ids: Iterable[int] = (), seed: int | None = None) -> Reply:
        """Queue a request; its ids come from the returned Reply. A stop id ends it and is not yielded."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context_length}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if seed is None:  # unseeded: a fresh draw per request
            seed = int(torch.randint(0, 2**62, (1,)).item()) ^ next(_seed_counter)
        job = _Job(prompt_ids, min(max_new_tokens, room), params, set(stop_ids), int(seed) % 2**63, self._wake)
        with self._cond:
            if self._closed:
                raise RuntimeError("this scheduler was closed; load the model again")
            self._waiting.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="gpt-scheduler", daemon=True)
                self.thread.start()
            self._cond.notify()
        return Reply(self, job)

    def close(self, cancel: bool = False) -> None:
        """Stop taking requests; the thread finishes the ones it has (or with `cancel`, drops them at the
        next step), then ends and frees the cache."""
        with self._cond:
            self._closed = True
            if cancel:
                for job in [*self._waiting, *self._decoding, *self._prefilling]:
                    job.cancelled = True
            self._cond.notify()

    @property
    def running(self) -> int:
        return len(self._decoding) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _place_of(self, job: _Job) -> int | None:
        with self._cond:
            if job.finished:
                return None
            if job.row is not None:
                return 0
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return None

    # --- the scheduler thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            with self._cond:
                while not (self._waiting or self._decoding or self._prefilling or self._closed):
                    self._cond.wait()
                if self._closed and not (self._waiting or self._decoding or self._prefilling):
                    self._slots = self._prefill_graphs = None
                    # On CPU the slots packed the model's fp32 weights (a second copy, +0.5 GB for SmolLM2):
                    # a closed scheduler's model goes on to other work (fine-tuning after the replay answers).
                    packed_linear.unpack_linears(self.model)
                    return
            try:
                with torch.inference_mode():
                    self._turn()
            except Exception as exc:  # noqa: BLE001 - every request in flight learns why, the thread lives on
                self._fail_all(exc)

    def _turn(self) -> None:
        if self._slots is None:
            self._slots = Slots(self.model, self.capacity, self.context_length, graphs=self.graphs)
            if self.run_ahead and self.device.type == "cuda":
                self._host = torch.empty(2, self.capacity, dtype=torch.long, pin_memory=True)
        if self._in_flight is not None:  # collect the step queued last turn (maybe queueing the next)
            self._collect()
            return
        self._drop_cancelled()
        self._admit()
        if self._decoding:  # queued first: the device decodes while this thread issues the prefill's kernels
            self._launch()
        if self._prefilling:
            self._prefill_chunk()

    def _drop_cancelled(self) -> None:
        with self._cond:
            for job in [j for j in self._waiting if j.cancelled]:
                self._waiting.remove(job)
                self._finish(job, "cancelled")
        gone = [j for j in self._prefilling if j.cancelled]
        if gone:
            for job in gone:
                self._slots.deactivate(job.row)
                self._finish(job, "cancelled")
            self._prefilling = [j for j in self._prefilling if not j.cancelled]
            self._pack_group()
        self._leave([j for j in self._decoding if j.cancelled], "cancelled")

    def _admit(self) -> None:
        """Waiting requests that free rows can take (at most `prefill_group`) join one prefill group when none
        is prefilling, in the rows after the decoding ones, shortest prompt first: the prompts that end
        first are then the group's first rows, which join the decoding rows where they are."""
        with self._cond:
            free = self.capacity - len(self._decoding)
            if self._prefilling or not self._waiting or free <= 0:
                return
            group = [self._waiting.popleft() for _ in range(min(free, len(self._waiting), self.prefill_group))]
            group.sort(key=lambda j: len(j.prompt_ids))
            for i, job in enumerate(group):
                job.row = len(self._decoding) + i
        self._prefilling = group
        self._slots.start_rows(group[0].row, [j.prompt_ids for j in group], [j.params for j in group],
                               [j.seed for j in group])

    def _prefill_chunk(self) -> None:
        """One forward over the next chunk of every prompt in the group (all at the same positions; shorter
        prompts padded); the prompts that end in it get their first ids and join the decoding rows."""
        group = self._prefilling
        start = group[0].filled  # the whole group advances together
        longest = len(group[-1].prompt_ids) - start
        T = min(longest, max(1, self.prefill_chunk // len(group)))
        rows = [job.prompt_ids[start:start + T] for job in group]
        rows = [r + r[-1:] * (T - len(r)) for r in rows]
        ends = [min(len(job.prompt_ids) - start, T) - 1 for job in group]
        # Where the decode step is batch-invariant (the fused CUDA step), so is the prefill: a prompt's keys
        # and values do not depend on the prompts it was grouped with (gpt/prefill.py).
        invariant = self._slots.fused and prefill.available(self.model)
        logits = None
        if invariant and self.graphs and start == 0:
            if self._prefill_graphs is None:
                self._prefill_graphs = prefill.PrefillGraphs(self.model, self._slots, self.prefill_chunk)
            logits = self._prefill_graphs.run(rows, ends, group[0].row)
        if logits is None:
            view = self._slots.prefill_view(group[0].row, start, len(group), invariant)
            with prefill.invariant_products(self.model) if invariant else nullcontext():
                logits = self.model(torch.tensor(rows).to(self.device), cache=view,
                                    last_at=torch.tensor(ends).to(self.device))[:, -1]
        for job in group:
            job.filled = min(len(job.prompt_ids), start + T)
        done = [job for job in group if job.filled == len(job.prompt_ids)]  # a prefix: shortest first
        if not done:
            return
        first = self._slots.first_token(done[0].row, logits[:len(done)])
        self._slots.activate(done[0].row, first, [job.filled for job in done])
        # They join the decoding rows before their consumers see a token (so `running` is never behind).
        self._decoding += done
        self._prefilling = group[len(done):]
        ended = [job for job, token in zip(done, first.tolist(), strict=True) if not self._deliver(job, token)]
        if ended:
            self._leave(ended, None)

    def _launch(self) -> None:
        """Queue one decode step for every decoding request (on CUDA: a graph replay; on CPU it runs now)."""
        n = len(self._decoding)
        b = n if not self.graphs else next(s for s in batch_buckets(self.capacity) if s >= n)
        longest = max(j.filled for j in self._decoding) + 1
        span = min(-(-longest // self.window) * self.window, self.context_length + 1)
        candidates = max(top_k_of(j.params, self._slots.vocab_size) for j in self._decoding)
        out = self._slots.step(b, span, candidates)[:n]
        event = None
        if self._host is not None:  # copied out now, so the next step can be queued before these are read
            host = self._host[self._flip, :n]
            self._flip ^= 1
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            out = host
        elif self.run_ahead:  # no device (the step ran already): keep the ids from the next step's writes
            out = out.clone()
        self._in_flight = (out, event)
        self._in_flight_jobs = list(self._decoding)

    def _collect(self) -> None:
        """Read the step's new ids (the one host read of a step) and hand them out. When no request ends
        with them and nothing waits to join, the next step is queued first, so that the device computes it
        while this thread hands the ids out. With CUDA graphs (`run_ahead`) the next step is queued even
        before this one's ids are read, since the step itself feeds each row its new id: the device then
        never waits for this thread. A request that turns out to end here (a stop id) then has one
        discarded step computed for it, and rows are freed once that step is read."""
        out, event = self._in_flight
        self._in_flight = None
        jobs = self._in_flight_jobs  # a prefill that ended since the launch joined _decoding after these
        ahead = self.run_ahead and not self._ending and self._steady(jobs, None)
        if ahead:
            self._launch()
        if event is not None:
            event.synchronize()
        ids = out.tolist()
        for job in jobs:
            job.filled += 1
        if not ahead and not self._ending and self._steady(jobs, ids):
            self._launch()
        done = [job for job, token in zip(jobs, ids, strict=True)
                if not job.finished and not self._deliver(job, token)]
        if self._in_flight is not None:  # rows move only between steps: leave once the queued one is read
            self._ending += done
        else:
            self._leave(self._ending + done, None)
            self._ending = []

    def _steady(self, jobs: list[_Job], ids: list[int] | None) -> bool:
        """No request joins or ends with this step's ids (`None`: not read yet, stop ids unknown)."""
        if self._prefilling or (self._waiting and len(jobs) < self.capacity):
            return False
        return not any(j.cancelled or (t is not None and t in j.stop_ids) or j.generated + 1 >= j.max_new_tokens
                       for j, t in zip(jobs, ids or [None] * len(jobs), strict=True))

    def _deliver(self, job: _Job, token: int) -> bool:
        """Hand `token` to the request's consumer; False when the request has ended."""
        if token in job.stop_ids:
            self._finish(job, "stop")
            return False
        job.queue.put(token)
        job.generated += 1
        if job.generated >= job.max_new_tokens:
            self._finish(job, "length")
            return False
        return True

    def _leave(self, jobs: list[_Job], reason: str | None) -> None:
        """Free the rows of ended requests, keeping the decoding rows packed at 0..n-1 (the last row moves
        into each hole), and the prefill group right after them."""
        for job in sorted(jobs, key=lambda j: j.row, reverse=True):
            last = self._decoding.pop()
            if last is not job:
                self._slots.move(last.row, job.row, last.filled)
                self._decoding[job.row] = last
                last.row = job.row
            else:
                self._slots.deactivate(job.row)
            if reason is not None:
                self._finish(job, reason)
        self._pack_group()

    def _pack_group(self) -> None:
        """Move the prefill group down to the rows right after the decoding ones (lowest first: each one's
        new row was freed before it moves)."""
        for i, job in enumerate(self._prefilling):
            row = len(self._decoding) + i
            if job.row != row:
                self._slots.move(job.row, row, job.filled)
                job.row = row

    def _finish(self, job: _Job, reason: str) -> None:
        if job.finished:
            return
        job.finish_reason = reason
        job.queue.put(_END)
        with self._cond:
            job.finished = True

    def _fail_all(self, exc: Exception) -> None:
        jobs = self._decoding + self._prefilling
        self._decoding, self._prefilling, self._in_flight, self._in_flight_jobs = [], [], None, []
        jobs = [j for j in jobs if not j.finished]  # those that ended while a step ran ahead are done
        self._ending = []
        self._slots = self._prefill_graphs = None  # start again from a fresh cache
        for job in jobs:
            job.queue.put(exc)
            job.finish_reason = "error"
            with self._cond:
                job.finished = True

