"""The project's fixed set of plain general-knowledge questions with known answers, and how a reply is judged.

    from training.quality import QUESTIONS, is_right
    right = sum(is_right(ask(q.question), q) for q in QUESTIONS)

Used by `python -m benchmarks.quality` (are the app's defaults sensible?) and by fine-tuning's report
(retention: does a fine-tuned model keep what the base knew?). It lives in training/ because training may
import only gpt/ and itself; benchmarks and the app may import it. The questions are ones the bundled
SmolLM2-135M-Instruct answers right greedily, so a miss means a setting or a fine-tune broke something.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]  # any one of these, as a whole word or phrase, makes a reply right


QUESTIONS: tuple[Question, ...] = (
    Question("What is the capital of France?", ("Paris",)),
    Question("What is the capital of Japan?", ("Tokyo",)),
    Question("How many days are in a week?", ("7", "seven")),
    Question("What color is the sky on a clear day?", ("blue",)),
    Question("What is the chemical symbol for water?", ("H2O", "H₂O")),
    Question("How many legs does a spider have?", ("8", "eight")),
    Question("What is 2 + 2?", ("4", "four")),
    Question("Which ocean is the largest?", ("Pacific",)),
    Question("How many continents are there?", ("7", "seven")),
    Question("What is the tallest mountain in the world?", ("Everest",)),
    Question("What planet is known as the Red Planet?", ("Mars",)),
    Question("What is the opposite of hot?", ("cold",)),
)


def is_right(reply: str, question: Question) -> bool:
    """Whether `reply` contains one of the question's answers as a whole word (case-insensitive)."""
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in question.answers)
