"""Training data: the chat log (or a text file) as token and loss-mask arrays in memory-mapped files.

    manifest = prepare_chat_data("chat_history.jsonl", tokenizer, "run.train/data", min_exchanges=10)
    split = load_split("run.train/data", "train")      # tokens, mask, offsets (np.memmap)

Each conversation is rendered by `gpt.chat_format.ChatFormat.training_examples`, the same rendering the
native backend uses at inference: the prompt with mask 0 and each reply plus its end marker with mask 1,
one sequence per conversation. Conversations are split about 90/10 by a seeded hash of their id, so one
conversation never lands on both sides and a conversation once trained on never becomes validation data;
conversations with an edited reply always train, and each edit's question is also asked afresh, in both splits.

On disk, per split: `<split>.tokens.bin` (uint16 when the vocabulary fits, else uint32), `<split>.mask.bin`
(uint8) and `<split>.offsets.bin` (int64, example boundaries), and one `manifest.json` written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt.assets import sha256_of
from gpt.chat_format import ChatFormat
from gpt.chatlog import Conversation, conversations, read_log
from gpt.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
REPLAY_VAL_EVERY = 4  # a quarter of the replay examples are validation


class DataError(ValueError):
    """The training data cannot be used (missing log, too few exchanges, ...); the message says what to do."""


def chat_format_for(tokenizer: Tokenizer) -> ChatFormat:
    """The chat format the native backend uses for this tokenizer, bound to it (it encodes its own prompts)."""
    return ChatFormat.for_tokenizer(tokenizer)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


@dataclass
class Selection:
    """Which exchanges of each conversation become training targets (the rest stay as context)."""

    conversation: Conversation
    turns: list[int]  # indices into conversation.exchanges


def select_exchanges(convs: list[Conversation], only_liked: bool = False,
                     exclude_disliked: bool = False) -> tuple[list[Selection], dict]:
    """Apply the feedback filters. An edited reply counts as liked: the user wrote what it should have said.

    Disliked or unliked turns still appear as context of later turns (the model sees real histories at
    inference); they are only never a target. Replies that are empty after edits are never targets.
    """
    counts = {"liked": 0, "disliked": 0, "edited": 0, "empty": 0, "filtered_out": 0}
    selections = []
    for conv in convs:
        turns = []
        for index, ex in enumerate(conv.exchanges):
            rating, edited = conv.ratings.get(ex.turn), ex.turn in conv.edits
            counts["liked"] += rating == "like"
            counts["disliked"] += rating == "dislike"
            counts["edited"] += edited
            if not conv.edits.get(ex.turn, ex.assistant).strip():
                counts["empty"] += 1
                continue
            good = rating == "like" or edited
            if (only_liked and not good) or (exclude_disliked and rating == "dislike" and not edited):
                counts["filtered_out"] += 1
                continue
            turns.append(index)
        if turns:
            selections.append(Selection(conv, turns))
    return selections, counts


def split_by_conversation(selections: list[Selection], val_fraction: float,
                          seed: int) -> tuple[list[Selection], list[Selection]]:
    """Hold out the conversations whose seeded hash falls below `val_fraction` (at least one; two or more needed).

    A hash threshold, not a count, decides: as the log grows, a conversation that was trained on never moves
    to the validation side, so fine-tuning again from a fine-tuned checkpoint is validated on unseen chats.
    """
    if len(selections) < 2:
        raise DataError("The chat log has only one usable conversation; fine-tuning holds whole conversations "
                        "out for validation, so start at least one more conversation in the app.")

    def position(s: Selection) -> float:
        digest = hashlib.sha256(f"{seed}:{s.conversation.conversation_id}".encode()).hexdigest()
        return int(digest[:15], 16) / 16 ** 15

    # Conversations where the user corrected a reply are what the run is for: they always train (when
    # other conversations can be held out), and validation measures the rest of the chat.
    taught = [s for s in selections if any(s.conversation.exchanges[i].turn in s.conversation.edits
                                           for i in s.turns)]
    ranked = sorted((s for s in selections if s not in taught), key=position)
    if not ranked:
        taught, ranked = [], sorted(selections, key=position)
    n_val = sum(position(s) < val_fraction for s in ranked)
    n_val = max(1, min(n_val, len(ranked) - (0 if taught else 1)))  # tiny logs still get a val set
    return taught + ranked[n_val:], ranked[:n_val]


def render_examples(selections: list[Selection], fmt: ChatFormat) -> list[tuple[list[int], list[int]]]:
    """One example per conversation: its rendering up to the last selected reply, every selected reply a target.

    A causal model's loss on a reply depends only on what precedes it, so one sequence carrying all of a
    conversation's targets gives the same loss as one example per turn, without recomputing the shared
    history for every turn (a four-turn chat costs a quarter of the tokens). Where the tokenizer does not
    render the shorter examples as exact prefixes of the longer one, the turns stay separate examples.
    """
    examples = []
    for sel in selections:
        per_turn = fmt.training_examples(sel.conversation.messages())
        chosen = [per_turn[i] for i in sel.turns]
        ids, mask = list(chosen[-1][0]), list(chosen[-1][1])
        separate = []
        for turn_ids, turn_mask in chosen[:-1]:
            if ids[:len(turn_ids)] == list(turn_ids):
                mask[:len(turn_mask)] = [a or b for a, b in zip(mask[:len(turn_mask)], turn_mask, strict=True)]
            else:
                separate.append((turn_ids, turn_mask))
        examples.extend(separate + [(ids, mask)])
    return examples


def fresh_exchange(fmt: ChatFormat, question: str, system_prompt: str | None = None,
                   reply: str | None = None) -> tuple[list[int], list[int]]:
    """`question` asked in a new conversation (after `system_prompt`), as the native backend renders it: the
    prompt's ids, and (given `reply`) the reply's ids as training sees them (through its end marker and what
    the template writes after it). The one rendering of "a question asked afresh": the taught probes below,
    recall in training.report and replay in training.replay all use it."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}]
    prompt = fmt.prompt_ids(messages)
    return prompt, ([] if reply is None else fmt.reply_ids(messages, reply))


def taught_probes(selections: list[Selection], fmt: ChatFormat) -> list[tuple[list[int], list[int]]]:
    """Each edited reply as the answer to its question asked in a fresh conversation (trained and validated).

    The val loss then falls while the model learns what the user corrected (asked anew, not in the chat it was
    taught in) and rises when the held-out conversations drift: early stopping and the kept checkpoint weigh
    both, where held-out chats alone would prefer the base (learning a fact never helps an unrelated chat).
    """
    probes = []
    for sel in selections:
        conv = sel.conversation
        for i in sel.turns:
            ex = conv.exchanges[i]
            if ex.turn in conv.edits:
                prompt, reply = fresh_exchange(fmt, ex.user, conv.system_prompt, conv.edits[ex.turn])
                probes.append((prompt + reply, [0] * len(prompt) + [1] * len(reply)))
    return probes


def write_split(directory: Path, name: str, examples: list[tuple[list[int], list[int]]], dtype: np.dtype) -> dict:
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    tokens = np.memmap(directory / f"{name}.tokens.bin", dtype=dtype, mode="w+", shape=(max(total, 1),))
    mask = np.memmap(directory / f"{name}.mask.bin", dtype=np.uint8, mode="w+", shape=(max(total, 1),))
    for (ids, m), start in zip(examples, offsets[:-1], strict=True):
        tokens[start:start + len(ids)] = ids
        mask[start:start + len(m)] = m
    tokens.flush()
    mask.flush()
    del tokens, mask
    offsets.tofile(directory / f"{name}.offsets.bin")
    return {"examples": len(examples), "tokens": total,
            "target_tokens": int(sum(sum(m) for _, m in examples)),
            "longest": int(lengths.max()) if len(lengths) else 0}


def _write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, directory / MANIFEST)  # written last: a manifest means the arrays are complete


def read_history(path: str | Path):
    path = Path(path)
    try:
        return read_log(path)
    except FileNotFoundError:
        raise DataError(f"The chat history {path} does not exist: chat in the app first, or pass --history "
                        f"with the path of your chat_history.jsonl.") from None
    except IsADirectoryError:
        raise DataError(f"The chat history {path} is a directory: pass --history with the path of a "
                        f".jsonl file.") from None
    except OSError as e:
        raise DataError(f"The chat history {path} could not be read ({e.strerror or e}): check its "
                        f"permissions or pass another --history.") from None


def prepare_chat_data(history: str | Path, tokenizer: Tokenizer, directory: str | Path, *,
                      only_liked: bool = False, exclude_disliked: bool = False, min_exchanges: int = 10,
                      val_fraction: float = 0.1, seed: int = 1337,
                      replay: Callable[[list[Selection]], list[tuple[list[int], list[int]]]] | None = None) -> dict:
    """Read, filter, split and tokenize the chat log into `directory`; returns the manifest. `replay`, called
    with the train split's selections once the log passed its checks, returns extra examples (training.replay)
    that train alongside the log; every REPLAY_VAL_EVERY-th is validated instead."""
    contents = read_history(history)
    convs = conversations(contents)
    selections, counts = select_exchanges(convs, only_liked, exclude_disliked)
    usable = sum(len(s.turns) for s in selections)
    if usable < min_exchanges:
        filters = [f for f, on in (("--only-liked", only_liked), ("--exclude-disliked", exclude_disliked)) if on]
        detail = f" after {' and '.join(filters)}" if filters else ""
        raise DataError(f"The chat log {history} has {usable} usable exchanges{detail} "
                        f"({contents.malformed} malformed lines skipped); fine-tuning needs at least "
                        f"{min_exchanges}: chat more, or lower --min-exchanges.")
    train_sel, val_sel = split_by_conversation(selections, val_fraction, seed)
    fmt = chat_format_for(tokenizer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    history = Path(history)
    manifest = {
        "format": FORMAT_VERSION, "kind": "chat", "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.name, "eot_id": tokenizer.eot_id, "template": fmt.uses_template,
        "source": {"history": str(history.resolve()), "sha256": sha256_of(history),
                   "exchanges": len(contents.exchanges), "feedback": len(contents.feedback),
                   "conversations": len(convs), "malformed_lines": contents.malformed,
                   "usable_exchanges": usable, "only_liked": only_liked, "exclude_disliked": exclude_disliked,
                   **counts},
        "splits": {},
    }
    probes = taught_probes(train_sel, fmt)
    # The probes train too: the app's user asks a corrected question again in a new chat, not only inside the
    # conversation where they corrected it; without them the fact stays tied to that conversation's context.
    replay = replay(train_sel) if replay else []
    # Held-out replay answers make the val loss rise when general answers drift from the base's.
    replay_val = [ex for i, ex in enumerate(replay) if i % REPLAY_VAL_EVERY == REPLAY_VAL_EVERY - 1]
    replay_train = [ex for i, ex in enumerate(replay) if i % REPLAY_VAL_EVERY != REPLAY_VAL_EVERY - 1]
    for name, sel, extra in (("train", train_sel, probes + replay_train), ("val", val_sel, probes + replay_val)):
        stats = write_split(directory, name, render_examples(sel, fmt) + extra, dtype)
        stats["conversations"] = [s.conversation.conversation_id for s in sel]
        manifest["splits"][name] = stats
    manifest["splits"]["train"]["taught_probes"] = manifest["splits"]["val"]["taught_probes"] = len(probes)
    manifest["splits"]["train"]["replay"], manifest["splits"]["val"]["replay"] = len(replay_train), len(replay_val)
    _write_manifest(directory, manifest)
    return manifest


def prepare_text_data(text_path: str | Path, tokenizer: Tokenizer, directory: str | Path, *,
                      val_fraction: float = 0.1, min_tokens: int = 2) -> dict:
    """Tokenize a plain text file; the last `val_fraction` of its tokens is the validation split."""
    text_path = Path(text_path)
    try:
        text = text_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"The text file {text_path} does not exist: pass --text with a plain text file.") from None
    except OSError as e:
        raise DataError(f"The text file {text_path} could not be read ({e.strerror or e}): pass another --text.") from None
    ids = tokenizer.encode(text)
    n_val = int(len(ids) * val_fraction)
    if n_val < min_tokens or len(ids) - n_val < min_tokens:
        raise DataError(f"The text file {text_path} has {len(ids)} tokens; with --block-size {min_tokens - 1} "
                        f"each split needs at least {min_tokens}: use more text or a smaller --block-size.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    manifest = {"format": FORMAT_VERSION, "kind": "text", "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                "tokenizer": tokenizer.name, "eot_id": tokenizer.eot_id,
                "source": {"text": str(text_path.resolve()), "sha256": sha256_of(text_path)}, "splits": {}}
    cut = len(ids) - n_val
    for name, part in (("train", ids[:cut]), ("val", ids[cut:])):
        manifest["splits"][name] = write_split(directory, name, [(part, [1] * len(part))], dtype)
    _write_manifest(directory, manifest)
    return manifest


def show_masked(tokenizer: Tokenizer, ids, mask, color: bool = False) -> str:
    """An example as text with its training targets marked: green on a terminal, else between ⟦ and ⟧."""
    start, end = ("\x1b[32m", "\x1b[0m") if color else ("⟦", "⟧")
    pieces, run, current = [], [], None
    for token, m in [*zip((int(t) for t in ids), (int(v) for v in mask), strict=True), (None, None)]:
        if m != current and run:
            text = tokenizer.decode(run)
            pieces.append(f"{start}{text}{end}" if current else text)
            run = []
        current = m
        if token is not None:
            run.append(token)
    return "".join(pieces)


@dataclass
class Split:
    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.mask[a:b]


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise DataError(f"No complete training data in {directory} (its {MANIFEST} is missing or damaged): "
                        f"run again without --resume to prepare it.") from None


def load_split(directory: str | Path, name: str) -> Split:
    directory = Path(directory)
    manifest = read_manifest(directory)
    n = manifest["splits"][name]["tokens"]
    tokens = np.memmap(directory / f"{name}.tokens.bin", dtype=np.dtype(manifest["dtype"]), mode="r")[:n]
    mask = np.memmap(directory / f"{name}.mask.bin", dtype=np.uint8, mode="r")[:n]
    offsets = np.fromfile(directory / f"{name}.offsets.bin", dtype=np.int64)
    return Split(tokens, mask, offsets)
