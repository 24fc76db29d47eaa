"""What a fine-tuning run did: recall of what the log taught, and retention of what the base knew.

    taught = taught_examples(selections, fmt, tokenizer)    # the edited and liked replies, asked alone
    before = retention(base_model, tokenizer)               # RetentionResult: answers to training.quality
    after = retention(model, tokenizer, reference=before)
    report = {"recall": recall(model, taught), "retention": compare(before, after)}

Recall asks each reply the user edited or liked back as a fresh conversation (its question alone, as a
user would ask it again) and counts the replies the model now reproduces greedily, word for word. That is
checked by teacher forcing, which is exact and one batched forward pass: greedy decoding reproduces a
reply if and only if, fed the reply, the model's argmax at every position up to and including the end
marker is the reply's next token.

Retention answers the fixed questions of `training.quality` greedily. After training, a question whose
base answer the model still reproduces (teacher forcing again) keeps that answer without decoding; only
the changed ones are decoded, so the after-check costs about one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt.chat_format import ChatFormat
from gpt.engine import Engine
from gpt.model import GPT
from gpt.sampling import SamplingParams
from gpt.slots import bytes_per_position
from gpt.tokenizer import Tokenizer
from training.data import fresh_exchange
from training.quality import QUESTIONS, Question, is_right

MAX_ANSWER_TOKENS = 32  # retention answers are one sentence; a longer one is cut (and judged as it stands)


@dataclass
class Taught:
    """One reply the log teaches, as a fresh one-question conversation."""

    question: str
    reply: str
    kind: str  # "edited" or "liked"
    prompt_ids: list[int]
    reply_ids: list[int]  # up to and including the end marker


def through_first_stop(ids: list[int], stop_ids) -> list[int]:
    """`ids` up to and including the first stop id (all of them when none): what greedy decoding must produce
    before it stops."""
    end = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids) - 1)
    return ids[:end + 1]


def taught_examples(selections, fmt: ChatFormat, tokenizer: Tokenizer) -> list[Taught]:
    """The edited and liked target replies of the selected exchanges (training.data.Selection)."""
    out = []
    for sel in selections:
        conv = sel.conversation
        for index in sel.turns:
            ex = conv.exchanges[index]
            edited, liked = ex.turn in conv.edits, conv.ratings.get(ex.turn) == "like"
            if not (edited or liked):
                continue
            reply = conv.edits.get(ex.turn, ex.assistant)
            prompt, ids = fresh_exchange(fmt, ex.user, conv.system_prompt, reply)
            out.append(Taught(ex.user, reply, "edited" if edited else "liked", prompt,
                              through_first_stop(ids, tokenizer.stop_ids)))
    return out


@torch.no_grad()
def reproduces(model: GPT, sequences: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[bool]:
    """For each (prompt, reply) pair: would greedy decoding from `prompt` produce exactly `reply`?"""
    model.eval()
    device = model.transformer.wte.weight.device
    limit = model.config.block_size
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        rows = [(p + r)[-limit:] for p, r in chunk]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):  # right padding: causal attention never lets it reach real tokens
            ids[i, :len(row)] = torch.tensor(row)
        logits = model(ids.to(device))
        guesses = logits.argmax(-1).cpu()
        for i, (row, (_, reply)) in enumerate(zip(rows, chunk, strict=True)):
            n = len(reply)
            predicted = guesses[i, len(row) - n - 1:len(row) - 1]
            out.append(bool(n) and predicted.tolist() == list(reply))
    return out


def split_probes(split, start: int, count: int, stop_ids) -> list[tuple[list[int], list[int]]]:
    """Examples `start`..`start + count` of a prepared split (training.data: the taught probes follow the
    conversations) as (prompt, reply through its first end marker) pairs for `reproduces`."""
    pairs = []
    for i in range(start, start + count):
        ids, mask = (a.tolist() for a in split.example(i))
        first = mask.index(1)
        pairs.append((ids[:first], through_first_stop(ids[first:], stop_ids)))
    return pairs


def recall(model: GPT, taught: list[Taught]) -> dict:
    """How many of the taught replies the model reproduces, by kind, and which questions it misses."""
    hits = reproduces(model, [(t.prompt_ids, t.reply_ids) for t in taught])
    report = {}
    for kind in ("edited", "liked"):
        pairs = [(t, h) for t, h in zip(taught, hits, strict=True) if t.kind == kind]
        report[kind] = {"reproduced": sum(h for _, h in pairs), "total": len(pairs),
                        "missed": [t.question for t, h in pairs if not h]}
    return report


@dataclass
class RetentionResult:
    answers: list[str]
    right: list[bool]

    @property
    def n_right(self) -> int:
        return sum(self.right)


def greedy_answers(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]],
                   max_new_tokens: int = MAX_ANSWER_TOKENS) -> list[list[int]]:
    """Greedy replies to all `prompts`, decoded together in one batch by one engine (seconds, not a minute)."""
    if not prompts:
        return []
    longest = max(map(len, prompts)) + max_new_tokens + 1
    capacity = min(len(prompts), 16)
    engine = Engine(model, graphs=False, capacity=capacity,
                    kv_budget_bytes=(capacity + 1) * bytes_per_position(model) * longest)
    try:
        replies = [engine.generate(p, max_new_tokens, SamplingParams(temperature=0), stop_ids=tokenizer.stop_ids)
                   for p in prompts]  # all submitted first, so the scheduler batches them
        return [list(r) for r in replies]
    finally:
        engine.scheduler.close()


def greedy_answer(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int],
                  max_new_tokens: int = MAX_ANSWER_TOKENS) -> list[int]:
    return greedy_answers(model, tokenizer, [prompt_ids], max_new_tokens)[0]


def retention(model: GPT, tokenizer: Tokenizer, reference: RetentionResult | None = None,
              questions: tuple[Question, ...] = QUESTIONS, system_prompt: str | None = None) -> RetentionResult:
    """Greedy answers to the retention questions (asked with `system_prompt`, as the app asks them); answers
    equal to `reference`'s are confirmed by teacher forcing instead of decoded again."""
    fmt = ChatFormat.for_tokenizer(tokenizer)
    prompts = [fresh_exchange(fmt, q.question, system_prompt)[0] for q in questions]
    answers: list[str | None] = [None] * len(questions)
    if reference is not None:
        pairs = []
        for prompt, answer in zip(prompts, reference.answers, strict=True):
            ids = fmt.encode_prompt(answer)
            # Unless the reference was cut at the limit, greedy decoding also produced the end marker.
            pairs.append((prompt, ids if len(ids) >= MAX_ANSWER_TOKENS else ids + [tokenizer.eot_id]))
        for i, same in enumerate(reproduces(model, pairs)):
            if same:
                answers[i] = reference.answers[i]
    todo = [i for i, a in enumerate(answers) if a is None]
    for i, ids in zip(todo, greedy_answers(model, tokenizer, [prompts[i] for i in todo]), strict=True):
        answers[i] = tokenizer.decode(ids)
    right = [is_right(a, q) for a, q in zip(answers, questions, strict=True)]
    return RetentionResult(answers, right)


def compare(before: RetentionResult, after: RetentionResult, questions: tuple[Question, ...] = QUESTIONS) -> dict:
    """Retention as counts, plus the questions whose right answer was lost (with the new answer)."""
    lost = [{"question": q.question, "before": b, "after": a}
            for q, b, a, rb, ra in zip(questions, before.answers, after.answers, before.right, after.right,
                                       strict=True) if rb and not ra]
    return {"questions": len(questions), "right_before": before.n_right, "right_after": after.n_right,
            "kept": sum(rb and ra for rb, ra in zip(before.right, after.right, strict=True)), "lost": lost}
