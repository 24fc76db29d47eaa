"""The AVX2 weight-only linear kernel (csrc/cpu_int8_linear.cpp), compiled on first use and cached.

    from gpt import cpu_int8
    if cpu_int8.available():                                   # compiles once (~1 min), then loads from cache
        y = cpu_int8.wlinear(x, qweight, scale, bias)          # x (M, K) fp32; qweight (N, K) int8 or bf16
        h = cpu_int8.rms_norm(x, norm_weight, eps)             # RMSNorm in one op (decode steps: gpt/quantize.py)

`y = (x @ w.T) * scale + bias` in fp32 with the weight widened in registers (gpt/quantize.py's Int8Linear and
Bf16Linear use it for decode-sized inputs on CPU). Why hand-written (measured, docs/benchmarks.md): PyTorch's
`_weight_int8pack_mm` is fast only on AVX-512 CPUs; on AVX2 ones (this 2-core AMD EPYC) it took longer than
an fp32 product. The build goes to `$NANOGPT_EXT_DIR` or ~/.cache/nanogpt-chat/ext/<source hash>, so a
changed source builds anew and an unchanged one loads in well under a second. If the CPU lacks AVX2/FMA or
the compiler fails, `available()` is False, one line is logged, and callers use PyTorch's ops instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_int8_linear.cpp"
_state: dict[str, object] = {}
_lock = threading.Lock()


def cpu_supports_avx2() -> bool:
    """The CPU has AVX2 and FMA (what the kernel is compiled for)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: ask PyTorch what its own kernels dispatch to
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return "avx2" in flags and "fma" in flags


def build_dir() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    root = os.environ.get("NANOGPT_EXT_DIR") or Path.home() / ".cache" / "nanogpt-chat" / "ext"
    return Path(root) / digest


def _load() -> bool:
    if not SOURCE.is_file():
        return _unavailable(f"{SOURCE} is missing")
    if not cpu_supports_avx2():
        return _unavailable("this CPU has no AVX2/FMA")
    try:
        from torch.utils.cpp_extension import load

        where = build_dir()
        where.mkdir(parents=True, exist_ok=True)
        load(name="nanogpt_cpu_int8", sources=[str(SOURCE)], build_directory=str(where),
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        _state["op"] = torch.ops.nanogpt_cpu.wlinear.default  # raises if the library did not register
        _state["rms_norm"] = torch.ops.nanogpt_cpu.rms_norm.default
        _state["decode_attention"] = torch.ops.nanogpt_cpu.decode_attention.default
    except Exception as e:  # noqa: BLE001 - any build failure means: use PyTorch's ops
        return _unavailable(f"building it failed ({type(e).__name__}: {str(e).strip().splitlines()[-1:]})")
    return True


def _unavailable(why: str) -> bool:
    log.warning("int8/bf16 CPU kernel unavailable (%s): using PyTorch's slower ops instead.", why)
    return False


def available() -> bool:
    """The kernel is built and loaded (built on the first call; False, logged once, where it cannot be)."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _load()
    return bool(_state["ok"])


def wlinear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """(x @ weight.T) * scale + bias: x (M, K) fp32 (rows may be strided), weight (N, K) int8 or bf16
    contiguous, scale and bias (N,) fp32 or None. Where `available()` is False, this raises RuntimeError."""
    op = _state.get("op")
    if op is None:
        if not available():
            raise RuntimeError("the int8/bf16 CPU kernel is unavailable (see the log): use PyTorch's ops")
        op = _state["op"]
    return op(x, weight, scale, bias)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA for one query per row: q (B, H, 1, hd), k/v (B, KVH, S, hd), additive mask (B, 1, 1, S), fp32.
    Masked (-inf) positions are never read: a row reads only its own cache (`available()` must be True)."""
    return _state["decode_attention"](q, k, v, mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight in one op (fp32; `available()` must be True)."""
    return _state["rms_norm"](x, weight, eps)
