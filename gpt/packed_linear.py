"""fp32 matmul weights kept pre-packed in oneDNN's blocked layout, for CPU inference (the batched decode step).

    pack_linears(model)      # in place, once (the scheduler does it on CPU); returns how many were packed
    model(ids, cache=...)    # under no_grad / inference_mode the packed products run; otherwise nn.Linear's

Why (measured on the 2-core CPU, docs/benchmarks.md): `F.linear` hands each product to MKL's sgemm, which
re-packs the weight into its own panel layout on every call. At one row that hides behind reading the
weight from memory, but at the 8 rows of a batched decode step it is a second pass over ~0.5 GB per step:
SmolLM2's step of 8 rows took 2.4x one row's time. oneDNN's inner-product primitive on a weight re-ordered
once (`torch.ops.mkldnn._reorder_linear_weight`, what PyTorch's own CPU graph compiler uses for frozen
weights) skips that: the 8-row step went from 123 ms to 100 ms at one thread while one row stayed as fast.

The packed copy is extra memory (one more copy of every packed product's weight: +0.5 GB for SmolLM2-135M
fp32). The module stays an `nn.Linear` (same parameters, same state_dict); it uses the packed copy only
when no gradient can be needed and the weight is still the one that was packed (same storage, same
in-place version), so training, LoRA, `.to()` and weight edits keep working through `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_HINT = 8  # rows oneDNN picks its blocking for: the CPU scheduler's default capacity


class PackedLinear(nn.Linear):
    """An `nn.Linear` with a oneDNN-packed copy of its fp32 weight for inference (made by `pack_linears`)."""

    _packed: torch.Tensor | None = None
    _packed_of: tuple[int, int] = (0, -1)  # (data_ptr, _version) of the weight the copy was made from

    def repack(self) -> None:
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), BATCH_HINT)
        self._packed_of = (self.weight.data_ptr(), self.weight._version)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (self._packed is not None and not torch.is_grad_enabled() and x.dtype == torch.float32 == w.dtype
                and x.device.type == "cpu" == w.device.type and (w.data_ptr(), w._version) == self._packed_of):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, w, self.bias)


def available() -> bool:
    """oneDNN's packed inner product is in this PyTorch build."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linears(model: nn.Module) -> int:
    """Give every plain fp32 CPU `nn.Linear` of `model` a packed weight (tied ones included); returns the count.

    Other modules (int8/bf16 products from gpt/quantize.py, CUDA or bf16 weights) are left as they are. If
    the packed product disagrees with `F.linear` on a probe (a build whose kernels misbehave), nothing is
    packed and the count is 0.
    """
    if not available():
        return 0
    targets = [m for m in model.modules() if type(m) in (nn.Linear, PackedLinear)
               and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    try:
        for m in targets:
            if type(m) is nn.Linear or (m.weight.data_ptr(), m.weight._version) != m._packed_of:
                m.__class__ = PackedLinear
                m.repack()
        with torch.no_grad():
            probe = torch.randn(3, targets[0].in_features, generator=torch.Generator().manual_seed(0)) if targets else None
            if probe is not None and not torch.allclose(targets[0](probe), F.linear(probe, targets[0].weight,
                                                                                   targets[0].bias), atol=1e-4):
                raise RuntimeError("packed product disagrees")
    except RuntimeError:
        unpack_linears(model)
        return 0
    return len(targets)


def unpack_linears(model: nn.Module) -> None:
    """Drop the packed copies (the memory they hold); the modules are plain `nn.Linear` again."""
    for m in model.modules():
        if type(m) is PackedLinear:
            m._packed = None
            m.__class__ = nn.Linear
