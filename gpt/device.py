"""Device and dtype choice: CUDA, then MPS, then CPU, unless the user names one."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a part of the GPU's name: what MFU is measured against.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def pick_device(name: str | None = None) -> torch.device:
    """`None` or "auto" picks the best available; otherwise the named device, if it exists here."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps (got {name!r})") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps (got {name!r})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1} or auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} was asked for but MPS is not available here; use cpu or auto")
    return device


def pick_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 / bf16 / fp16; `None` or "auto" is fp32 on CPU and bf16 on CUDA where supported."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "", "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, fp32, bf16, fp16 (got {name!r})")
    if DTYPES[name] == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use fp16 or fp32")
    return DTYPES[name]


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of a CUDA device (PEAK_FLOPS), or None where it is not known (CPU, MPS, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
