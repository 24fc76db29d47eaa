"""The learning loop end to end: the default fine-tuning command on a realistic chat log, and what it learned.

    python -m benchmarks.finetune_loop                       # the bundled SmolLM2, default settings, CPU
    python -m benchmarks.finetune_loop --threads 2 --json    # as above, one JSON object as the last line
    python -m benchmarks.finetune_loop -- --lr 5e-4          # extra flags after -- go to training.finetune

Writes benchmarks.finetune_log's 35-exchange log (8 facts taught by edited replies, 10 liked answers),
runs `python -m training.finetune --history LOG` with no hyperparameter flags in a child process (base:
the newest native checkpoint of a scratch models directory holding only the base), and prints its wall
time and peak memory (the child's max RSS), then asks the fine-tuned model each fact as taught and in other
words (greedy; right when the reply contains the fact's key words, whole: `fact_right`) and prints the run's own report
(recall, retention on training.quality). The machine's load average is printed with the figures: on a
shared machine the wall time depends on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.finetune_log import FACTS, write_benchmark_log
from gpt.assets import REPO_ROOT
from gpt.chat_format import ChatFormat
from gpt.checkpoint import is_checkpoint, load_checkpoint
from training.data import fresh_exchange
from training.report import greedy_answers

BUNDLED = REPO_ROOT / "models" / "native" / "smollm2-135m-instruct"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fact_right(fact, reply: str) -> bool:
    """Whether `reply` states the fact: its key words, whole and in order (case-insensitive), as the retention
    check judges answers; "Harbor" alone or "cellos" do not count."""
    return bool(re.search(rf"(?<!\w){re.escape(fact.key)}(?!\w)", reply, re.IGNORECASE))


def ask_facts(checkpoint: Path, system_prompt: str | None) -> dict:
    """Each fact as taught and in other words, asked greedily with the log's system prompt (as the app asks)."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    fmt = ChatFormat.for_tokenizer(tokenizer)
    asked = [(fact, kind, question) for kind in ("taught", "paraphrased") for fact in FACTS
             for question in [fact.question if kind == "taught" else fact.paraphrase]]
    replies = greedy_answers(model, tokenizer, [fresh_exchange(fmt, q, system_prompt)[0]
                                                for _, _, q in asked])
    out = {"taught": [], "paraphrased": []}
    for (fact, kind, question), ids in zip(asked, replies, strict=True):
        reply = tokenizer.decode(ids)
        out[kind].append({"question": question, "reply": reply, "right": fact_right(fact, reply)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(BUNDLED), help="native checkpoint to fine-tune (default: the bundled one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: all cores)")
    p.add_argument("--keep", default=None, help="keep the scratch directory here instead of a temporary one")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("extra", nargs="*", help="flags for training.finetune (after --)")
    args = p.parse_args(argv)
    base = Path(args.base).resolve()
    if not is_checkpoint(base):
        p.error(f"--base {base} is not a native checkpoint (run `make setup` for the bundled one)")
    with tempfile.TemporaryDirectory(prefix="finetune-loop-") as tmp:
        root = Path(args.keep or tmp)
        models = root / "models"
        models.mkdir(parents=True, exist_ok=True)
        if not (models / base.name).exists():
            (models / base.name).symlink_to(base)
        log = write_benchmark_log(root / "chat_history.jsonl")
        env = {**os.environ, "NANOGPT_CHAT_MODELS": str(models), "PYTHONUNBUFFERED": "1"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        command = [sys.executable, "-m", "training.finetune", "--history", str(log), "--no-progress", *args.extra]
        load_before = load_average()
        print(f"$ NANOGPT_CHAT_MODELS={models} {' '.join(command[1:])}   (load average {load_before})", flush=True)
        t0 = time.perf_counter()
        result = subprocess.run(command, env=env, cwd=REPO_ROOT)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_rss, cpu_s = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
        load_after = load_average()
        if result.returncode != 0:
            print(f"training.finetune exited with status {result.returncode}", file=sys.stderr)
            return 1
        out = next(d for d in models.iterdir() if d.name.startswith("finetuned-") and is_checkpoint(d))
        meta = json.loads((out / "meta.json").read_text())
        facts = ask_facts(out, (meta.get("report") or {}).get("retention", {}).get("system_prompt"))
    report = meta.get("report") or {}
    taught = sum(f["right"] for f in facts["taught"])
    paraphrased = sum(f["right"] for f in facts["paraphrased"])
    ret = report.get("retention", {})
    figures = {"wall_s": round(wall, 1), "cpu_s": round(cpu_s, 1), "peak_rss_gib": round(peak_rss / 2 ** 30, 2),
               "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
               "load_before": load_before, "load_after": load_after, "iterations": meta.get("iterations"),
               "stopped": meta.get("stopped"), "facts_taught": f"{taught}/{len(FACTS)}",
               "facts_paraphrased": f"{paraphrased}/{len(FACTS)}",
               "retention_kept": f"{ret.get('kept')}/{ret.get('right_before')}",
               "retention_lost": [x["question"] for x in ret.get("lost", [])],
               "recall": report.get("recall"), "val_loss": [report.get("val_loss_before"),
                                                            report.get("val_loss_after")],
               "settings": {k: meta["config"][k] for k in ("lora_rank", "lr", "max_iters", "batch_size", "block_size")}}
    for kind in ("taught", "paraphrased"):
        for f in facts[kind]:
            print(f"  [{'x' if f['right'] else ' '}] {f['question']} -> {f['reply']!r}")
    print(f"wall {wall:.1f} s (CPU time {cpu_s:.1f} s), peak RSS {peak_rss / 2 ** 30:.2f} GiB, load average {load_before} -> {load_after} "
          f"on {os.cpu_count()} cores; facts as taught {taught}/{len(FACTS)}, paraphrased "
          f"{paraphrased}/{len(FACTS)}; retention kept {figures['retention_kept']}, lost "
          f"{len(figures['retention_lost'])} {figures['retention_lost']}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
