"""Measuring tools the benchmarks share: copy bandwidth, peak memory of a run, weight bytes, CPU/GPU names.

Not a benchmark itself; `benchmarks.decode`, `benchmarks.serve` and `benchmarks.train` import it, also for
their shared --device / --dtype flags (`add_device_args`, `device_and_dtype`).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time

import torch

from gpt.device import pick_device, pick_dtype
from gpt.quantize import resolve_weight_format

DTYPE_HELP = "fp32, bf16 or fp16; auto: fp32 on CPU, bf16 on CUDA"


def add_device_args(parser, dtype_help: str = DTYPE_HELP) -> None:
    """The --device and --dtype flags every benchmark takes."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (the best available)")
    parser.add_argument("--dtype", default="auto", help=dtype_help)


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """The device and dtype those flags name; ValueError says which value is wrong."""
    device = pick_device(args.device)
    return device, pick_dtype(args.dtype, device)


def device_dtype_and_weights(args) -> tuple[torch.device, torch.dtype, str | None, torch.dtype]:
    """Also `--weights`: (device, dtype, weight format to apply to the native model, dtype to load it in)."""
    device, dtype = device_and_dtype(args)
    weights, native_dtype = resolve_weight_format(args.weights, device, args.dtype)
    return device, dtype, weights, native_dtype


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy, counting bytes read and written (best of `repeats`).

    The buffer is larger than the last-level cache (CPU: 512 MiB; CUDA: 2 GiB), so this is main-memory
    bandwidth: the ceiling for batch-1 decoding, which streams every weight once per token.
    """
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 512 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults and allocator warm-up stay out of the timing
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one batch-1 decoding step reads: the distinct parameters and buffers (int8 weights
    and their scales are buffers; a tied embedding and head count once). An embedding table that is not
    also a head is only looked up, one row per token, so it does not count."""
    looked_up = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    read = {id(t) for m in model.modules() if not isinstance(m, torch.nn.Embedding)
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen and (id(t) in read or id(t) not in looked_up):
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak RSS so far is the best that is portable
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory a block adds: RSS sampled every 5 ms on CPU, the allocator's peak on CUDA.

        with PeakMemory(device) as mem:
            run()
        mem.peak_bytes   # above what was in use when the block started
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss_bytes()) - self._base


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"
