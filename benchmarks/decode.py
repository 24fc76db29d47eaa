"""Decode speed, side by side: the native engine against transformers `generate` on the same weights.

    python -m benchmarks.decode                                  # CPU fp32, GPT-2-124M shape, 512 + 128 tokens
    python -m benchmarks.decode --dtype bf16                     # the bf16 path on CPU
    python -m benchmarks.decode --device cuda --dtype bf16 --json
    python -m benchmarks.decode --model smollm2                  # the converted bundled SmolLM2 vs transformers
    python -m benchmarks.decode --model smollm2 --weights int8   # native int8 / bf16 / fp32 weights vs transformers fp32

Both backends run in one process, alternating (the order flips every repeat), batch 1, greedy, with no
stop token on either side, so both always generate exactly `--new-tokens` ids. Per backend it prints decode
tokens/s (after the first token), time to first token (prefill + first pick), peak memory the run adds
(RSS on CPU, the CUDA allocator's peak on GPU), and each as a share of the memory-bandwidth roofline:
measured copy bandwidth / weight bytes = tokens/s if each token had to read every weight once and nothing
else. Prefill speed is the prompt's tokens over the time to first token.

`--weights` picks the native engine's weight format (gpt/quantize.py; default `auto`, what the native
backend serves: int8 on CPU unless `--dtype` is given); transformers stays in `--dtype` (fp32 on CPU).
`ppl_ratio` is the native model's perplexity in that format over its own fp32 perplexity on a fixed
shipped text (benchmarks/data/ppl_text.txt, windows of 512 tokens; int8's long products round as its
decoding kernel does, so this is the arithmetic decoding uses). `--json` makes the last line one JSON object. transformers runs with its default (dynamic) cache; on
CUDA also with its static cache, which `generate` compiles with torch.compile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.measure import (
    PeakMemory,
    add_device_args,
    copy_bandwidth,
    device_dtype_and_weights,
    hardware_name,
    median,
    weight_bytes,
)
from gpt.engine import Engine
from gpt.model import GPT, GPTConfig
from gpt.quantize import INT8_BF16_MODULES, apply_weight_format
from gpt.sampling import SamplingParams

SMOLLM2_CHECKPOINT = Path("models/native/smollm2-135m-instruct")
PPL_TEXT = Path(__file__).parent / "data" / "ppl_text.txt"
PPL_WINDOW = 512
FORMAT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SHAPE_124M = dict(n_layer=12, n_head=12, n_embd=768)


@dataclass
class Run:
    ids: list[int]
    ttft_s: float
    tok_s: float
    peak_bytes: int


@dataclass
class Series:
    """Every repeat of one backend."""

    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return median([r.tok_s for r in self.runs])

    @property
    def ttft_s(self) -> float:
        return median([r.ttft_s for r in self.runs])

    @property
    def peak_mb(self) -> float:
        return max(r.peak_bytes for r in self.runs) / 2**20

    @property
    def ids(self) -> list[int]:
        return self.runs[0].ids


def build_models(name: str, device: torch.device, dtype: torch.dtype, seed: int, shape: dict | None = None):
    """(native GPT, transformers model, tokenizer or None) holding the same weights, in eval mode on `device`."""
    if name == "gpt2-124m":
        from gpt.convert import gpt2_to_hf_model

        torch.manual_seed(seed)
        native = GPT(GPTConfig(**(shape or {})))  # GPT-2-124M shape, GPT-2's init: random, realistic magnitudes
        hf = gpt2_to_hf_model(native)
        tokenizer = None
    else:
        from gpt.checkpoint import load_checkpoint
        from gpt.convert_llama import llama_to_hf_model

        if not (SMOLLM2_CHECKPOINT / "model.safetensors").is_file():
            raise SystemExit(f"error: {SMOLLM2_CHECKPOINT} is missing; run `make setup` to convert the bundled SmolLM2.")
        native, tokenizer, _ = load_checkpoint(str(SMOLLM2_CHECKPOINT))
        hf = llama_to_hf_model(native)
    native = native.to(device=device, dtype=dtype).eval()
    hf = hf.to(device=device, dtype=dtype).eval()
    return native, hf, tokenizer


def ppl_ids(tokenizer) -> list[int]:
    """The shipped text's ids (GPT-2's BPE for the random GPT-2 shape: perplexity is still comparable)."""
    if tokenizer is None:
        from gpt.tokenizer import GPT2Tokenizer

        tokenizer = GPT2Tokenizer()
    return tokenizer.encode(PPL_TEXT.read_text(encoding="utf-8"))


@torch.inference_mode()
def perplexity(model: GPT, ids: list[int], window: int = PPL_WINDOW) -> float:
    """exp(mean next-token cross-entropy) over `ids`, scored in consecutive windows of `window` tokens."""
    device = model.transformer.wte.weight.device
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window + 1]], device=device)
        if chunk.shape[1] < 2:
            break
        _, loss = model(chunk[:, :-1], targets=chunk[:, 1:])
        total += loss.item() * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two greedy runs share (where int8 or bf16 first picks another token)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_ids(vocab_size: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


def run_native(engine: Engine, prompt: list[int], new_tokens: int) -> Run:
    device = engine.device
    with PeakMemory(device) as mem:
        ids: list[int] = []
        t0 = time.perf_counter()
        t_first = t_last = t0
        for token in engine.generate(prompt, new_tokens, SamplingParams(temperature=0.0), stop_ids=()):
            t_last = time.perf_counter()  # the engine yields a Python int: the step has finished on the device
            if not ids:
                t_first = t_last
            ids.append(token)
    return Run(ids, t_first - t0, (len(ids) - 1) / max(t_last - t_first, 1e-9), mem.peak_bytes)


def run_hf(model, prompt: list[int], new_tokens: int, cache: str) -> Run:
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """`generate` calls put() with the prompt, then with each new token (moved to the CPU: synchronised)."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=None,
                              eos_token_id=None, pad_token_id=0,  # no stop: always `new_tokens` ids
                              cache_implementation="static" if cache == "static" else None)
    input_ids = torch.tensor([prompt], device=device)
    clock = Clock()
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                             streamer=clock)
    ids = out[0, len(prompt):].tolist()
    t_first, t_last = clock.times[1], clock.times[-1]
    return Run(ids, t_first - t0, (len(ids) - 1) / max(t_last - t_first, 1e-9), mem.peak_bytes)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("gpt2-124m", "smollm2"), default="gpt2-124m",
                   help="gpt2-124m: seeded random GPT-2-124M-shaped weights; smollm2: the converted bundled model")
    add_device_args(p)
    p.add_argument("--weights", default="auto", choices=("auto", "int8", "bf16", "fp32"),
                   help="native weight format (transformers stays in --dtype); auto: int8 on CPU unless --dtype "
                        "is given, else --dtype's own")
    p.add_argument("--no-ppl", action="store_true", help="skip the perplexity comparison (ppl_ratio)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens to generate per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per backend (alternating); medians reported")
    p.add_argument("--no-fast", action="store_true",
                   help="run the engine's decode steps eagerly (no CUDA graphs) even on CUDA")
    p.add_argument("--no-hf-static", action="store_true", help="on CUDA, skip transformers' static cache + compile")
    p.add_argument("--seed", type=int, default=1234, help="seed for the random weights and the prompt")
    p.add_argument("--n-layer", type=int, default=12, help="gpt2-124m: layers (smaller for smoke tests)")
    p.add_argument("--n-head", type=int, default=12, help="gpt2-124m: attention heads")
    p.add_argument("--n-embd", type=int, default=768, help="gpt2-124m: width")
    p.add_argument("--bandwidth-mib", type=int, help="copy-bandwidth buffer (default 512 MiB on CPU, 2 GiB on CUDA)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeats < 1:
        p.error("--prompt-tokens must be >= 1, --new-tokens >= 2 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device, dtype, weights, native_dtype = device_dtype_and_weights(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    native, hf, tokenizer = build_models(args.model, device, dtype, args.seed, shape)
    context = native.config.block_size
    if args.prompt_tokens + args.new_tokens > context:
        print(f"error: --prompt-tokens + --new-tokens must fit the context of {context} tokens", file=sys.stderr)
        return 2
    ppl = {}
    if not args.no_ppl:
        text_ids = ppl_ids(tokenizer)
        ppl["fp32"] = perplexity(native.float(), text_ids)
    native = apply_weight_format(native.to(native_dtype), weights)
    if not args.no_ppl:
        ppl["native"] = perplexity(native, text_ids)
    engine = Engine(native, graphs=not args.no_fast and device.type == "cuda")
    prompt = prompt_ids(native.config.vocab_size, args.prompt_tokens, args.seed)

    runners = {"native": lambda n: run_native(engine, prompt, n), "hf": lambda n: run_hf(hf, prompt, n, "dynamic")}
    if device.type == "cuda" and not args.no_hf_static:
        runners["hf_static"] = lambda n: run_hf(hf, prompt, n, "static")
    # Warm-up (not timed): kernels, graphs and compiled code. CUDA runs the full length so that shape-keyed
    # compiled code (transformers' static cache) is built for the timed shape; CPU needs only a short run.
    warm_tokens = args.new_tokens if device.type == "cuda" else min(args.new_tokens, 8)
    for run in runners.values():
        run(warm_tokens)
    series = {name: Series(name) for name in runners}
    for r in range(args.repeats):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            series[name].runs.append(runners[name](args.new_tokens))

    bandwidth = copy_bandwidth(device, args.bandwidth_mib << 20 if args.bandwidth_mib else None)
    wbytes = weight_bytes(native)
    roofline = bandwidth / wbytes
    result = {
        "model": args.model if args.model != "gpt2-124m" or shape == SHAPE_124M else f"gpt2-{args.n_layer}x{args.n_embd}",
        "device": device.type, "hardware": hardware_name(device),
        "dtype": str(dtype).replace("torch.", ""), "weights": weights or FORMAT_NAMES[native_dtype],
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "bf16_products": list(INT8_BF16_MODULES) if weights == "int8" else [],  # int8's products kept in bf16
        "native_fast_path": engine.scheduler.graphs, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_average": _load_average(),
        "copy_gb_s": bandwidth / 1e9, "weight_mb": wbytes / 2**20, "roofline_tok_s": roofline,
    }
    for name, s in series.items():
        result[f"{name}_tok_s"] = s.tok_s
        result[f"{name}_ttft_s"] = s.ttft_s
        result[f"{name}_prefill_tok_s"] = args.prompt_tokens / s.ttft_s
        result[f"{name}_peak_mb"] = s.peak_mb
        result[f"{name}_roofline_pct"] = 100 * s.tok_s / roofline
    result["ratio"] = series["native"].tok_s / series["hf"].tok_s
    result["identical"] = series["native"].ids == series["hf"].ids
    result["matching_prefix"] = matching_prefix(series["native"].ids, series["hf"].ids)
    if ppl:
        result.update(ppl_fp32=ppl["fp32"], ppl=ppl["native"], ppl_ratio=ppl["native"] / ppl["fp32"],
                      ppl_tokens=len(text_ids))
    result["native_deterministic"] = all(r.ids == series["native"].ids for r in series["native"].runs)
    if "hf_static" in series:
        result["ratio_vs_hf_static"] = series["native"].tok_s / series["hf_static"].tok_s
        result["identical_hf_static"] = series["native"].ids == series["hf_static"].ids
    print_report(result, series)
    if args.json:
        print(json.dumps(result))
    return 0


def _load_average() -> float | None:
    """The 1-minute load average when the run ended (a busy machine slows the 2-thread kernels most)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def print_report(result: dict, series: dict[str, Series]) -> None:
    print(f"{result['model']} on {result['hardware']} ({result['device']}, transformers {result['dtype']}, "
          f"native {result['weights']} weights), "
          f"{result['prompt_tokens']}-token prompt + {result['new_tokens']} greedy tokens, batch 1, "
          f"median of {result['repeats']}")
    if result["bf16_products"]:
        print(f"int8 keeps these products in bf16: {', '.join(result['bf16_products'])}")
    print(f"roofline: {result['copy_gb_s']:.1f} GB/s copy / {result['weight_mb']:.0f} MiB weights "
          f"= {result['roofline_tok_s']:.0f} tok/s")
    print(f"{'backend':<10} {'decode tok/s':>12} {'% roofline':>10} {'TTFT s':>8} {'prefill tok/s':>13} "
          f"{'peak MiB':>9}")
    for name, s in series.items():
        print(f"{name:<10} {s.tok_s:>12.1f} {result[f'{name}_roofline_pct']:>10.1f} {s.ttft_s:>8.3f} "
              f"{result[f'{name}_prefill_tok_s']:>13.0f} {s.peak_mb:>9.1f}")
    line = (f"native/hf: {result['ratio']:.2f}x   identical ids: {result['identical']} "
            f"(first {result['matching_prefix']} of {result['new_tokens']} equal)")
    if "ratio_vs_hf_static" in result:
        line += (f"   native/hf_static: {result['ratio_vs_hf_static']:.2f}x   "
                 f"identical to hf_static: {result['identical_hf_static']}")
    print(line)
    if "ppl_ratio" in result:
        print(f"perplexity on {result['ppl_tokens']} tokens of {PPL_TEXT.name}: native fp32 {result['ppl_fp32']:.3f}, "
              f"{result['weights']} {result['ppl']:.3f}, ratio {result['ppl_ratio']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
