"""What each epoch of a fine-tune learned and forgot, for several settings: the data behind training/auto.py.

    python -m benchmarks.finetune_sweep --device cuda --dtype fp32 --epochs 10     # every variant below
    python -m benchmarks.finetune_sweep --only base,replay24 --json sweep.json     # some of them

For each variant (overrides of the fine-tuning settings) the run trains on benchmarks.finetune_log's
35-exchange log without early stopping and, after every epoch, asks the model the eight facts as taught and
in other words (greedy; right when the reply holds the fact's key words), checks retention on
training.quality's questions (evaluation only: they are never trained on) and how many of the held-out
replay answers (training.replay) the model still reproduces word for word, the signal a run may use to choose
its checkpoint without looking at the retention set. On a GPU with --dtype fp32 the arithmetic is the CPU
run's, a hundred times faster, so the trade-offs measured here carry over to the 2-core default.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.finetune_log import FACTS, write_benchmark_log
from benchmarks.finetune_loop import BUNDLED, fact_right
from gpt.chatlog import conversations
from gpt.checkpoint import load_checkpoint
from training.anchor import KLToBase
from training.auto import resolve_auto, resolve_block_and_batch
from training.batches import ChatBatches
from training.config import TrainConfig
from training.data import (
    REPLAY_VAL_EVERY,
    chat_format_for,
    fresh_exchange,
    load_split,
    prepare_chat_data,
    read_history,
    select_exchanges,
)
from training.finetune import usual_system_prompt
from training.loop import Distributed, Trainer
from training.lora import LoRALinear, apply_lora, merged_copy
from training.replay import replay_examples
from training.report import greedy_answers, reproduces, retention

VARIANTS = {
    "base": {"replay": 0},
    "replay24": {"replay": 24},
    "replay32": {"replay": 32},
    "replay24-lr3e-3": {"replay": 24, "lr": 3e-3},
    "replay24-lr1e-3": {"replay": 24, "lr": 1e-3},
    "replay24-attn": {"replay": 24, "lora_targets": "attention", "lr": 3e-3},
    "replay12": {"replay": 12},
    "replay24-mlp": {"replay": 24, "lora_targets": "mlp"},
    "replay32-lr1.5e-3": {"replay": 32, "lr": 1.5e-3},
    "replay24-r4": {"replay": 24, "lora_rank": 4, "lora_alpha": 8.0},
    "full-replay24-lr3e-5": {"replay": 24, "lora_rank": 0, "lr": 3e-5},
    "full-replay24-lr1e-4": {"replay": 24, "lora_rank": 0, "lr": 1e-4},
    "replay24-kl1": {"replay": 24, "kl": 1.0},
    "replay24-kl3": {"replay": 24, "kl": 3.0},
}


def probe(model, tokenizer, fmt, system_prompt, replay_val) -> dict:
    """Facts (as taught, paraphrased), retention and held-out replay reproduction of `model` now."""
    plain = merged_copy(model).eval()
    asked = [f.question for f in FACTS] + [f.paraphrase for f in FACTS]
    replies = greedy_answers(plain, tokenizer, [fresh_exchange(fmt, q, system_prompt)[0]
                                                for q in asked])
    right = [fact_right(f, tokenizer.decode(r)) for f, r in zip(FACTS + FACTS, replies, strict=True)]
    kept = retention(plain, tokenizer, system_prompt=system_prompt)
    held = reproduces(plain, replay_val)
    return {"taught": sum(right[:8]), "paraphrased": sum(right[8:]), "retention": kept.n_right,
            "replay_held": sum(held), "replay_held_of": len(held),
            "wrong": [a[:60] for a, r in zip(kept.answers, kept.right, strict=True) if not r]}


def run_variant(name: str, overrides: dict, args, log: Path, work: Path, replay_all) -> list[dict]:
    model, tokenizer, _ = load_checkpoint(args.base)
    device = torch.device(args.device)
    cfg = TrainConfig(**{**TrainConfig().to_dict(), "device": args.device, "dtype": args.dtype,
                         "lora_rank": 8, "lora_alpha": 16.0, "lr": 2e-3, "epochs": args.epochs,
                         "patience": 0, **{k: "auto" for k in ("max_iters", "batch_size", "block_size", "min_lr",
                                                                "warmup_iters", "eval_interval", "eval_iters")},
                         **overrides})
    cfg.min_lr = "auto" if "min_lr" not in overrides else cfg.min_lr
    data = work / name
    selections, _ = select_exchanges(conversations(read_history(log)))
    system_prompt = usual_system_prompt(selections)
    manifest = prepare_chat_data(log, tokenizer, data, replay=lambda _: replay_all[:cfg.replay])
    replay = replay_all[:cfg.replay]
    replay_val = [(ids[:mask.index(1)], ids[mask.index(1):]) for i, (ids, mask) in enumerate(replay)
                  if i % REPLAY_VAL_EVERY == REPLAY_VAL_EVERY - 1]
    splits = manifest["splits"]
    chosen = resolve_block_and_batch(cfg, torch.device("cpu"), max(splits["train"]["longest"],
                                                                   splits["val"]["longest"]), 2048)
    batches = ChatBatches(load_split(data, "train"), load_split(data, "val"), cfg.block_size, cfg.batch_size,
                          pad_id=tokenizer.eot_id, seed=cfg.seed)
    line = resolve_auto(cfg, device=torch.device("cpu"), rows_per_epoch=batches.rows_per_epoch,
                        val_rows=batches.val_rows, chosen=chosen)
    print(f"== {name}: {line}", flush=True)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    fmt = chat_format_for(tokenizer)
    rows = []
    steps_per_epoch = math.ceil(batches.rows_per_epoch / cfg.batch_size)

    def on_eval(m, _opt, state):
        epoch = state.iteration / steps_per_epoch
        if epoch < args.probe_from:
            return
        for shrink in args.shrink:  # the LoRA update scaled toward the base (1: as trained)
            lora = [x for x in m.modules() if isinstance(x, LoRALinear)]
            for x in lora:
                x.scale *= shrink
            p = probe(m, tokenizer, fmt, system_prompt, replay_val)
            for x in lora:
                x.scale /= shrink
            rows.append({"variant": name, "epoch": epoch, "step": state.iteration, "shrink": shrink,
                         "train_loss": round(state.history[-1]["train_loss"], 4),
                         "val_loss": round(state.history[-1]["val_loss"], 4), **p})
            print(json.dumps(rows[-1]), flush=True)
        m.train()

    anchor = KLToBase(model, cfg.kl) if cfg.kl else None
    trainer = Trainer(model.to(device), batches, cfg, device, Distributed(), on_eval=on_eval, progress=False,
                      anchor=anchor)
    t0 = time.perf_counter()
    trainer.run()
    print(f"   {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(BUNDLED))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--probe-from", type=float, default=0.0, help="probe only from this epoch on")
    p.add_argument("--shrink", type=lambda t: [float(x) for x in t.split(",")], default=[1.0],
                   help="comma-separated factors the LoRA update is scaled by when probing (default 1)")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--json", default=None, help="write every row to this file")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="finetune-sweep-") as tmp:
        work = Path(tmp)
        log = write_benchmark_log(work / "chat_history.jsonl")
        base, tokenizer, _ = load_checkpoint(args.base, device=args.device)
        selections, _ = select_exchanges(conversations(read_history(log)))
        replay_all = replay_examples(base, tokenizer, 32, usual_system_prompt(selections))
        del base
        for name in names:
            rows += run_variant(name, VARIANTS[name], args, log, work, replay_all)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
