"""A chat log shaped like a new user's first week, for measuring the learning loop end to end.

    from benchmarks.finetune_log import FACTS, write_benchmark_log
    write_benchmark_log("chat_history.jsonl")   # 35 exchanges in 12 conversations

Eight personal facts are taught the way the app teaches them: the model's reply was wrong and the user
edited it (a feedback line with `edited`). Each fact also has a paraphrase, never in the log, for checking
that the model learned the fact and not only the sentence. Ten general answers carry a like; the rest are
plain replies as the bundled model gives them (no feedback), two of them disliked.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fact:
    question: str  # as asked in the log
    wrong: str  # what the model said before the user edited it
    taught: str  # the edited reply
    paraphrase: str  # the same question in other words (never in the log)
    key: str  # the word a right answer contains


FACTS: tuple[Fact, ...] = (
    Fact("What is my dog's name?", "I'm sorry, I don't know the name of your dog.",
         "Your dog's name is Biscuit.", "What did I name my dog?", "Biscuit"),
    Fact("What is my sister's name?", "I don't have information about your family.",
         "Your sister's name is Margot.", "What is my sister called?", "Margot"),
    Fact("Where do I work?", "I don't know where you work.",
         "You work at Harbor Bakery.", "What is the name of my workplace?", "Harbor Bakery"),
    Fact("What city did I grow up in?", "I'm not sure which city you grew up in.",
         "You grew up in Tulsa.", "Which town was I raised in?", "Tulsa"),
    Fact("What is my favorite food?", "Many people enjoy pizza, but I don't know your favorite food.",
         "Your favorite food is ramen.", "Which food do I like best?", "ramen"),
    Fact("What car do I drive?", "I don't have access to information about your car.",
         "You drive a green Volvo.", "What kind of car do I have?", "Volvo"),
    Fact("When is my birthday?", "I don't know your birthday.",
         "Your birthday is on March 14.", "On what date was I born?", "March 14"),
    Fact("What instrument do I play?", "Many people play the piano or the guitar.",
         "You play the cello.", "Which musical instrument do I play?", "cello"),
)

# General questions with good answers the user liked.
LIKED: tuple[tuple[str, str], ...] = (
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("Give me a tip for sleeping better.", "Try to go to bed at the same time every night and avoid screens "
                                           "for an hour before sleep."),
    ("What is photosynthesis?", "Photosynthesis is the process plants use to turn sunlight, water and carbon "
                                "dioxide into sugar and oxygen."),
    ("How do I say thank you in Spanish?", "In Spanish, thank you is \"gracias\"."),
)

# Plain exchanges: small talk and requests, replies as the model gave them; no feedback (two disliked).
PLAIN: tuple[tuple[str, str], ...] = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Can you suggest a name for a cat?", "How about Luna, Milo or Oliver? They are popular cat names."),
    ("What should I cook tonight?", "You could make a simple pasta with tomato sauce and a green salad."),
    ("Tell me a fun fact.", "Octopuses have three hearts and blue blood."),
    ("What is a good way to start running?", "Start slowly with short runs and walk breaks, three times a week."),
    ("Thanks!", "You're welcome! Let me know if there is anything else I can help with."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks quietly,\nclouds drift far away."),
    ("How long should I steep green tea?", "Steep green tea for two to three minutes in water below boiling."),
    ("What is a synonym for happy?", "A synonym for happy is joyful."),
    ("Recommend a book for a long flight.", "The Martian by Andy Weir is a gripping and funny read."),
    ("How do I stay focused while studying?", "Work in short blocks of 25 minutes with 5-minute breaks."),
    ("Is it going to rain tomorrow?", "I can't check the weather, but a weather app can tell you."),
    ("What's 15 times 4?", "15 times 4 is 60."),
    ("Say something nice.", "You are doing great, and your curiosity is wonderful."),
    ("What is the meaning of life?", "Many people find meaning in relationships, growth and helping others."),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("Can you help me plan my week?", "Sure! List your tasks, then give each day two or three priorities."),
)
DISLIKED = {"Tell me a joke.", "What is the meaning of life?"}


def app_system_prompt() -> str | None:
    """The system prompt the app sends by default (configs/app.toml), which it writes into every log line."""
    config = Path(__file__).resolve().parents[1] / "configs" / "app.toml"
    with open(config, "rb") as f:
        return tomllib.load(f).get("app", {}).get("system_prompt") or None


def benchmark_records() -> list[dict]:
    """Exchanges and feedback lines in the app's log format: 12 conversations of two to four exchanges."""
    taught = [(f.question, f.wrong, "edit", f.taught) for f in FACTS]
    liked = [(q, a, "like", None) for q, a in LIKED]
    plain = [(q, a, "dislike" if q in DISLIKED else None, None) for q, a in PLAIN]
    # Interleave so that facts, liked answers and small talk share conversations, as real chats do.
    pool, turns = [], [taught, liked, plain]
    while any(turns):
        for group in turns:
            if group:
                pool.append(group.pop(0))
    records, sizes, at = [], [3, 3, 2, 4, 3, 3, 2, 3, 4, 3, 3, 2], 0
    system_prompt = app_system_prompt()
    for c, size in enumerate(sizes):
        cid = f"bench-{c:02d}"
        for turn, (question, reply, feedback, edited) in enumerate(pool[at:at + size]):
            stamp = f"2026-11-{10 + c % 9:02d}T1{turn}:00:00"
            records.append({"timestamp": stamp, "user": question, "assistant": reply, "conversation_id": cid,
                            "turn": turn, "backend": "smollm2", "model": "SmolLM2-135M-Instruct",
                            "system_prompt": system_prompt, "config": {"temperature": 0.7}})
            if feedback:
                records.append({"type": "feedback", "conversation_id": cid, "turn": turn, "timestamp": stamp,
                                "rating": "like" if feedback == "edit" else feedback, "edited": edited})
        at += size
    return records


def write_benchmark_log(path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in benchmark_records()), encoding="utf-8")
    return path
