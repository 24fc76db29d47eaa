"""One product at a time, side by side: the AVX2 int8/bf16 kernel (gpt/cpu_int8.py) against PyTorch's ops.

    OMP_NUM_THREADS=2 python -m benchmarks.int8_kernel                 # SmolLM2-135M's shapes, M = 1 and 8
    OMP_NUM_THREADS=2 python -m benchmarks.int8_kernel --rows 1,4,16 --repeats 9 --json

For each weight shape (N outputs x K inputs) and each number of activation rows M it times, alternating in
one process: fp32 `F.linear`, fp32 on the oneDNN-packed weight (gpt/packed_linear.py, what the batched CPU
engine runs), bf16 `F.linear`, PyTorch's `_weight_int8pack_mm` (bf16 activations), and the kernel with int8
(one scale per INT8_GROUP inputs, as served) and with bf16 weights. It prints the median time per
product, its effective weight bandwidth (weight bytes / time) and each time's ratio to fp32 `F.linear`. At one thread (OMP_NUM_THREADS=1) the time is the thread's
CPU time, so that on a shared, loaded machine the figures leave out the time other processes held the core.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.measure import median
from gpt import cpu_int8
from gpt.quantize import INT8_GROUP, quantize_groups, quantize_rows

SHAPES = {"attn.c_attn": (960, 576), "attn.c_proj": (576, 576), "mlp.c_fc": (3072, 576),
          "mlp.c_proj": (576, 1536), "lm_head": (49152, 576)}


def clock():
    """CPU time of this thread at one thread (a loaded box's preemptions do not count), else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def timed(fn, inner: int) -> float:
    now = clock()
    t0 = now()
    for _ in range(inner):
        fn()
    return (now() - t0) / inner


def bench_shape(n: int, k: int, m: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g)
    q, scale = quantize_rows(w)  # one bf16 scale per row: what _weight_int8pack_mm takes
    qg, scale_g = quantize_groups(w, INT8_GROUP)  # what Int8Linear serves where the kernel runs
    wb = w.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    fns = {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb),
           "int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(xb, q, scale)}
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        fns["fp32 packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if cpu_int8.available():
        fns["kernel int8"] = lambda: cpu_int8.wlinear(x, qg, scale_g)
        fns["kernel bf16"] = lambda: cpu_int8.wlinear(x, wb)
    inner = max(1, int(2e7 // (n * k)))  # ~20M weights per timing: long enough to time, short on 2 cores
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for r in range(repeats):
            order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
            for name, fn in order:
                times[name].append(timed(fn, inner))
    return {name: median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8", help="comma-separated activation row counts M")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", action="store_true", help="last line: one JSON object with every figure")
    args = p.parse_args(argv)
    print(f"threads {torch.get_num_threads()}, clock {clock().__name__}, kernel {'built' if cpu_int8.available() else 'UNAVAILABLE'}")
    bytes_per = {"fp32": 4, "fp32 packed": 4, "bf16": 2, "int8pack_mm": 1, "kernel int8": 1, "kernel bf16": 2}
    out = []
    for m in (int(v) for v in args.rows.split(",")):
        for name, (n, k) in SHAPES.items():
            t = bench_shape(n, k, m, args.repeats)
            print(f"\nM={m} {name} {n}x{k}")
            for op, s in t.items():
                gbs = n * k * bytes_per[op] / s / 1e9
                print(f"  {op:12s} {s * 1e6:9.1f} us  {gbs:6.1f} GB/s  x{t['fp32'] / s:5.2f} vs fp32")
            out.append({"rows": m, "product": name, "shape": [n, k], "us": {op: s * 1e6 for op, s in t.items()}})
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "results": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
