"""Weight formats for serving a native model: int8 (weight-only, a scale per 32 inputs of a row), bf16, fp32.

    model, tokenizer, meta = load_checkpoint(path)       # full precision, as trained and saved
    apply_weight_format(model, "int8")                   # in place: nn.Linear -> Int8Linear
    check_weight_format("int4")                          # ValueError that names the formats
    fmt, dtype = resolve_weight_format("auto", torch.device("cpu"), None)   # (CPU_DEFAULT, torch.float32)

Checkpoints stay full precision (fine-tuning trains those); a model is quantised when it is loaded for
serving, so a fine-tuned checkpoint is served in the same format as the bundled one.

Why int8 this way (measured on the 2-core AVX2 CPU, docs/benchmarks.md): batch-1 decoding streams every
weight once per token, so a quarter of fp32's bytes is most of the win. Decode-sized products (up to
`MATVEC_MAX_ROWS` rows) run gpt/cpu_int8.py's AVX2 kernel: fp32 activations times the int8 weight widened
in registers, one fp32 scale per `INT8_GROUP` inputs of a row (finer than one per row: that lost two of
the 12 quality answers); only the weights lose precision. Longer inputs (a prompt's prefill) run fp32 GEMM
on the dequantised weight, the same products summed in another order. Without the kernel (no AVX2/FMA, no
compiler: one logged line) int8 takes one bf16 scale per row and PyTorch's `_weight_int8pack_mm` (bf16
activations; fast only on AVX-512 CPUs). `bf16` on CPU stores the products' weights in bf16 the same way
(Bf16Linear). The rest of the model (norms, attention, KV cache, residual stream, embedding lookup) stays
in the model's dtype (fp32 on CPU); RMSNorm runs as the kernel's one op. The tied head gets its own copy;
the embedding table keeps its rows for the lookup, which reads one row per token.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import cpu_int8
from gpt.device import pick_dtype
from gpt.model import CausalSelfAttention, RMSNorm

WEIGHT_FORMATS = ("int8", "bf16", "fp32")
# What `auto` serves on CPU (docs/benchmarks.md, 2026-11-22 round 4): int8, with gpt/cpu_int8.py's kernel
# (fp32 activations, one scale per INT8_GROUP inputs). On the 2-core box, one engine for all sessions:
# 1 stream 50.1 tok/s against fp32's 24.1, 8 concurrent streams 147.6 tok/s against packed fp32's 115.0,
# seeded replies the same alone and batched (8 of 8, as fp32), the 12 quality questions answered as fp32
# does, ppl_ratio 1.0050. Where the kernel cannot be built, `auto` is fp32 (int8 would batch worse).
CPU_DEFAULT = "int8"
# Products the int8 format keeps in bf16 (a module path or its last parts). None since round 4: with one
# scale per 32 inputs every product in int8 answers the 12 quality questions as fp32 does (one scale per
# row: 10 of 12; per 64 inputs: 11 of 12, "2 + 2" a near-tie), so the head and gate|up need no bf16 copy.
INT8_BF16_MODULES: tuple[str, ...] = ()
INT8_GROUP = 32  # inputs per int8 scale where the kernel runs (ppl_ratio 1.0050; per row 1.0105)
MATVEC_MAX_ROWS = 16  # products with more rows upcast the weight and run fp32 GEMM (faster there, see above)


def check_weight_format(weights: str, allow_auto: bool = False) -> str:
    allowed = ("auto", *WEIGHT_FORMATS) if allow_auto else WEIGHT_FORMATS
    if weights not in allowed:
        raise ValueError(f"weights must be one of {', '.join(allowed)} (got {weights!r}): "
                         f"int8 is the fastest on CPU, fp32 the reference.")
    return weights


def resolve_weight_format(weights: str | None, device: torch.device,
                          dtype: str | torch.dtype | None) -> tuple[str | None, torch.dtype]:
    """(format to apply after loading, dtype to load the checkpoint in) for a `weights` option and a `dtype`.

    `auto` (or None) is CPU_DEFAULT on CPU when no dtype is asked for (measured: see its comment and
    docs/benchmarks.md) and otherwise the dtype's own weights (format None: load in `dtype`, nothing more).
    A dtype that contradicts the format is a ValueError.
    """
    weights = check_weight_format(weights or "auto", allow_auto=True)
    asked = dtype not in (None, "", "auto")
    if weights == "auto":
        if device.type == "cpu" and not asked:  # int8 without the kernel batches worse than fp32 (round 3)
            weights = CPU_DEFAULT if CPU_DEFAULT != "int8" or cpu_int8.available() else "fp32"
        else:
            return None, pick_dtype(dtype, device)
    load_dtype = torch.bfloat16 if weights == "bf16" and device.type != "cpu" else torch.float32
    if asked and pick_dtype(dtype, device) != load_dtype:
        raise ValueError(f"weights={weights!r} computes in {str(load_dtype).replace('torch.', '')}, "
                         f"but dtype={dtype!r} was asked for: set only one of them.")
    if weights == "int8" and device.type != "cpu":
        raise ValueError(f"weights='int8' runs on CPU only (asked for {device.type}): use bf16 there.")
    return weights, load_dtype


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (N, K), scale bf16 (N,)) with q * scale ≈ weight.

    The scale is rounded to bf16 (what `_weight_int8pack_mm` takes) before quantising, so q * scale is
    exactly the weight the kernel multiplies by.
    """
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per `group` consecutive inputs of a row: (q (N, K), scale (N, K/group))."""
    w = weight.detach().float()
    n, k = w.shape
    blocks = w.view(n, k // group, group)
    scale = (blocks.abs().amax(dim=2) / 127).clamp(min=1e-12)
    q = torch.round(blocks / scale[:, :, None]).clamp(-127, 127).to(torch.int8).view(n, k)
    return q, scale


class Int8Linear(nn.Module):
    """An nn.Linear with int8 weights; input (..., K) in any leading shape, output in the input's dtype.

    Decode-sized fp32 inputs (up to MATVEC_MAX_ROWS rows) run gpt/cpu_int8.py's AVX2 kernel: fp32
    activations times the int8 weight widened in registers, times the row's scale. Longer inputs (a
    prompt) run fp32 GEMM on the dequantised weight: the same products, summed in another order. Without
    the kernel (no AVX2, no compiler) it is PyTorch's `_weight_int8pack_mm`, with its bf16 rounding.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: int | None = None):
        """`group`: inputs per scale (INT8_GROUP where the kernel runs and divides K; else one per row)."""
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if group is None:
            group = INT8_GROUP if self.in_features % INT8_GROUP == 0 and cpu_int8.available() else self.in_features
        self.group = group
        if group == self.in_features:
            q, scale = quantize_rows(weight)
            scale32 = scale.float()
        else:  # only the kernel takes groups; without it, `forward` multiplies the dequantised weight
            q, scale32 = quantize_groups(weight, group)
            scale = scale32
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale32", scale32, persistent=False)  # what the kernel takes
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias).to(linear.weight.device)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.qweight.shape
        groups = self.scale32.view(n, -1)
        w = self.qweight.to(dtype).view(n, groups.shape[1], -1) * groups.to(dtype)[:, :, None]
        return w.view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if _kernel_takes(rows):
            if rows.shape[0] <= MATVEC_MAX_ROWS:
                y = cpu_int8.wlinear(rows, self.qweight, self.scale32, self.bias)
            else:
                y = F.linear(rows, self.dequantized(), self.bias)
        elif self.group != self.in_features:  # groups, and no kernel here (a model moved to another machine)
            y = F.linear(rows, self.dequantized(rows.dtype), self.bias)
        elif rows.shape[0] <= MATVEC_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.qweight, self.scale).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:  # the kernel's rounding (bf16 activations and output), through fp32 GEMM: prefill = decode
            y = F.linear(rows.to(torch.bfloat16).float(), self.dequantized()).to(torch.bfloat16).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group={self.group}")


def _kernel_takes(rows: torch.Tensor) -> bool:
    """gpt/cpu_int8.py's kernel computes this product (fp32 CPU activations, kernel built)."""
    return rows.dtype == torch.float32 and rows.device.type == "cpu" and cpu_int8.available()


class Bf16Linear(nn.Module):
    """An nn.Linear with bf16 weights in an fp32 model; norms, attention and the residual stream stay fp32.

    Decode-sized fp32 inputs run gpt/cpu_int8.py's kernel (fp32 activations times the bf16 weight widened
    in registers); longer ones fp32 GEMM on the upcast weight (CPUs without native bf16 arithmetic multiply
    many rows in bf16 several times slower than in fp32). Without the kernel, products take bf16-rounded
    activations and round their output to bf16 (what a bf16 model's products compute).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Bf16Linear:
        return cls(linear.weight, linear.bias).to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if _kernel_takes(rows):
            if rows.shape[0] <= MATVEC_MAX_ROWS:
                y = cpu_int8.wlinear(rows, self.weight, None, self.bias)
            else:
                y = F.linear(rows, self.weight.float(), self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        rows = rows.to(torch.bfloat16)
        if rows.shape[0] <= MATVEC_MAX_ROWS:
            y = F.linear(rows, self.weight)
        else:
            y = F.linear(rows.float(), self.weight.float()).to(torch.bfloat16)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def apply_weight_format(model: nn.Module, weights: str | None) -> nn.Module:
    """Convert a loaded full-precision model in place for serving; returns it.

    fp32: unchanged (its dtype is the caller's). int8 (CPU only: the kernel is a CPU kernel here) and bf16
    on CPU: every nn.Linear becomes an Int8Linear / Bf16Linear, a head tied to the embedding gets its own
    copy and the embedding keeps its full-precision rows for the lookup; RMSNorms run the kernel's one-op
    form (KernelRMSNorm) where the kernel is built. bf16 on a GPU: the whole model.
    """
    if weights is None:
        return model
    check_weight_format(weights)
    device = next(model.parameters()).device
    if weights == "bf16" and device.type != "cpu":
        return model.to(torch.bfloat16)  # GPUs multiply in bf16 natively: the whole model in bf16
    if weights in ("int8", "bf16"):
        if device.type != "cpu":
            raise ValueError(f"weights='int8' runs on CPU only (the model is on {device.type}): use bf16 there.")
        with torch.no_grad():
            _swap_linears(model, Int8Linear if weights == "int8" else Bf16Linear,
                          keep_bf16=INT8_BF16_MODULES if weights == "int8" else ())
        if cpu_int8.available():
            for m in model.modules():
                if type(m) is RMSNorm:
                    m.__class__ = KernelRMSNorm
                elif isinstance(m, CausalSelfAttention):
                    m.decode_kernel = cpu_int8.decode_attention
    return model


class KernelRMSNorm(RMSNorm):
    """RMSNorm through the kernel's one-op form (gpt/cpu_int8.py) where no gradient is needed: PyTorch's
    CPU rms_norm is ~7 ops, 61 times in a SmolLM2 decode step. Same parameters, same state_dict."""

    def forward(self, x):
        if (x.dtype == torch.float32 == self.weight.dtype and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return cpu_int8.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def _swap_linears(module: nn.Module, cls, keep_bf16=(), prefix: str = "") -> None:
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Linear):
            keep = any(path == k or path.endswith(f".{k}") for k in keep_bf16)
            setattr(module, name, (Bf16Linear if keep else cls).from_linear(child))
        else:
            _swap_linears(child, cls, keep_bf16, f"{path}.")
