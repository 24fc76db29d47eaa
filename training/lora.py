"""LoRA: fine-tune small low-rank updates of the attention and MLP matrices instead of every weight.

    apply_lora(model, rank=8, alpha=16)     # freezes the model, adds trainable A (r x in) and B (out x r)
    plain = merged_copy(model)              # a normal GPT with W + (alpha / r) * B @ A, for save_checkpoint

Enabled by `--lora-rank R` in training.finetune. Checkpoints are always saved merged, so the native backend
and every other reader see an ordinary checkpoint. On a CPU this skips the weight gradients and optimizer
state of the frozen weights (most of the work per step for a 135M model); B starts at zero, so training
starts exactly at the base model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gpt.model import GPT

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
TARGET_SETS = {"all": TARGETS, "attention": TARGETS[:2], "mlp": TARGETS[2:]}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_b @ self.lora_a) * self.scale


def apply_lora(model: GPT, rank: int, alpha: float, targets: str = "all") -> GPT:
    """Freeze every weight of `model` and wrap its attention and/or MLP matrices (`targets`: all, attention,
    mlp) with trainable LoRA adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for path in TARGET_SETS[targets]:
            owner_name, attr = path.split(".")
            owner = getattr(block, owner_name)
            setattr(owner, attr, LoRALinear(getattr(owner, attr), rank, alpha))
    return model


def has_lora(model: GPT) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@torch.no_grad()
def merged_copy(model: GPT) -> GPT:
    """A plain GPT (no adapters) whose weights are the adapted ones; `model` itself is left unchanged."""
    if not has_lora(model):
        return model
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight().detach().clone()
            if module.base.bias is not None:
                state[f"{name}.bias"] = module.base.bias.detach().clone()
    for key, value in model.state_dict().items():
        if ".base." not in key and not key.endswith((".lora_a", ".lora_b")):
            state[key] = value
    plain = GPT(model.config).to(next(model.parameters()).device)
    plain.load_state_dict(state, strict=True)
    if model.config.tie_embeddings:
        plain.lm_head.weight = plain.transformer.wte.weight
    return plain.eval()
