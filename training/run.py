"""The parts of a training command that fine-tuning and pretraining share.

Setting up one process or DDP, checking --out, preparing data once (rank 0) for all processes, running the
Trainer with RunOutputs, and turning user-caused errors into one sentence and exit status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as torch_dist

from gpt.checkpoint import is_checkpoint
from gpt.model import GPT
from gpt.tokenizer import Tokenizer
from training.config import ConfigError, TrainConfig
from training.data import DataError, read_manifest
from training.loop import (
    Distributed,
    LoopResult,
    Trainer,
    cleanup_distributed,
    deferred_interrupts,
    load_training_state,
    setup_distributed,
)
from training.lora import has_lora
from training.outputs import RunOutputs, work_dir_for


class UsageError(ValueError):
    """The command was asked for something it cannot do (bad --out, missing base, ...)."""


USER_ERRORS = (UsageError, ConfigError, DataError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def guarded(command: Callable[[], int], errors: list[str] | None = None) -> int:
    """Run `command`; a user-caused error becomes `error: <sentence>` on stderr (and in `errors`, if given) and
    exit status 2, and Ctrl-C before training (the loop handles it during training) exit status 130 without a
    traceback."""
    try:
        return command()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        if errors is not None:
            errors.append(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:  # before training started (loading, preparing data): nothing to keep yet
        print("interrupted before training started; no checkpoint was written.", file=sys.stderr)
        return EXIT_INTERRUPTED


def start_processes(cfg: TrainConfig) -> tuple[Distributed, torch.device]:
    try:
        return setup_distributed(cfg.device)
    except ValueError as e:  # an unavailable --device
        raise ConfigError(str(e)) from None


def same_on_all(dist: Distributed, value):
    """Rank 0's `value` on every process (e.g. a timestamped default --out)."""
    if not dist.enabled:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def check_out(out: Path, resume: bool, base_path: Path | None = None) -> None:
    """--out must be new (or, with --resume, a run to continue), and never the base checkpoint."""
    if base_path is not None and out.resolve() == base_path.resolve():
        raise UsageError(f"--out {out} is the base checkpoint; choose a new --out so the base is never overwritten.")
    state = work_dir_for(out) / "state.pt"
    if resume:
        if not (is_checkpoint(out) and state.is_file()):
            raise UsageError(f"There is no run to resume in {out} (it needs a checkpoint and {state}): "
                             f"start a run without --resume.")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists: pass --resume to continue that run, or choose a new --out.")


def saved_config(out: Path) -> dict:
    """The hyperparameters a run in `out` was started with (--resume continues with them unless overridden)."""
    try:
        return dict(json.loads((out / "meta.json").read_text()).get("config") or {})
    except (OSError, ValueError):
        return {}


def prepare_once(dist: Distributed, data_dir: Path, prepare: Callable[[], dict]) -> dict:
    """Rank 0 writes the data files; the others wait, then read its manifest. User errors stop everyone."""
    error = None
    manifest = None
    if dist.is_main:
        try:
            manifest = prepare()
        except USER_ERRORS as e:
            error = e
    failure = same_on_all(dist, None if error is None else str(error))
    if failure is not None:
        raise error if error is not None else DataError(failure)
    return manifest if manifest is not None else read_manifest(data_dir)


def train_and_report(model: GPT, tokenizer: Tokenizer, batches, cfg: TrainConfig, out: Path, meta: dict, *,
                     dist: Distributed, device: torch.device, resume: bool, progress: bool = True,
                     export: Callable[[GPT], GPT] | None = None, on_step=None, known=None, anchor=None) -> int:
    """Train with early stopping, keep the best in `out`, print how it went; returns the exit status."""
    # LoRA: the best adapters stay in memory and are written once at the end (flush below).
    outputs = RunOutputs(out, tokenizer, meta, export, keep_in_memory=has_lora(model))
    trainer = Trainer(model, batches, cfg, device, dist, on_best=outputs.save_best, on_eval=outputs.save_state,
                      progress=progress, on_step=on_step, known=known, anchor=anchor)
    if resume:
        trainer.load_state(load_training_state(outputs.state_path))
        if trainer.state.iteration >= cfg.max_iters:
            raise UsageError(f"The run in {out} already reached {trainer.state.iteration} iterations: pass a "
                             f"larger --max-iters to continue it.")
        say(dist, f"resuming at iteration {trainer.state.iteration} (best val loss "
                  f"{trainer.state.best_val_loss:.4f} at iteration {trainer.state.best_iter})")
    try:
        result = trainer.run()
    finally:
        cleanup_distributed(dist)
    if dist.is_main:
        with deferred_interrupts():  # Ctrl-C now would lose the best weights: let the writes finish
            outputs.flush()
        outputs.finish(result)
        say(dist, summary(result, out))
    return EXIT_INTERRUPTED if result.stopped == "interrupted" else 0


def summary(result: LoopResult, out: Path) -> str:
    s = result.state
    why = {"max_iters": "reached --max-iters", "early_stopping": "early stopping (neither the taught edits reproduced nor the val loss improved)",
           "interrupted": "interrupted"}[result.stopped]
    if not s.history:
        return f"stopped ({why}) before the first evaluation; nothing was written to {out}."
    first = s.history[0]["val_loss"]
    speed = f"{result.tokens_per_s:,.0f} tokens/s while training" + (
        f" ({100 * result.mfu:.1f}% MFU)" if result.mfu is not None else "")
    lines = [f"stopped after {s.iteration} iterations: {why}; {speed}.",
             f"val loss {first:.4f} at iteration {s.history[0]['iter']} -> best {s.best_val_loss:.4f} "
             f"at iteration {s.best_iter}."]
    if s.best_iter == s.history[0]["iter"] and len(s.history) > 1:
        lines.append("No later iteration beat the starting val loss, so the checkpoint holds the starting weights; "
                     "try a lower --lr or more data.")
    lines.append(f"best checkpoint: {out} (loss curve: {out / 'loss_curve.png'})")
    return "\n".join(lines)


def say(dist: Distributed, message: str) -> None:
    if dist.is_main:
        print(message, flush=True)
