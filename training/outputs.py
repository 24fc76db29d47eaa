"""What a training run writes: the best checkpoint, its meta.json and loss curve, and the --resume state.

    outputs = RunOutputs(out_dir, tokenizer, meta={"base": ..., "data": ...})
    trainer = Trainer(..., on_best=outputs.save_best, on_eval=outputs.save_state)
    outputs.finish(result)

`out_dir` is a native checkpoint (gpt.checkpoint.save_checkpoint: atomic, so a crash mid-save leaves the
previous best in place) plus `loss_curve.png`. Run files that are not part of the checkpoint, the prepared
data and the resume state, live in the sibling `<out_dir>.train/`, because each atomic save replaces the
checkpoint directory whole.

With `keep_in_memory` (LoRA runs, whose trainable weights are a few MB) nothing is written during training:
the best adapters are copied in memory at each evaluation and `flush()` writes the merged checkpoint and the
resume state once at the end, also after Ctrl-C (the caller holds interrupts while it writes). Writing the
full 135M-parameter weights and optimizer state at every evaluation cost more than the evaluation itself.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpt.checkpoint import save_checkpoint
from gpt.model import GPT
from gpt.tokenizer import Tokenizer
from training.loop import LoopResult, LoopState, save_training_state

LOSS_CURVE = "loss_curve.png"
STATE = "state.pt"


def work_dir_for(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".train")


class RunOutputs:
    def __init__(self, out_dir: str | Path, tokenizer: Tokenizer, meta: dict,
                 export: Callable[[GPT], GPT] | None = None, keep_in_memory: bool = False):
        self.out_dir = Path(out_dir)
        self.export = export or (lambda model: model)  # e.g. merge LoRA adapters into plain weights
        self.work_dir = work_dir_for(self.out_dir)
        self.tokenizer = tokenizer
        self.meta = dict(meta)
        self.started = time.time()
        self.keep_in_memory = keep_in_memory
        self._best: tuple[GPT, dict[str, torch.Tensor], dict] | None = None  # model, trainable weights, meta
        self._resume: tuple[GPT, object, LoopState] | None = None  # what flush() writes for --resume

    @property
    def state_path(self) -> Path:
        return self.work_dir / STATE

    def _meta(self, state: LoopState) -> dict:
        last = state.history[-1] if state.history else {}
        return {**self.meta, "iterations": state.iteration, "best_iter": state.best_iter,
                "best_val_loss": state.best_val_loss, "train_loss": last.get("train_loss"),
                "val_loss": last.get("val_loss"), "time_s": round(time.time() - self.started, 2),
                "tokens": state.tokens, "history": state.history, "created": time.time()}

    def save_best(self, model: GPT, state: LoopState) -> None:
        """The lowest-val-loss weights so far, atomically replacing the previous best (or kept in memory)."""
        if self.keep_in_memory:
            self._best = (model, trainable_copy(model), self._meta(state))
            return
        self._write_best(model, self._meta(state))
        plot_losses(state.history, self.out_dir / LOSS_CURVE, state.best_iter)

    def _write_best(self, model: GPT, meta: dict) -> None:
        dropout = model.config.dropout
        model.config.dropout = 0.0  # inference needs none; a later fine-tune sets its own
        try:
            save_checkpoint(self.export(model), self.out_dir, self.tokenizer, meta)
        finally:
            model.config.dropout = dropout

    def save_state(self, model: GPT, optimizer, state: LoopState) -> None:
        if self.keep_in_memory:
            self._resume = (model, optimizer, state)
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        save_training_state(self.state_path, model, optimizer, state)

    def flush(self) -> None:
        """Write what `keep_in_memory` held back: the best weights as the checkpoint, then the resume state
        (the current weights). Call it with interrupts held, once training has stopped."""
        if self._best is not None:
            model, best, meta = self._best
            current = trainable_copy(model)
            load_trainable(model, best)
            try:
                self._write_best(model, meta)
            finally:
                load_trainable(model, current)
            self._best = None
        if self._resume is not None:
            model, optimizer, state = self._resume
            self.work_dir.mkdir(parents=True, exist_ok=True)
            save_training_state(self.state_path, model, optimizer, state)
            self._resume = None

    def finish(self, result: LoopResult) -> dict:
        """Record how the run ended in the checkpoint's meta.json (atomically) and redraw the curve."""
        meta_path = self.out_dir / "meta.json"
        if not meta_path.is_file():
            return {}
        meta = json.loads(meta_path.read_text())
        state = result.state
        meta.update({"iterations": state.iteration, "stopped": result.stopped, "time_s": round(result.elapsed, 2),
                     "tokens": state.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
                     "history": state.history, "best_val_loss": state.best_val_loss, "best_iter": state.best_iter})
        if result.mfu is not None:
            meta["mfu"] = round(result.mfu, 4)
        if state.history:
            meta["final_train_loss"] = state.history[-1]["train_loss"]
            meta["final_val_loss"] = state.history[-1]["val_loss"]
        tmp = meta_path.with_name(f".meta.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)
        plot_losses(state.history, self.out_dir / LOSS_CURVE, state.best_iter)
        return meta


def trainable_copy(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: GPT, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value)


def plot_losses(history: list[dict], path: Path, best_iter: int | None = None) -> None:
    """Train and val loss against iterations, the best point marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (servers, tests)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    iters = [h["iter"] for h in history]
    ax.plot(iters, [h["train_loss"] for h in history], marker="o", ms=3, label="train")
    ax.plot(iters, [h["val_loss"] for h in history], marker="o", ms=3, label="val")
    best = [h for h in history if h["iter"] == best_iter]
    if best:
        ax.scatter([best_iter], [best[0]["val_loss"]], s=80, facecolors="none", edgecolors="red",
                   label=f"best (iter {best_iter})", zorder=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (target tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
