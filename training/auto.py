"""Fine-tuning settings chosen from the data and the device, for every field left "auto".

    cfg = load_config("configs/finetune.toml", overrides, allow_auto=True)   # lr = "auto", ...
    line = resolve_auto(cfg, device=device, longest=manifest_longest, context=1024, rows_per_epoch=rows)
    print(line)   # one line: every setting, "(auto)" where it was chosen here

A chat log is small: a few dozen exchanges, a thousand or two tokens. So the run is measured in epochs over
it, rows fit two of the longest examples (short ones pack together; not a fixed 512), the whole val split is
evaluated once per epoch (one forward pass: the train loss is the mean of the epoch's steps), and early
stopping ends the run when neither the number of taught edits the model reproduces nor the val loss improves.
On a CPU the weights stay frozen and LoRA adapters (configs/finetune.toml: on the MLP matrices)
learn the edits, a third of full fine-tuning's work per token and far less memory; on a GPU full fine-tuning is
cheap, so it is used there. Against forgetting, the base's own answers to 24 shipped general prompts train
alongside the log (training.replay); a KL penalty to the base (training.anchor, `--kl`) is measured but off:
it kept more general answers only by learning fewer facts. The numbers below were chosen by measuring variants on the
bundled SmolLM2-135M-Instruct and a 35-exchange log (`python -m benchmarks.finetune_loop`, per epoch:
`python -m benchmarks.finetune_sweep`; docs/benchmarks.md, "The learning loop").
"""

from __future__ import annotations

import math

import torch

from training.config import AUTO, TrainConfig, validate

# Measured choices (see the module docstring); each is one "auto" field's value.
LORA_RANK_CPU = 8
LORA_ALPHA = 16.0
LR_LORA = 2e-3
LR_FULL = 2e-5
MIN_LR_RATIO = 0.1
EPOCHS = 5  # with replay an epoch is ~5 steps on the benchmark log; the edits land by epoch 3-4
ROWS_PER_BATCH = {"cpu": 2, "cuda": 8}
EXAMPLES_PER_ROW = 2  # rows fit two of the longest examples: short ones pack together, far less padding
PATIENCE = 1  # evaluations (epochs) without improvement (more edits reproduced, or a lower val loss)
KL = 0.0  # weight of the KL penalty to the base's distributions (training.anchor), with LoRA: off, see docs/benchmarks.md
REPLAY = 24  # general prompts whose base answers train alongside the log (training.replay)
BLOCK_ROUND = 8  # row length rounded up to a multiple of this (kinder to matmul kernels)


_TARGET_WORDS = {"all": "the attention and MLP matrices", "attention": "the attention matrices",
                 "mlp": "the MLP matrices"}


def is_auto(cfg: TrainConfig, name: str) -> bool:
    return getattr(cfg, name) == AUTO


def resolve_block_and_batch(cfg: TrainConfig, device: torch.device, longest: int, context: int) -> list[str]:
    """Fill block_size and batch_size (the data batches are built from them); returns the names chosen."""
    chosen = []
    if is_auto(cfg, "block_size"):
        # A row holds two of the longest examples (more of the shorter ones, packed one after another); rows
        # of one longest example left a third of every row as padding on a 35-exchange log.
        cfg.block_size = min(context, BLOCK_ROUND * math.ceil(max(EXAMPLES_PER_ROW * longest, 2) / BLOCK_ROUND))
        chosen.append("block_size")
    if is_auto(cfg, "batch_size"):
        cfg.batch_size = ROWS_PER_BATCH.get(device.type, 8)
        chosen.append("batch_size")
    return chosen


def resolve_replay(cfg: TrainConfig) -> list[str]:
    """Fill `replay` (needed before the data is prepared); returns the names chosen."""
    if is_auto(cfg, "replay"):
        cfg.replay = REPLAY
        return ["replay"]
    return []


def resolve_auto(cfg: TrainConfig, *, device: torch.device, rows_per_epoch: int, val_rows: int,
                 chosen: list[str] | None = None) -> str:
    """Fill every remaining "auto" field of `cfg` in place, validate it, and describe the settings in one line."""
    chosen = list(chosen or [])

    def choose(name, value):
        if is_auto(cfg, name):
            setattr(cfg, name, value)
            chosen.append(name)

    choose("lora_rank", 0 if device.type == "cuda" else LORA_RANK_CPU)
    choose("lora_alpha", LORA_ALPHA)
    choose("lr", LR_LORA if cfg.lora_rank else LR_FULL)
    choose("min_lr", min(cfg.lr, cfg.lr * MIN_LR_RATIO))
    steps_per_epoch = max(1, math.ceil(rows_per_epoch / (cfg.batch_size * cfg.grad_accum)))
    choose("epochs", float(EPOCHS))
    choose("max_iters", max(1, round(cfg.epochs * steps_per_epoch)) if cfg.epochs else EPOCHS * steps_per_epoch)
    choose("eval_interval", min(steps_per_epoch, cfg.max_iters))
    choose("eval_iters", max(1, math.ceil(val_rows / cfg.batch_size)))
    choose("warmup_iters", min(steps_per_epoch, max(1, cfg.max_iters // 10)))
    choose("patience", PATIENCE)
    choose("kl", KL if cfg.lora_rank else 0.0)
    validate(cfg)
    return describe(cfg, device, steps_per_epoch, chosen)


def describe(cfg: TrainConfig, device: torch.device, steps_per_epoch: int, chosen: list[str]) -> str:
    def mark(name, text):
        return text + ("*" if name in chosen else "")

    method = (mark("lora_rank", f"LoRA rank {cfg.lora_rank}") + mark("lora_alpha", f" alpha {cfg.lora_alpha:g}")
              + f" on {_TARGET_WORDS[cfg.lora_targets]}"
              if cfg.lora_rank else mark("lora_rank", "full fine-tuning"))
    epochs = cfg.max_iters / steps_per_epoch
    stop = (mark("patience", f"stop after {cfg.patience} evaluations without improvement") if cfg.patience
            else mark("patience", "no early stopping"))
    replay = mark("replay", f"replaying the base's answers to {cfg.replay} general prompts" if cfg.replay
                  else "no replay")
    if cfg.kl:
        replay += mark("kl", f", KL to the base x{cfg.kl:g}")
    return (f"settings on {device.type} (* chosen from the data and device; each has a --flag): {method}, "
            f"{mark('lr', f'lr {cfg.lr:g}')} -> {mark('min_lr', f'{cfg.min_lr:g}')}, "
            f"{mark('max_iters', f'{cfg.max_iters} steps')} ({mark('epochs', f'{epochs:g} epochs')} of "
            f"{steps_per_epoch}), {mark('batch_size', f'{cfg.batch_size} rows')} x "
            f"{mark('block_size', f'{cfg.block_size} tokens')}, {mark('warmup_iters', f'warmup {cfg.warmup_iters}')}"
            f", {mark('eval_interval', f'val loss every {cfg.eval_interval} steps')} "
            f"({mark('eval_iters', f'{cfg.eval_iters} batches')}), {stop}, {replay}")
