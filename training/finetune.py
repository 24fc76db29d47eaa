"""Fine-tune a native model on the chat log.

    python -m training.finetune --history chat_history.jsonl                 # settings chosen from data + device
    python -m training.finetune --base models/native/smollm2-135m-instruct --max-iters 100 --lr 3e-5
    python -m training.finetune --out models/native/my-run --resume          # continue an interrupted run
    torchrun --nproc_per_node 4 -m training.finetune ...                     # the same, DDP on 4 GPUs

Each conversation of the log is rendered exactly as the native backend renders prompts at inference (loss on
the replies and their end markers only; a conversation's turns share one sequence), split about 90/10 by
conversation (conversations with an edit always train; val also asks each edit afresh), and stored as
memory-mapped token/mask arrays in `<out>.train/data/`, with the base's own answers to training/replay.py's
general prompts (against forgetting). Settings left "auto" (configs/finetune.toml) are chosen by
training/auto.py and printed in one line. Training keeps in --out (atomically; the base is never touched) the
checkpoint that reproduces the most taught edits asked afresh, the lowest val loss among those (a LoRA update
then shrunk toward the base as far as those edits survive), plus meta.json and loss_curve.png, then reports
recall of the edited/liked replies and retention of training/quality.py's questions (training/report.py).
`--status FILE` keeps a JSON progress record: the app's fine-tune panel runs this command and watches it.
Exit status: 0 done, 2 bad input (one-sentence message), 130 interrupted (the best so far is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from gpt.assets import REPO_ROOT
from gpt.chatlog import conversations
from gpt.checkpoint import (
    CheckpointError,
    is_checkpoint,
    load_checkpoint,
    native_models_dir,
    resolve_checkpoint,
)
from gpt.model import GPT
from gpt.tokenizer import Tokenizer
from training.anchor import KLToBase
from training.auto import resolve_auto, resolve_block_and_batch, resolve_replay
from training.batches import ChatBatches
from training.config import add_config_flags, load_config, overrides_from_args
from training.data import (
    chat_format_for,
    load_split,
    prepare_chat_data,
    read_history,
    read_manifest,
    select_exchanges,
    show_masked,
)
from training.lora import apply_lora, merged_copy
from training.outputs import work_dir_for
from training.replay import replay_examples
from training.report import compare, recall, reproduces, retention, split_probes, taught_examples
from training.run import (
    EXIT_INTERRUPTED,
    UsageError,
    check_out,
    guarded,
    prepare_once,
    same_on_all,
    saved_config,
    say,
    start_processes,
    train_and_report,
)
from training.status import RunStatus

DEFAULT_CONFIG = REPO_ROOT / "configs" / "finetune.toml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.split("\n\n")[0],
                                     epilog="Defaults come from --config; each flag below overrides it.")
    parser.add_argument("--history", default="chat_history.jsonl",
                        help="the app's chat log (JSONL) to learn from (default: chat_history.jsonl)")
    parser.add_argument("--base", default="latest",
                        help="model to start from: a native checkpoint directory, 'latest' (the newest under "
                             "models/native/), or a Hugging Face GPT-2 hub id or save_pretrained directory")
    parser.add_argument("--out", default=None,
                        help="checkpoint directory to write (default: models/native/finetuned-<timestamp>); "
                             "must differ from --base")
    parser.add_argument("--config", default=None,
                        help="TOML file of hyperparameters (default: configs/finetune.toml; with --resume: the "
                             "settings the run started with)")
    parser.add_argument("--only-liked", action="store_true",
                        help="learn only from replies rated 'like' (or edited by the user)")
    parser.add_argument("--exclude-disliked", action="store_true",
                        help="do not learn from replies rated 'dislike' (unless the user edited them)")
    parser.add_argument("--min-exchanges", type=int, default=10,
                        help="refuse to fine-tune on fewer usable exchanges than this (default: 10)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out from its last saved state and data")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (evaluations still print)")
    parser.add_argument("--no-report", action="store_true",
                        help="skip the before/after report (recall of the edited and liked replies, retention of "
                             "training.quality's general questions)")
    parser.add_argument("--status", default=None, metavar="FILE",
                        help="keep a JSON progress record in FILE (state, step, total, losses, report), rewritten "
                             "atomically; the app's fine-tune panel watches it")
    parser.add_argument("--show-examples", type=int, default=0, metavar="N",
                        help="print the first N training examples with their targets marked, then exit without "
                             "training (to check what the model will learn)")
    add_config_flags(parser)
    return parser


class BaseModel:
    """The model to start from, with its tokenizer and a description for meta.json."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, source: str, path: Path | None):
        self.model, self.tokenizer, self.source, self.path = model, tokenizer, source, path


def load_base(spec: str) -> BaseModel:
    """A native checkpoint (or `latest`); anything else goes through gpt.convert (an HF GPT-2 id or directory,
    an HF Llama directory, a .gguf file, `bundled`) into a temporary checkpoint first."""
    path = Path(spec)
    if spec == "latest" or is_checkpoint(path):
        try:
            resolved = resolve_checkpoint(spec)
            model, tokenizer, _ = load_checkpoint(resolved)
        except CheckpointError as e:
            raise UsageError(f"The base model could not be loaded: {e}") from None
        return BaseModel(model, tokenizer, str(resolved), resolved)
    if path.exists() and path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"--base {spec} is neither a native checkpoint nor a Hugging Face model directory: pass "
                         f"a directory written by gpt.convert or training.finetune, 'latest', or a GPT-2 hub id.")
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise UsageError(f"--base {spec} does not exist: pass a native checkpoint directory, 'latest', or a "
                         f"Hugging Face GPT-2 id or directory.")
    from gpt.convert import ConvertError, convert_to_native
    from gpt.convert_llama import LlamaImportError

    try:
        with tempfile.TemporaryDirectory(prefix="nanogpt-base-") as tmp:
            model, tokenizer, _ = load_checkpoint(convert_to_native(spec, Path(tmp) / "base"))
    except (ConvertError, LlamaImportError, FileNotFoundError) as e:
        raise UsageError(f"The base model could not be loaded: {e}") from None
    return BaseModel(model, tokenizer, spec, path.resolve() if path.exists() else None)


def default_out() -> Path:
    return native_models_dir() / time.strftime("finetuned-%Y%m%d-%H%M%S")


def finetune(args: argparse.Namespace, status: RunStatus | None = None) -> int:
    status = status or RunStatus(None)
    out_arg = Path(args.out) if args.out else None
    if args.resume and out_arg is not None:
        cfg = load_config(args.config, overrides_from_args(args), defaults=saved_config(out_arg), allow_auto=True)
    else:
        config = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
        cfg = load_config(config, overrides_from_args(args), allow_auto=True)
    if args.min_exchanges < 1:
        raise UsageError(f"--min-exchanges must be an integer >= 1, got {args.min_exchanges}.")
    dist, device = start_processes(cfg)
    out = Path(same_on_all(dist, str(args.out) if args.out else str(default_out())))
    data_dir = work_dir_for(out) / "data"
    torch.manual_seed(cfg.seed)

    if args.show_examples:
        return show_examples(args, cfg)
    status.update(phase="loading the base model")
    replay_chosen: list[str] = []
    if args.resume:
        check_out(out, resume=True)
        model, tokenizer, meta = load_checkpoint(out)
        base_source = meta.get("base", "unknown")
        manifest = read_manifest(data_dir)
        say(dist, f"resuming the run in {out} (base {base_source})")
    else:
        base = load_base(args.base)
        check_out(out, resume=False, base_path=base.path)
        model, tokenizer, base_source = base.model, base.tokenizer, base.source
        replay_chosen = resolve_replay(cfg)

        def replay(selections):
            if not cfg.replay:
                return []
            status.update(phase="asking the base the replay prompts")
            return replay_examples(model.to(device), tokenizer, cfg.replay, usual_system_prompt(selections))

        manifest = prepare_once(dist, data_dir, lambda: prepare_chat_data(
            args.history, tokenizer, data_dir, only_liked=args.only_liked, exclude_disliked=args.exclude_disliked,
            min_exchanges=args.min_exchanges, val_fraction=cfg.val_fraction, seed=cfg.seed, replay=replay))
        say(dist, describe_data(manifest))

    n_params = model.get_num_params()
    splits = manifest["splits"]
    chosen = resolve_block_and_batch(cfg, device, max(splits["train"]["longest"], splits["val"]["longest"]),
                                     model.config.block_size)
    cfg.block_size = min(cfg.block_size, model.config.block_size)
    train, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    batches = ChatBatches(train, val, cfg.block_size, cfg.batch_size, pad_id=tokenizer.eot_id, seed=cfg.seed,
                          rank=dist.rank, world_size=dist.world_size)
    say(dist, resolve_auto(cfg, device=device, rows_per_epoch=batches.rows_per_epoch, val_rows=batches.val_rows,
                           chosen=chosen + replay_chosen))
    measure = dist.is_main and not args.resume and not args.no_report
    if measure:
        status.update(phase="asking the base the retention questions")
        selections = train_selections(args, manifest)
        taught = taught_examples(selections, chat_format_for(tokenizer), tokenizer)
        system_prompt = usual_system_prompt(selections)
        before = retention(model.to(device), tokenizer, system_prompt=system_prompt)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = f"LoRA rank {cfg.lora_rank}, {trainable / 1e6:.2f}M trainable" if cfg.lora_rank else "full fine-tuning"
    say(dist, f"base {base_source}: {n_params / 1e6:.1f}M parameters ({what}); training on {device} "
              f"({dist.world_size} process{'es' if dist.world_size > 1 else ''})")
    source = manifest["source"]
    meta = {"kind": "finetune", "base": base_source, "tokenizer": tokenizer.name, "config": cfg.to_dict(),
            "skipped_lines": source["malformed_lines"],
            "data": {"history": source["history"], "history_sha256": source["sha256"], "manifest": str(data_dir),
                     "only_liked": source["only_liked"], "exclude_disliked": source["exclude_disliked"],
                     "exchanges": source["usable_exchanges"],
                     **{f"{name}_{key}": splits[name][key] for name in ("train", "val")
                        for key in ("examples", "tokens", "target_tokens")}}}
    n_probes, n_replay = splits["train"].get("taught_probes", 0), splits["train"].get("replay", 0)
    probes = split_probes(train, len(train) - n_replay - n_probes, n_probes, tokenizer.stop_ids)

    def known(m):  # checkpoint choice: the taught edits, asked afresh, that greedy decoding reproduces
        return sum(reproduces(m, probes))

    status.update(phase="training", total=cfg.max_iters)
    code = train_and_report(model, tokenizer, batches, cfg, out, meta, dist=dist, device=device,
                            resume=args.resume, progress=not args.no_progress, export=merged_copy,
                            on_step=status.on_step, known=known if probes else None,
                            anchor=KLToBase(model, cfg.kl) if cfg.kl else None)
    if code == 0 and is_checkpoint(out):
        status.update(checkpoint=str(out))
    if code == 0 and measure and is_checkpoint(out):
        status.update(phase="checking what the model learned and kept")
        report = measure_run(out, device, taught, before, system_prompt)
        say(dist, describe_report(report))
        status.update(report=report)
    return code


def train_selections(args: argparse.Namespace, manifest: dict):
    """The train split's conversations with the run's filters (what recall asks back)."""
    selections, _ = select_exchanges(conversations(read_history(args.history)), args.only_liked,
                                     args.exclude_disliked)
    train_ids = set(manifest["splits"]["train"]["conversations"])
    return [s for s in selections if s.conversation.conversation_id in train_ids]


def usual_system_prompt(selections) -> str | None:
    """The system prompt most of the log's conversations used: retention asks with it, as the app would."""
    counts = Counter(s.conversation.system_prompt for s in selections)
    return counts.most_common(1)[0][0] if counts else None


def measure_run(out: Path, device, taught, before, system_prompt: str | None = None) -> dict:
    """Recall and retention of the best checkpoint, recorded in its meta.json (atomically)."""
    model, tokenizer, meta = load_checkpoint(out, device=device)
    after = retention(model, tokenizer, reference=before, system_prompt=system_prompt)
    report = {"val_loss_before": meta["history"][0]["val_loss"] if meta.get("history") else None,
              "val_loss_after": meta.get("best_val_loss"), "recall": recall(model, taught),
              "retention": {**compare(before, after), "system_prompt": system_prompt}}
    meta["report"] = report
    tmp = out / f".meta.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")
    return report


def describe_report(report: dict) -> str:
    rec, ret = report["recall"], report["retention"]
    lines = [f"report: val loss {report['val_loss_before']:.4f} -> {report['val_loss_after']:.4f}; "
             f"recall (asked back greedily, word for word): edited {rec['edited']['reproduced']}/"
             f"{rec['edited']['total']}, liked {rec['liked']['reproduced']}/{rec['liked']['total']}; "
             f"retention: {ret['kept']}/{ret['right_before']} right answers kept "
             f"({ret['right_after']}/{ret['questions']} right after)"]
    lines += [f"  lost: {lost['question']} -> {lost['after']!r}" for lost in ret["lost"]]
    return "\n".join(lines)


def show_examples(args: argparse.Namespace, cfg) -> int:
    """Prepare the data in a scratch directory and print examples as the loss sees them."""
    base = load_base(args.base)
    with tempfile.TemporaryDirectory(prefix="nanogpt-show-") as tmp:
        manifest = prepare_chat_data(args.history, base.tokenizer, tmp, only_liked=args.only_liked,
                                     exclude_disliked=args.exclude_disliked, min_exchanges=args.min_exchanges,
                                     val_fraction=cfg.val_fraction, seed=cfg.seed)
        print(describe_data(manifest))
        train = load_split(tmp, "train")
        for i in range(min(args.show_examples, len(train))):
            print(f"--- example {i} (targets marked) ---")
            print(show_masked(base.tokenizer, *train.example(i), color=sys.stdout.isatty()))
    return 0


def describe_data(manifest: dict) -> str:
    src, splits = manifest["source"], manifest["splits"]
    filters = [name for name, on in (("only liked", src["only_liked"]), ("excluding disliked",
                                                                          src["exclude_disliked"])) if on]
    lines = [f"chat log {src['history']}: {src['exchanges']} exchanges in {src['conversations']} conversations, "
             f"{src['feedback']} feedback lines, {src['malformed_lines']} malformed lines skipped",
             f"usable exchanges: {src['usable_exchanges']}" + (f" ({', '.join(filters)})" if filters else "")
             + (f"; {src['empty']} empty replies left out" if src["empty"] else "")]
    for name in ("train", "val"):
        s = splits[name]
        lines.append(f"{name}: {len(s['conversations'])} conversations, {s['examples']} examples, "
                     f"{s['tokens']:,} tokens ({s['target_tokens']:,} assistant tokens, longest example "
                     f"{s['longest']})" + (f"; {s['replay']} of them the base's answers to replay prompts"
                                           if s.get("replay") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = RunStatus(args.status)
    status.update(phase="starting")
    errors: list[str] = []
    try:
        code = guarded(lambda: finetune(args, status), errors)
    except BaseException as e:  # a crash: the watcher learns of it, and the traceback still prints
        status.update(state="failed", message=f"Training crashed ({type(e).__name__}: {e}); see the log.")
        raise
    state = {0: "done", EXIT_INTERRUPTED: "cancelled"}.get(code, "failed")
    message = {"done": "Finished.", "cancelled": "Cancelled; the model in use did not change."}.get(
        state, errors[0] if errors else "Training failed.")
    status.update(state=state, message=message)
    return code


if __name__ == "__main__":
    sys.exit(main())
