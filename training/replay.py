"""Replay: the base model's own answers to general prompts, trained alongside the chat log against forgetting.

    examples = replay_examples(base_model, tokenizer, count=24, system_prompt="You are ...")
    # [(ids, mask)]: each prompt asked afresh, the base's greedy answer as the target

A few dozen edits pull a small model hard: trained on them alone it learns the facts and forgets general
answers ("There are 12 continents"). Training at the same time on what the base itself answers to ordinary
prompts anchors everything the log does not mention: the loss on those answers is already low for the base
and rises as soon as the weights drift from it, so the optimizer learns the edits in the directions that
leave the base's answers alone (a cheap stand-in for a KL-to-base penalty; it costs one batched greedy
decode before training and some tokens per step).

REPLAY_PROMPTS is shipped with the project and is disjoint from training.quality's retention questions
(tests check it): the retention report must measure knowledge the run was never shown, so replaying the
retention questions themselves would be cheating.
"""

from __future__ import annotations

from gpt.model import GPT
from gpt.tokenizer import Tokenizer
from training.data import chat_format_for, fresh_exchange
from training.report import greedy_answers

MAX_REPLAY_TOKENS = 48  # the base's answer is cut here (a cut answer trains without an end marker)

# Ordinary requests of the kinds people ask a small assistant: facts, arithmetic, words, how-tos, small talk.
REPLAY_PROMPTS: tuple[str, ...] = (
    "What is the capital of Italy?",
    "What is the capital of Canada?",
    "How many minutes are in an hour?",
    "What is 10 minus 3?",
    "What is the largest animal on Earth?",
    "What do bees make?",
    "What is the freezing point of water in Celsius?",
    "Who painted the Mona Lisa?",
    "What is the main language spoken in Brazil?",
    "What is the opposite of up?",
    "How many sides does a triangle have?",
    "What is the closest star to Earth?",
    "Name a primary color.",
    "What is the longest river in Africa?",
    "How many months are in a year?",
    "What is the square root of 9?",
    "Give me a synonym for big.",
    "What do cows drink?",
    "What is the currency of the United Kingdom?",
    "How do I boil an egg?",
    "What is the plural of mouse?",
    "Which animal is known as the king of the jungle?",
    "What is 3 times 5?",
    "How many players are on a soccer team?",
    "What season comes after winter?",
    "What is the hardest natural substance?",
    "Who was the first person to walk on the Moon?",
    "What is the fastest land animal?",
    "How are you today?",
    "Can you give me a word that rhymes with cat?",
    "What shape has four equal sides?",
    "What organ pumps blood through the body?",
)


def replay_examples(model: GPT, tokenizer: Tokenizer, count: int, system_prompt: str | None = None,
                    prompts: tuple[str, ...] = REPLAY_PROMPTS) -> list[tuple[list[int], list[int]]]:
    """The first `count` replay prompts asked afresh (with `system_prompt`, as the app asks) and the base's
    greedy answers as targets: (ids, mask) training examples."""
    fmt = chat_format_for(tokenizer)
    chosen = prompts[:count]
    rendered = [fresh_exchange(fmt, p, system_prompt)[0] for p in chosen]
    answers = greedy_answers(model, tokenizer, rendered, MAX_REPLAY_TOKENS)
    # The ids exactly as the base produced them (through its end marker, or cut at the limit): no re-encoding.
    return [(prompt + list(answer), [0] * len(prompt) + [1] * len(answer))
            for prompt, answer in zip(rendered, answers, strict=True) if answer]
