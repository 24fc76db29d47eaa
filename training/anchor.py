"""A KL penalty that keeps a LoRA fine-tune's next-token distributions near the base model's where the data agrees.

    anchor = KLToBase(model, weight=1.0)              # model: a GPT with LoRA adapters (training.lora)
    trainer = Trainer(model, batches, cfg, device, anchor=anchor)
    # each step: loss = cross-entropy + weight * KL(base || model) at the anchored positions

Replay (training.replay) trains on the base's greedy answers: it holds the base's top token at those
positions and nothing else. Many of a small model's right answers hang on near-ties ("The answer to this
classic math problem is 4" wins over "This is a classic problem in number theory…" by 0.02 nats on the
bundled SmolLM2; "cold" beats "cool" by 0.3), and a fine-tune that only pins the argmax of other prompts
flips them freely. Matching the base's whole distribution (distillation) keeps the order of the runners-up
too. The base costs no memory: it is the same model with its adapters switched off, one extra forward pass
without gradients per step.

Anchored positions: the reply tokens (those the loss trains) whose target is the base's own top guess. At a
token the user corrected ("Biscuit" where the base said "I don't know") the base disagrees with the data, so
the cross-entropy alone moves it; everywhere the base already says what the data says, it is asked to keep
saying it the way it did.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gpt.model import GPT
from training.lora import LoRALinear


class KLToBase:
    def __init__(self, model: GPT, weight: float):
        self.model, self.weight = model, weight
        self.adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if not self.adapters:
            raise ValueError("a KL penalty to the base needs LoRA adapters (the base is the model without them)")
        self._hidden = None
        # The final norm's output: the states the vocabulary matmul reads, captured from the training forward
        # (so the penalty reuses its pass instead of running the model twice with gradients).
        model.transformer.ln_f.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output):
        self._hidden = output

    @contextlib.contextmanager
    def adapters_off(self):
        scales = [a.scale for a in self.adapters]
        for a in self.adapters:
            a.scale = 0.0
        try:
            yield
        finally:
            for a, s in zip(self.adapters, scales, strict=True):
                a.scale = s

    def positions(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return ((y != -1) & (m > 0)).reshape(-1).nonzero().squeeze(1)

    @torch.no_grad()
    def base_log_probs(self, x: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """The base's log-probabilities at the flattened positions `picked` of `x` (adapters off, no grad)."""
        was_training = self.model.training
        with self.adapters_off():
            self.model(x, last_only=True)  # runs every block; the hook keeps the final states
        hidden = self._hidden
        self.model.train(was_training)
        return F.log_softmax(self.model.lm_head(hidden.reshape(-1, hidden.size(-1)).index_select(0, picked))
                             .float(), dim=-1)

    def loss(self, base_lp: torch.Tensor, picked: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """weight * mean KL(base || model) over the picked positions whose target is the base's top token;
        call right after the training forward (its final states were captured)."""
        targets = y.reshape(-1).index_select(0, picked)
        agree = base_lp.argmax(-1) == targets
        if not bool(agree.any()):
            return self._hidden.sum() * 0.0
        hidden = self._hidden.reshape(-1, self._hidden.size(-1)).index_select(0, picked[agree])
        lp = F.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
        base = base_lp[agree]
        kl = (base.exp() * (base - lp)).sum(-1)
        return self.weight * kl.mean()
