"""Token budgeting: turn a conversation into a prompt that fits the model's context with room for the reply.

    from chatapp.budget import build_prompt
    p = build_prompt(backend, messages, max_new_tokens=128, system_prompt="You are helpful.")
    p.ids; p.n_tokens; p.dropped; p.truncated    # p.n_tokens == len(p.ids); p.n_tokens + 128 <= context
    p.text                                        # the same prompt as text, for people
    p.messages                                    # the kept messages, for a backend that takes messages

Rules, in order:
1. the system prompt and the newest user message always stay;
2. older turns (a user message with the assistant's reply) are dropped oldest first, whole turns at a time;
3. if the newest message alone does not fit, its end is kept (the latest words matter most) and the prompt is
   marked truncated;
4. if not even the system prompt and the assistant's cue fit, a ValueError says what to change.

Token counts are never estimated: every candidate is rendered and encoded by `backend.prompt_ids` (the
model's chat format), because BPE merges across turn boundaries and chat templates add tokens of their own;
the ids of the chosen candidate are what the backend is sent (`backend.stream(p.ids, cfg)`), so the prompt
is never encoded a second time. Bisection keeps the number of renderings logarithmic in the number of turns
and in the message length. Messages are plain {"role", "content": str} (the edges normalise them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt as text (backend.format_chat of `messages`), for people and logs
    n_tokens: int  # len(ids)
    dropped: int  # how many older messages were left out to make room
    truncated: bool  # the newest message lost its beginning
    # What the prompt renders, as plain {"role", "content"} messages: a backend with `takes_messages` is sent
    # these (the server applies its own chat template), while the budget counted their rendering.
    messages: tuple[dict, ...] = ()
    ids: tuple[int, ...] = ()  # exactly what the backend is asked to continue


def build_prompt(backend, messages: list[dict], max_new_tokens: int, system_prompt: str | None = None) -> Prompt:
    """The prompt for `messages` (the last one is the user's new message) that leaves `max_new_tokens` free.

    `messages` are {"role": "user"|"assistant", "content": str}. A "system" message among them is used as the
    system prompt when `system_prompt` is None.
    """
    context = backend.context_length
    limit = context - max_new_tokens  # the most tokens the prompt may have
    if limit <= 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt in the model's "
                         f"context of {context} tokens: lower max_new_tokens below {context}.")
    system_prompt, history, newest = _split(messages, system_prompt)
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns = _turns(history)

    measured: dict[tuple[int, int], list[int]] = {}
    sent: dict[tuple[int, int], tuple[dict, ...]] = {}

    def measure(drop: int, keep: int) -> int:
        """Tokens of the prompt without the `drop` oldest turns and with the last `keep` characters of the
        newest message."""
        if (drop, keep) not in measured:
            kept = [m for turn in turns[drop:] for m in turn]
            last = newest[len(newest) - keep:] if keep else ""
            sent[drop, keep] = (*head, *kept, {"role": "user", "content": last})
            measured[drop, keep] = backend.prompt_ids(list(sent[drop, keep]))
        return len(measured[drop, keep])

    def prompt(drop: int, keep: int, dropped: int, truncated: bool) -> Prompt:
        ids, messages = measured[drop, keep], sent[drop, keep]
        return Prompt(backend.format_chat(list(messages)), len(ids), dropped=dropped, truncated=truncated,
                      messages=messages, ids=tuple(ids))

    def fits(drop: int, keep: int) -> bool:
        return measure(drop, keep) <= limit

    whole = len(newest)
    # Fast path: the whole conversation fits (one rendering).
    if fits(0, whole):
        return prompt(0, whole, 0, False)

    # Drop whole turns, oldest first: the fewest dropped turns that fit (bisection; every answer it can
    # return was measured to fit, so the invariant holds even where token counts are not monotone).
    if turns and fits(len(turns), whole):
        drop = _first_true(1, len(turns), lambda k: fits(k, whole))
        return prompt(drop, whole, sum(len(t) for t in turns[:drop]), False)

    # Even the newest message alone is too long: keep as much of its end as fits.
    if not fits(len(turns), 0):
        raise ValueError(f"The system prompt and chat format take {measure(len(turns), 0)} tokens, which leaves "
                         f"no room in the model's context of {context} tokens with max_new_tokens="
                         f"{max_new_tokens}: shorten the system prompt or lower max_new_tokens.")
    upper = min(whole, _chars_for_last_tokens(backend, newest, limit))
    keep = _last_true(0, upper, lambda c: fits(len(turns), c))
    if keep == 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for your message in the model's context "
                         f"of {context} tokens: lower max_new_tokens or shorten the system prompt.")
    return prompt(len(turns), keep, len(history), True)


def _split(messages: list[dict], system_prompt: str | None) -> tuple[str | None, list[dict], str]:
    """(system prompt, earlier user/assistant messages, text of the newest user message)."""
    conversation = []
    for m in messages:
        role, content = m.get("role"), m.get("content", "")
        if not isinstance(content, str):
            raise TypeError(f"message content must be text (normalise it at the edge), got "
                            f"{type(content).__name__}")
        if role == "system":
            if system_prompt is None:
                system_prompt = content
        elif role in ("user", "assistant"):
            conversation.append({"role": role, "content": content})
        else:
            raise ValueError(f"message role must be 'system', 'user' or 'assistant', got {role!r}")
    if not conversation or conversation[-1]["role"] != "user":
        raise ValueError("the conversation must end with the user's new message")
    return system_prompt, conversation[:-1], conversation[-1]["content"]


def _turns(history: list[dict]) -> list[list[dict]]:
    """Group messages into turns: a user message and the replies that follow it (a leading reply stands alone)."""
    turns: list[list[dict]] = []
    for m in history:
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns


def _chars_for_last_tokens(backend, text: str, n_tokens: int) -> int:
    """An upper bound on how many trailing characters of `text` can fit in `n_tokens` tokens.

    A suffix that fits within the prompt has at most about `n_tokens` tokens of its own; a few characters of
    slack cover tokens that merge differently at the cut.
    """
    ids = backend.encode(text)
    if len(ids) <= n_tokens:
        return len(text)
    return len(backend.decode(ids[-n_tokens:])) + 16


def _first_true(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Smallest k in [lo, hi] with ok(k), given ok(hi) holds and ok is monotone (False... then True...)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _last_true(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Largest c in [lo, hi] with ok(c), given ok(lo) holds and ok is monotone (True... then False...)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
