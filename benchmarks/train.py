"""Fine-tuning throughput: tokens/s and MFU of the native training step (forward, backward, AdamW).

    python -m benchmarks.train                                    # CPU: a small GPT-2-style model, block 256
    python -m benchmarks.train --device cuda --compile --json     # GPU: GPT-2-124M shape, block 1024, bf16

The step is the one training uses: `GPT.forward` with targets (cross-entropy in fp32), backward,
gradient clipping at 1.0 and `GPT.configure_optimizers` (AdamW, fused on CUDA), under bf16 autocast on
CUDA (`--dtype fp32` turns autocast off). Batches are seeded random token ids: the speed of a step does
not depend on the text. MFU uses `GPT.estimate_mfu` (6N + 12·L·H·Q·T FLOPs per token, PaLM appendix B)
against the GPU's dense bf16 peak (`--peak-tflops` for other hardware); on CPU it is left out unless
`--peak-tflops` is given. `--json` makes the last line one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from benchmarks.measure import (
    PeakMemory,
    add_device_args,
    device_and_dtype,
    hardware_name,
    median,
    synchronize,
)
from gpt.device import peak_flops
from gpt.model import GPT, GPTConfig


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    add_device_args(p, "bf16 (autocast) or fp32; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--n-layer", type=int, help="layers (default: 12 on CUDA, 4 on CPU)")
    p.add_argument("--n-head", type=int, help="attention heads (default: 12 on CUDA, 4 on CPU)")
    p.add_argument("--n-embd", type=int, help="width (default: 768 on CUDA, 256 on CPU)")
    p.add_argument("--vocab-size", type=int, default=50257, help="vocabulary (50304 = GPT-2's padded to 64)")
    p.add_argument("--block", type=int, help="sequence length (default: 1024 on CUDA, 256 on CPU)")
    p.add_argument("--batch", type=int, help="sequences per step (default: 16 on CUDA, 4 on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s of this hardware in TFLOP/s, for the MFU")
    p.add_argument("--seed", type=int, default=1234, help="seed for the weights and the batches")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device, dtype = device_and_dtype(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dtype == torch.float16:
        print("error: --dtype fp16 needs a loss scaler this benchmark does not use; pick bf16 or fp32", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    n_layer = args.n_layer or (12 if gpu else 4)
    n_head = args.n_head or (12 if gpu else 4)
    n_embd = args.n_embd or (768 if gpu else 256)
    block = args.block or (1024 if gpu else 256)
    batch = args.batch or (16 if gpu else 4)
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left on CUDA
    model = GPT(GPTConfig(vocab_size=args.vocab_size, block_size=block, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd)).to(device).train()
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type=device.type)
    forward = torch.compile(model) if args.compile else model
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, args.vocab_size, (batch, block + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]

    def step() -> float:
        with autocast:
            _, loss = forward(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    times, losses = [], []
    with PeakMemory(device) as mem:
        for _ in range(args.steps):
            synchronize(device)
            t = time.perf_counter()
            losses.append(step())
            synchronize(device)
            times.append(time.perf_counter() - t)
    dt = median(times)
    tokens = batch * block
    known = peak_flops(device)  # None off CUDA or for a GPU without a listed peak
    peak = args.peak_tflops or (known / 1e12 if known else None)
    result = {
        "device": device.type, "hardware": hardware_name(device), "dtype": str(dtype).replace("torch.", ""),
        "compile": args.compile, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
        "vocab_size": args.vocab_size, "params_m": model.get_num_params() / 1e6, "block": block, "batch": batch,
        "steps": args.steps, "step_s": dt, "tokens_per_s": tokens / dt, "warmup_s": warmup_s,
        "peak_tflops": peak, "mfu": model.estimate_mfu(tokens, dt, peak * 1e12) if peak else None,
        "peak_mem_mb": mem.peak_bytes / 2**20, "final_loss": float(losses[-1]), "torch": torch.__version__,
    }
    print(f"training step, {result['params_m']:.1f}M params ({n_layer} layers, width {n_embd}), "
          f"batch {batch} x block {block}, {result['dtype']}{' compiled' if args.compile else ''}, "
          f"on {result['hardware']}")
    mfu = f"{100 * result['mfu']:.1f}% of {peak:.0f} TFLOP/s" if result["mfu"] is not None else "n/a (no peak known)"
    print(f"step {dt * 1e3:.1f} ms (median of {args.steps})  {result['tokens_per_s']:,.0f} tokens/s  MFU {mfu}  "
          f"loss {result['final_loss']:.3f}  warm-up {warmup_s:.1f} s")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
