"""Train a native GPT-2-architecture model from scratch on a plain text file (GPT-2 tokenizer).

    python -m training.pretrain --text input.txt --out models/native/scratch \
        --n-layer 4 --n-head 4 --n-embd 128 --block-size 256 --max-iters 2000
    torchrun --nproc_per_node 8 -m training.pretrain --text big.txt --out DIR ...   # DDP

The same loop as fine-tuning (training.loop): random windows of the text's first 90% for training, fixed
windows of the last 10% for validation, every token a target; the best checkpoint by val loss is kept in
--out with meta.json and loss_curve.png. --block-size is both the model's context and the training window.
Exit status: 0 done, 2 bad input (one-sentence message), 130 interrupted (the best so far is kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gpt.checkpoint import load_checkpoint
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import GPT2Tokenizer
from training.batches import TextBatches
from training.config import ConfigError, add_config_flags, load_config, overrides_from_args
from training.data import load_split, prepare_text_data, read_manifest
from training.outputs import work_dir_for
from training.run import (
    check_out,
    guarded,
    prepare_once,
    saved_config,
    say,
    start_processes,
    train_and_report,
)

# Learning from scratch wants a larger learning rate and some weight decay (nanoGPT's small-model values).
PRETRAIN_DEFAULTS = {"max_iters": 2000, "batch_size": 12, "block_size": 256, "lr": 1e-3, "min_lr": 1e-4,
                     "warmup_iters": 100, "eval_interval": 100, "eval_iters": 20, "weight_decay": 0.1,
                     "beta2": 0.99, "patience": 5}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="plain UTF-8 text file to learn from")
    parser.add_argument("--out", required=True, help="checkpoint directory to write (must be new unless --resume)")
    parser.add_argument("--config", default=None, help="TOML file of hyperparameters (keys as in configs/finetune.toml; "
                                                        "with --resume the run's own settings are the defaults)")
    parser.add_argument("--n-layer", type=int, default=6, help="transformer blocks (default: 6)")
    parser.add_argument("--n-head", type=int, default=6, help="attention heads per block (default: 6)")
    parser.add_argument("--n-embd", type=int, default=384, help="embedding width, divisible by --n-head (default: 384)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (evaluations still print)")
    add_config_flags(parser, PRETRAIN_DEFAULTS)
    return parser


def build_model(args: argparse.Namespace, block_size: int, dropout: float, vocab_size: int) -> GPT:
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}.")
    if args.n_embd % args.n_head:
        raise ConfigError(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head}).")
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd, dropout=dropout))


def pretrain(args: argparse.Namespace) -> int:
    defaults = {**PRETRAIN_DEFAULTS, **(saved_config(Path(args.out)) if args.resume else {})}
    cfg = load_config(args.config, overrides_from_args(args), defaults=defaults)
    if cfg.lora_rank:
        raise ConfigError("--lora-rank adapts a trained model; pretraining trains every weight: leave it at 0.")
    dist, device = start_processes(cfg)
    out = Path(args.out)
    data_dir = work_dir_for(out) / "data"
    check_out(out, resume=args.resume)
    torch.manual_seed(cfg.seed)
    if args.resume:
        model, tokenizer, _ = load_checkpoint(out)
        cfg.block_size = min(cfg.block_size, model.config.block_size)
        manifest = read_manifest(data_dir)
    else:
        tokenizer = GPT2Tokenizer()
        model = build_model(args, cfg.block_size, cfg.dropout, tokenizer.vocab_size)
        manifest = prepare_once(dist, data_dir, lambda: prepare_text_data(
            args.text, tokenizer, data_dir, val_fraction=cfg.val_fraction, min_tokens=cfg.block_size + 2))
    splits = manifest["splits"]
    say(dist, f"text {manifest['source']['text']}: {splits['train']['tokens']:,} train tokens, "
              f"{splits['val']['tokens']:,} val tokens")
    batches = TextBatches(load_split(data_dir, "train"), load_split(data_dir, "val"), cfg.block_size,
                          cfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    say(dist, f"model: {model.config.n_layer} layers, {model.config.n_head} heads, {model.config.n_embd} wide, "
              f"context {model.config.block_size}, {model.get_num_params() / 1e6:.2f}M parameters; "
              f"training on {device}")
    meta = {"kind": "pretrain", "base": None, "tokenizer": tokenizer.name, "config": cfg.to_dict(),
            "data": {"text": manifest["source"]["text"], "text_sha256": manifest["source"]["sha256"],
                     "manifest": str(data_dir), "train_tokens": splits["train"]["tokens"],
                     "val_tokens": splits["val"]["tokens"]}}
    return train_and_report(model, tokenizer, batches, cfg, out, meta, dist=dist, device=device,
                            resume=args.resume, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: pretrain(args))


if __name__ == "__main__":
    sys.exit(main())
