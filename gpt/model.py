"""The native model: GPT-2, with a few switches that also make it a Llama-family model.

GPT-2 is the default (learned positions, LayerNorm, GELU MLP, tied embeddings, biases). The switches
(`pos="rope"`, `norm="rmsnorm"`, `mlp="swiglu"`, `n_kv_head < n_head`, `bias=False`,
`tie_embeddings=False`) describe SmolLM2 and its relatives. One class, no hierarchy.

Incremental decoding uses a preallocated `KVCache`: prefill the prompt once, then feed one token per step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None: same as n_head (no grouped-query attention)
    intermediate_size: int | None = None  # None: 4 * n_embd
    bias: bool = True
    dropout: float = 0.0
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # tanh-approximated GELU as in GPT-2, or "swiglu"
    pos: str = "learned"  # or "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide by n_head, and n_head by n_kv_head")
        for name, value, allowed in (("norm", self.norm, ("layernorm", "rmsnorm")),
                                     ("mlp", self.mlp, ("gelu", "swiglu")),
                                     ("pos", self.pos, ("learned", "rope"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class KVCache:
    """Keys and values for every layer, preallocated for `max_len` positions; `pos` is how many are filled."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def positions(self, T: int, device) -> torch.Tensor:
        """Position ids of the next T tokens: (T,), the same for every row."""
        return torch.arange(self.pos, self.pos + T, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys and values (B, n_kv_head, T, head_dim); return what attention reads:
        (keys, values, mask or None, causal)."""
        B, _, T, _ = k.shape
        start, end = self.pos, self.pos + T
        self.k[layer, :B, :, start:end] = k
        self.v[layer, :B, :, start:end] = v
        if start == 0:
            return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end], None, True
        # A chunk after a filled prefix: each new position sees the prefix and its own past.
        mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=start) if T > 1 else None
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end], mask, False

    def advance(self, T: int) -> None:
        self.pos += T


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 == self.weight.dtype:  # the same arithmetic in one op (a decode step's hot path)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: GPTConfig, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim), in the rotate-half layout of transformers' Llama."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1).to(device)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    decode_kernel = None  # a one-query attention op for decode steps (gpt/cpu_int8.py), where set

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * hd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None):
        cfg = self.cfg
        B, T, _ = x.shape
        hd = cfg.head_dim
        nq, nqk = cfg.n_head, cfg.n_head + cfg.n_kv_head
        qkv = self.c_attn(x).view(B, T, nqk + cfg.n_kv_head, hd)
        qk = qkv[:, :, :nqk]
        if rope is not None:  # q and k heads are adjacent: one rotation for both
            cos, sin = rope
            qk = apply_rope(qk, cos.unsqueeze(-2), sin.unsqueeze(-2))
        q, k, v = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2), qkv[:, :, nqk:].transpose(1, 2)
        mask, causal = None, True
        if cache is not None:  # a KVCache, or the scheduler's per-row slots (gpt/slots.py)
            k, v, mask, causal = cache.update(self.layer, k, v)
        if self.decode_kernel and T == 1 and mask is not None and not torch.is_grad_enabled():
            y = self.decode_kernel(q, k, v, mask)  # set by gpt/quantize.py for CPU int8/bf16 serving
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and T > 1,
                dropout_p=cfg.dropout if self.training else 0.0,
                enable_gqa=k.shape[1] != q.shape[1])  # a cache may hand back the key heads repeated
        y = y.transpose(1, 2).reshape(B, T, cfg.n_embd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        width = cfg.intermediate_size * (2 if self.swiglu else 1)  # SwiGLU: gate and up in one matmul
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            ln_f=make_norm(cfg),
        ))
        if cfg.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def _rope(self, start: int, T: int, device):
        stale = self._rope_cache is not None and self._rope_cache[0].is_inference() \
            and not torch.is_inference_mode_enabled()  # tables made while decoding cannot join autograd
        if self._rope_cache is None or stale or self._rope_cache[0].device != torch.device(device):
            self._rope_cache = rope_tables(self.config, self.config.block_size, device)
        cos, sin = self._rope_cache
        dtype = self.transformer.wte.weight.dtype
        return cos[start:start + T].to(dtype), sin[start:start + T].to(dtype)

    def forward(self, idx, targets=None, loss_mask=None, cache: KVCache | None = None, last_only=False,
                loss_only=False, last_at: torch.Tensor | None = None):
        """Logits for `idx` (B, T). With `targets`, also the mean cross-entropy (over `loss_mask` if given).

        With `cache`, positions start at `cache.pos` and the cache advances by T. `last_only` computes
        logits for the last position only (what decoding needs; saves the big vocabulary matmul);
        `last_at` (B,) does the same at each row's own position (rows of prompts of different lengths).
        `loss_only` (with targets) returns (None, loss) and runs the vocabulary matmul only where a target
        counts: fine-tuning on chats scores replies only, so most positions need no logits.
        """
        B, T = idx.shape
        start = cache.pos if isinstance(cache, KVCache) else 0  # slot caches check their rows themselves
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        x = self.transformer.wte(idx)
        # Position ids: (T,) for a KVCache or no cache, (B, T) where each row has its own position.
        pos = cache.positions(T, idx.device) if cache is not None else torch.arange(T, device=idx.device)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            cos, sin = self._rope(0, self.config.block_size, idx.device)
            rope = cos[pos], sin[pos]  # (T, hd), or (B, T, hd) where each row has its own positions
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)
        if last_at is not None and targets is None:
            return self.lm_head(x[torch.arange(B, device=x.device), last_at].unsqueeze(1))
        if last_only and targets is None:
            return self.lm_head(x[:, -1:, :])
        if loss_only and targets is not None:
            keep = targets.reshape(-1) != -1
            if loss_mask is not None:
                keep = keep & (loss_mask.reshape(-1) > 0)
            picked = keep.nonzero().squeeze(1)
            logits = self.lm_head(x.reshape(B * T, -1).index_select(0, picked))
            weights = loss_mask.reshape(-1).index_select(0, picked).float() if loss_mask is not None else None
            losses = F.cross_entropy(logits.float(), targets.reshape(-1).index_select(0, picked), reduction="none")
            if weights is None:
                return None, losses.sum() / max(1, losses.numel())
            return None, (losses * weights).sum() / weights.sum().clamp(min=1.0)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                 ignore_index=-1, reduction="none")
        if loss_mask is None:
            valid = (targets.reshape(-1) != -1).float()
        else:
            valid = loss_mask.reshape(-1).float() * (targets.reshape(-1) != -1).float()
        loss = (losses * valid).sum() / valid.sum().clamp(min=1.0)
        return logits, loss

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        w = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, w.device, w.dtype)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             device_type: str = "cpu") -> torch.optim.AdamW:
        """AdamW with weight decay on 2-D weights only (matmuls, embeddings); fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def estimate_mfu(self, tokens_per_iter: int, dt: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation (PaLM appendix B): 6N + 12·L·H·Q·T FLOPs per token, T the trained
        sequence length (default: the model's context)."""
        cfg = self.config
        n = self.get_num_params()
        flops_per_token = 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * (seq_len or cfg.block_size)
        return flops_per_token * tokens_per_iter / dt / peak_flops
