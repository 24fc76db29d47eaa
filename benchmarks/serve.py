"""Serving many users at once: N concurrent streams through the native scheduler vs transformers, one run.

    python -m benchmarks.serve                                         # CPU: GPT-2-124M shape, app-default sampling
    python -m benchmarks.serve --model smollm2 --streams 1,8 --prompt-tokens 64 --new-tokens 64
    python -m benchmarks.serve --device cuda --dtype bf16 --prompt-tokens 400 --new-tokens 300 --json
    python -m benchmarks.serve --temperature 0 --streams 1,8          # greedy: are replies unchanged by batching?

For each N in `--streams`, N threads start together, each sending one request (its own prompt of
`--prompt-tokens` random ids and its own seed) and reading `--new-tokens` ids (no stop id), first through
the native engine (gpt/scheduler.py: one batched decode loop), then through transformers `generate`
on the same weights (`--hf-mode threads`: one generate per thread, as the HF backend serves sessions;
`serial`: one after another). Printed per backend and N: aggregate tok/s (all ids / wall time), median
per-stream decode tok/s, median time to first token, p50/p95 inter-token latency, errors, and the
aggregate's ratio to N = 1. Before the timed runs, every stream's request runs once alone through the
native engine: "same" counts the streams whose batched reply equals its reply alone (floating-point
batching can change a near-tie; with --temperature 0 this is the greedy-unchanged check). A warm-up pass
(not timed) records the CUDA graphs. `--repeats R` times R interleaved rounds and reports the median
round per N with the spread (one stream is one request: a single round is noisy). `--json` makes the last
line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from benchmarks.decode import SHAPE_124M, build_models, prompt_ids
from benchmarks.measure import add_device_args, device_dtype_and_weights, hardware_name, synchronize
from gpt.engine import Engine
from gpt.quantize import apply_weight_format
from gpt.sampling import SamplingParams


@dataclass
class Stream:
    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each id reached the reader
    start: float = 0.0
    error: str | None = None


@dataclass
class Result:
    backend: str
    n: int
    streams: list[Stream]
    wall_s: float

    def summary(self) -> dict:
        ok = [s for s in self.streams if s.error is None and s.times]
        gaps = [b - a for s in ok for a, b in zip(s.times, s.times[1:], strict=False)]
        rates = [(len(s.times) - 1) / (s.times[-1] - s.times[0]) for s in ok if len(s.times) > 1]
        return {"backend": self.backend, "streams": self.n,
                "agg_tok_s": sum(len(s.ids) for s in ok) / self.wall_s,
                "stream_tok_s": statistics.median(rates) if rates else float("nan"),
                "ttft_s": statistics.median([s.times[0] - s.start for s in ok]) if ok else float("nan"),
                "itl_p50_ms": 1e3 * _quantile(gaps, 0.50), "itl_p95_ms": 1e3 * _quantile(gaps, 0.95),
                "errors": sum(s.error is not None for s in self.streams),
                "first_error": next((s.error for s in self.streams if s.error), None)}


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_streams(name: str, n: int, one, serial: bool = False) -> Result:
    """Start n readers at once (or one after another); `one(i, stream)` fills stream i."""
    streams = [Stream() for _ in range(n)]

    def read(i):
        streams[i].start = time.perf_counter()
        try:
            one(i, streams[i])
        except Exception as exc:  # noqa: BLE001 - counted and shown, the other streams go on
            streams[i].error = repr(exc)[:300]

    t0 = time.perf_counter()
    if serial:
        for i in range(n):
            read(i)
    else:
        threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return Result(name, n, streams, time.perf_counter() - t0)


def native_reader(engine: Engine, prompts, new_tokens: int, params: SamplingParams):
    def one(i, stream: Stream):
        for token in engine.generate(prompts[i], new_tokens, params, seed=1000 + i):
            stream.times.append(time.perf_counter())
            stream.ids.append(token)
    return one


def hf_reader(model, prompts, new_tokens: int, params: SamplingParams):
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    sample = params.temperature > 0
    config = GenerationConfig(do_sample=sample, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=0, repetition_penalty=params.repetition_penalty,
                              temperature=params.temperature if sample else None,
                              top_k=params.top_k if sample else None, top_p=params.top_p if sample else None)
    device = next(model.parameters()).device

    def one(i, stream: Stream):
        class Clock(BaseStreamer):
            def __init__(self):
                self.calls = 0

            def put(self, value):  # first call: the prompt; then each new id, already on the CPU
                self.calls += 1
                if self.calls > 1:
                    stream.times.append(time.perf_counter())
                    stream.ids.extend(value.view(-1).tolist())

            def end(self):
                pass

        ids = torch.tensor([prompts[i]], device=device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=Clock())
    return one


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("gpt2-shape", "smollm2"), default="gpt2-shape",
                   help="gpt2-shape: seeded random GPT-2-124M-shaped weights (no tokenizer needed); "
                        "smollm2: the converted bundled model")
    add_device_args(p)
    p.add_argument("--streams", default="1,2,4,8,16", help="comma-separated numbers of concurrent streams")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128, help="ids each stream reads (no stop id)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--hf-mode", choices=("threads", "serial", "off"), default="threads",
                   help="transformers: one generate per thread, one after another, or not at all")
    p.add_argument("--hf-streams", help="the N to run transformers at (default: the same as --streams)")
    p.add_argument("--weights", default="auto", choices=("auto", "int8", "bf16", "fp32"),
                   help="native weight format (gpt/quantize.py); auto: what the app serves (int8 on CPU)")
    p.add_argument("--capacity", type=int, help="native: requests decoded at once (default: 16 CUDA, 8 CPU)")
    p.add_argument("--nondeterministic", action="store_true",
                   help="CUDA: let the engine use cuDNN attention (faster at batch 1; seeds stop reproducing)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed rounds over all N (interleaved); a row is the round with the median aggregate, "
                        "and its spread over the rounds is printed")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n-layer", type=int, default=12, help="gpt2-shape: layers (smaller for smoke tests)")
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    try:
        args.streams = sorted({int(x) for x in args.streams.split(",")})
        args.hf_streams = sorted({int(x) for x in args.hf_streams.split(",")}) if args.hf_streams else args.streams
    except ValueError:
        p.error("--streams and --hf-streams take comma-separated whole numbers, e.g. 1,2,4,8")
    if min(args.streams) < 1 or args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeats < 1:
        p.error("--streams must be >= 1, --prompt-tokens >= 1, --new-tokens >= 2 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device, dtype, weights, native_dtype = device_dtype_and_weights(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    native, hf, _ = build_models("smollm2" if args.model == "smollm2" else "gpt2-124m", device, dtype, args.seed, shape)
    native = apply_weight_format(native.to(native_dtype), weights)  # transformers keeps the unquantised weights
    if args.prompt_tokens + args.new_tokens > native.config.block_size:
        print(f"error: --prompt-tokens + --new-tokens must fit the context of {native.config.block_size} tokens",
              file=sys.stderr)
        return 2
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty)
    n_max = max(args.streams)
    prompts = [prompt_ids(native.config.vocab_size, args.prompt_tokens, args.seed + i) for i in range(n_max)]
    engine = Engine(native, capacity=args.capacity, deterministic=not args.nondeterministic)
    native_one = native_reader(engine, prompts, args.new_tokens, params)

    for n in args.streams:  # warm-up, not timed: allocations, kernels, every bucket's CUDA graphs
        run_streams("native", n, native_one)
    alone = [run_streams("native", 1, lambda _, s, i=i: native_one(i, s)).streams[0].ids for i in range(n_max)]

    rounds: dict[tuple[str, int], list[Result]] = {}
    hf_one = hf_reader(hf, prompts, args.new_tokens, params) if args.hf_mode != "off" else None
    if hf_one is not None:
        run_streams("hf", 1, hf_one)  # warm-up
    for _ in range(args.repeats):  # rounds interleaved, so that a noisy spell hits every N alike
        for n in args.streams:
            new = [run_streams("native", n, native_one)]
            if hf_one is not None and n in args.hf_streams:
                new.append(run_streams(f"hf-{args.hf_mode}", n, hf_one, serial=args.hf_mode == "serial"))
            synchronize(device)
            for r in new:
                rounds.setdefault((r.backend, n), []).append(r)
            print(f"N={n}: " + ", ".join(f"{r.backend} {r.summary()['agg_tok_s']:.1f} tok/s" for r in new),
                  flush=True)  # progress on long runs

    rows = []
    for (backend, _), runs in rounds.items():
        summaries = [r.summary() for r in runs]
        order = sorted(range(len(runs)), key=lambda i: summaries[i]["agg_tok_s"])
        row = summaries[order[len(order) // 2]]  # the median round (the upper one of an even count)
        row["agg_tok_s_rounds"] = [x["agg_tok_s"] for x in summaries]
        if backend == "native":
            row["same_as_alone"] = sum(s.ids == alone[i] for r in runs for i, s in enumerate(r.streams))
            row["same_of"] = sum(len(r.streams) for r in runs)
        rows.append(row)
    rows.sort(key=lambda x: (x["backend"] != "native", x["backend"], x["streams"]))
    for row in rows:
        base = next(x for x in rows if x["backend"] == row["backend"] and x["streams"] == min(args.streams))
        row["vs_one"] = row["agg_tok_s"] / base["agg_tok_s"]
    model_name = args.model if args.model == "smollm2" or shape == SHAPE_124M else \
        f"gpt2-{args.n_layer}x{args.n_embd}"
    report = {"model": model_name, "device": device.type, "hardware": hardware_name(device),
              "dtype": str(dtype).replace("torch.", ""), "weights": weights or str(native_dtype).replace("torch.", ""),
              "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "sampling": asdict(params),
              "capacity": engine.capacity, "cuda_graphs": engine.scheduler.graphs,
              "deterministic": not args.nondeterministic, "torch": torch.__version__, "repeats": args.repeats,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    engine.scheduler.close()  # let its thread end before the interpreter does
    engine.scheduler.thread.join(timeout=10)
    print_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


def print_report(report: dict) -> None:
    print(f"{report['model']} on {report['hardware']} ({report['device']}, {report['dtype']}, {report['weights']} weights), "
          f"{report['prompt_tokens']}-token prompts + {report['new_tokens']} new tokens per stream, "
          f"sampling {report['sampling']}, native capacity {report['capacity']}, "
          f"CUDA graphs {report['cuda_graphs']}")
    print(f"{'backend':<12} {'N':>3} {'agg tok/s':>10} {'x N=1':>6} {'stream tok/s':>12} {'TTFT s':>7} "
          f"{'ITL p50 ms':>10} {'p95 ms':>7} {'errors':>6} {'same':>5}")
    for r in report["rows"]:
        same = f"{r['same_as_alone']}/{r['same_of']}" if "same_as_alone" in r else "-"
        spread = r.get("agg_tok_s_rounds", [])
        spread = f"  (rounds {min(spread):.1f}-{max(spread):.1f})" if len(spread) > 1 else ""
        print(f"{r['backend']:<12} {r['streams']:>3} {r['agg_tok_s']:>10.1f} {r['vs_one']:>6.2f} "
              f"{r['stream_tok_s']:>12.1f} {r['ttft_s']:>7.3f} {r['itl_p50_ms']:>10.2f} {r['itl_p95_ms']:>7.2f} "
              f"{r['errors']:>6} {same:>5}{spread}")
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")


if __name__ == "__main__":
    sys.exit(main())
