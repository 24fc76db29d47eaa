"""Where a native decode step spends its time: a torch.profiler table of one token's kernels / ops.

    python -m benchmarks.profile_decode                          # CPU fp32, GPT-2-124M shape
    python -m benchmarks.profile_decode --device cuda --dtype bf16 [--compile]

It prefills a `--prompt-tokens` prompt, then profiles `--steps` single-token steps through the engine's
decode paths: the plain path (`GPT.forward` with a KVCache) on CPU, the static-cache step
(gpt/fast_decode.py, run eagerly so that each kernel shows) on CUDA. It prints the ops sorted by time
per step, and each step's total, which is what docs/benchmarks.md quotes as "what bounds it".
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gpt.device import pick_device, pick_dtype
from gpt.fast_decode import StaticDecoder
from gpt.model import GPT, GPTConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--dtype", default="auto", help="fp32, bf16 or fp16; auto: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length before the profiled steps")
    p.add_argument("--steps", type=int, default=20, help="profiled decode steps")
    p.add_argument("--compile", action="store_true", help="CUDA: profile the torch.compile'd static step")
    p.add_argument("--rows", type=int, default=25, help="rows of the table")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, 50257, (args.prompt_tokens,)).tolist()
    token = torch.tensor([5], device=device)
    with torch.inference_mode():
        if device.type == "cuda":
            decoder = StaticDecoder(model, graphs=False, compile=args.compile)
            decoder.prefill(prompt)

            def step():
                decoder.step(token)
        else:
            cache = model.new_cache(1, args.prompt_tokens + args.steps + 8)
            model(torch.tensor([prompt]), cache=cache, last_only=True)

            def step():
                model(token.view(1, 1), cache=cache)
        for _ in range(3):  # warm-up (and compilation)
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not the aten ops
        kernel_us = sum(e.self_device_time_total for e in kernels) / args.steps
        n_kernels = sum(e.count for e in kernels) / args.steps
        print(f"per step: {kernel_us:.0f} us of GPU kernels in ~{n_kernels:.0f} kernels")
    else:
        print(f"per step: {sum(e.self_cpu_time_total for e in events) / args.steps / 1e3:.1f} ms of CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
