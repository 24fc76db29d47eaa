"""Are the app's defaults sensible? Ask each backend plain questions with known answers and count the right ones.

    python -m benchmarks.quality                          # every configured backend that loads, seeds 1 2 3
    python -m benchmarks.quality --backends smollm2 native --seeds 1 2 3
    python -m benchmarks.quality --variant "greedy: temperature=0" --variant "no system: system_prompt=none"
    python -m benchmarks.quality --questions my_questions.json   # [{"question": ..., "answers": [...]}, ...]

Each question goes through the chat loop the app uses (chatapp.chat.respond: the budget, the chat format,
stop handling), as a new conversation, with the backend's own generation defaults
(backends.registry.generation_defaults) and the app's system prompt, exactly what `/chat` gets when a
caller passes no sampling arguments. A variant changes some of that (`name: field=value ...`; fields of
GenerationConfig, plus `system_prompt`, where `none` means no system message: the model's chat template
then adds its own default line, if it has one). The questions are training/quality.py's shipped set unless
--questions names a JSON file. Prints the share answered right per backend and variant, and every miss.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace

from backends import BackendError, GenerationConfig, create_backend
from backends.registry import generation_defaults, list_backends, load_config
from chatapp.chat import respond
from training.quality import QUESTIONS, Question, is_right

NO_SYSTEM = "none"


def parse_variant(text: str) -> tuple[str, dict]:
    """`name: temperature=0.2 system_prompt='Be brief.'` -> ("name", {...}); values are JSON or plain text."""
    name, _, rest = text.partition(":")
    if not rest:
        name, rest = text, text
    changes = {}
    for item in shlex.split(rest):
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {text!r}: {item!r} is not field=value")
        if field != "system_prompt" and field not in GenerationConfig.field_names():
            raise ValueError(f"variant {text!r}: unknown field {field!r}; use system_prompt or one of "
                             f"{', '.join(GenerationConfig.field_names())}")
        try:
            changes[field] = json.loads(value)
        except ValueError:
            changes[field] = value
    return name.strip(), changes


def load_questions(path: str | None) -> tuple[Question, ...]:
    if not path:
        return QUESTIONS
    with open(path, encoding="utf-8") as f:
        return tuple(Question(q["question"], tuple(q["answers"])) for q in json.load(f))


def ask(backend, key: str, question: str, cfg: GenerationConfig, system_prompt: str | None) -> str:
    reply = ""
    for update in respond(backend, [], question, cfg, system_prompt=system_prompt, backend_key=key):
        reply = update.text
    return reply


def run(config: dict, keys: list[str], seeds: list[int], variants: list[tuple[str, dict]],
        questions: tuple[Question, ...], max_new_tokens: int | None) -> list[dict]:
    app_system = (config.get("app") or {}).get("system_prompt") or None
    results = []
    for key in keys:
        try:
            backend = create_backend(key, config)
            backend.encode("load")  # load now, so a backend that cannot load is skipped with its reason
        except (BackendError, ValueError, OSError) as exc:
            print(f"{key}: skipped ({exc})", file=sys.stderr)
            continue
        defaults = generation_defaults(config, key)
        for name, changes in variants:
            changes = dict(changes)
            system = changes.pop("system_prompt", app_system)
            system = None if system in (None, "", NO_SYSTEM) else system
            cfg = replace(defaults, **changes)
            if max_new_tokens:
                cfg = replace(cfg, max_new_tokens=max_new_tokens)
            right, misses, started = 0, [], time.perf_counter()
            for seed in seeds:
                for q in questions:
                    reply = ask(backend, key, q.question, replace(cfg, seed=seed), system)
                    print("." if is_right(reply, q) else "x", end="", file=sys.stderr, flush=True)
                    if is_right(reply, q):
                        right += 1
                    else:
                        misses.append({"seed": seed, "question": q.question, "reply": reply})
            total = len(seeds) * len(questions)
            print(file=sys.stderr)
            results.append({"backend": key, "variant": name, "right": right, "total": total,
                            "share": right / total, "seconds": time.perf_counter() - started,
                            "config": {k: v for k, v in vars(cfg).items() if k != "seed"},
                            "system_prompt": system, "misses": misses})
            print(f"{key:>10}  {name:<28} {right:>3}/{total}  {100 * right / total:5.1f} %", flush=True)
            for miss in misses:
                print(f"    miss, seed {miss['seed']}: {miss['question']} -> {miss['reply'][:100]!r}", flush=True)
        backend.release()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="app config TOML (default: configs/app.toml)")
    p.add_argument("--backends", nargs="+", default=None, help="backend keys (default: every configured one)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="sampling seeds (default 1 2 3)")
    p.add_argument("--variant", action="append", default=[], metavar="'NAME: field=value ...'",
                   help="settings to try instead of the defaults (repeatable; quote a prompt with spaces)")
    p.add_argument("--questions", default=None, help="a JSON list of {question, answers} (default: the shipped set)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap replies at this many tokens (default: the backend's own default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results (with every reply missed) to this file")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        config = load_config(args.config)
        variants = [parse_variant(v) for v in args.variant] or [("defaults", {})]
        questions = load_questions(args.questions)
    except (BackendError, ValueError, OSError, KeyError) as exc:
        print(f"benchmarks.quality: {exc}", file=sys.stderr)
        return 2
    keys = args.backends or [b["key"] for b in list_backends(config)]
    results = run(config, keys, args.seeds, variants, questions, args.max_new_tokens)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
