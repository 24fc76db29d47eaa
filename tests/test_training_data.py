"""Training data from the chat log: rendering shared with inference, masks, filters, split, files, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_fixtures import FACTS, exchange, fact_log_records, make_template_tokenizer, write_log

from gpt.chat_format import ChatFormat
from gpt.tokenizer import GPT2Tokenizer
from training.batches import ChatBatches, TextBatches, clip_example
from training.data import (
    DataError,
    load_split,
    prepare_chat_data,
    prepare_text_data,
    read_manifest,
    token_dtype,
    write_split,
)


@pytest.fixture(scope="module")
def gpt2_tok():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def template_tok(tmp_path_factory):
    return make_template_tokenizer(tmp_path_factory.mktemp("tok"))


def test_malformed_lines_are_skipped_and_counted(tmp_path, gpt2_tok):
    log = write_log(tmp_path / "log.jsonl", fact_log_records(4), ["{not json", "[1, 2]", '{"user": 3}'])
    manifest = prepare_chat_data(log, gpt2_tok, tmp_path / "data", min_exchanges=10)
    assert manifest["source"]["malformed_lines"] == 3
    assert manifest["source"]["usable_exchanges"] == 12


def test_split_is_by_conversation_and_tiny_logs_still_get_a_val_set(tmp_path, gpt2_tok):
    for n_conv in (2, 12, 60):
        log = write_log(tmp_path / f"log{n_conv}.jsonl", fact_log_records(n_conv))
        m = prepare_chat_data(log, gpt2_tok, tmp_path / f"d{n_conv}", min_exchanges=1)
        train, val = set(m["splits"]["train"]["conversations"]), set(m["splits"]["val"]["conversations"])
        assert not train & val
        assert train | val == {f"conv-{c}" for c in range(n_conv)}
        assert len(val) >= 1 and len(val) <= max(1, n_conv // 4) and train
        assert m["splits"]["val"]["examples"] == 3 * len(val)  # the plain format keeps turns apart


def test_a_conversation_trained_on_never_moves_to_validation_as_the_log_grows(tmp_path, gpt2_tok):
    before = prepare_chat_data(write_log(tmp_path / "a.jsonl", fact_log_records(5)), gpt2_tok, tmp_path / "a")
    for n in (6, 20, 60):
        after = prepare_chat_data(write_log(tmp_path / f"b{n}.jsonl", fact_log_records(n)), gpt2_tok, tmp_path / "b")
        assert set(before["splits"]["train"]["conversations"]) <= set(after["splits"]["train"]["conversations"])


def test_one_conversation_is_refused_with_what_to_do(tmp_path, gpt2_tok):
    records = [exchange(q, a, "only", t) for t, (q, a) in enumerate(FACTS * 4)]
    with pytest.raises(DataError, match="start at least one more conversation"):
        prepare_chat_data(write_log(tmp_path / "log.jsonl", records), gpt2_tok, tmp_path / "d")


def test_too_few_exchanges_names_the_count_and_the_flag(tmp_path, gpt2_tok):
    with pytest.raises(DataError, match=r"has 6 usable exchanges.*at least 10.*--min-exchanges"):
        prepare_chat_data(write_log(tmp_path / "log.jsonl", fact_log_records(2)), gpt2_tok, tmp_path / "d")


def test_missing_history_says_what_to_do(tmp_path, gpt2_tok):
    with pytest.raises(DataError, match="does not exist: chat in the app first"):
        prepare_chat_data(tmp_path / "nope.jsonl", gpt2_tok, tmp_path / "d")
    with pytest.raises(DataError, match="is a directory"):
        prepare_chat_data(tmp_path, gpt2_tok, tmp_path / "d")


def _targets(directory, split, tok):
    """Each reply the loss covers (a conversation's replies share one example, one run of mask 1 each)."""
    s = load_split(directory, split)
    out = []
    for i in range(len(s)):
        ids, mask = s.example(i)
        run = []
        for t, m in [*zip(ids, mask, strict=True), (0, 0)]:
            if m:
                run.append(int(t))
            elif run:
                out.append(tok.decode(run))
                run = []
    return out


def test_a_conversations_turns_share_one_example_with_every_reply_a_target(tmp_path, template_tok):
    data = tmp_path / "d"
    m = prepare_chat_data(write_log(tmp_path / "log.jsonl", fact_log_records(4)), template_tok, data, min_exchanges=1)
    assert m["splits"]["train"]["examples"] == len(m["splits"]["train"]["conversations"])
    assert len(_targets(data, "train", template_tok)) == 3 * len(m["splits"]["train"]["conversations"])


def test_conversations_with_an_edit_always_train_and_val_asks_the_edit_afresh(tmp_path, template_tok):
    records = fact_log_records(12)
    edits = [{"type": "feedback", "conversation_id": r["conversation_id"], "turn": r["turn"], "rating": None,
              "edited": "Edited: " + r["assistant"]} for r in records[:18] if r["turn"] == 0]  # conv-0 to 5
    data = tmp_path / "d"
    m = prepare_chat_data(write_log(tmp_path / "log.jsonl", records + edits), template_tok, data, min_exchanges=1,
                          val_fraction=0.5)
    val = m["splits"]["val"]["conversations"]
    assert val and not {f"conv-{c}" for c in range(6)} & set(val) and m["splits"]["val"]["taught_probes"] == 6
    assert sum(t.startswith("Edited: ") for t in _targets(data, "val", template_tok)) == 6


def test_plain_format_mask_covers_reply_and_end_of_text_only(tmp_path, gpt2_tok):
    records = fact_log_records(4)
    records[0]["system_prompt"] = records[1]["system_prompt"] = records[2]["system_prompt"] = "Be terse."
    data = tmp_path / "d"
    prepare_chat_data(write_log(tmp_path / "log.jsonl", records), gpt2_tok, data, min_exchanges=1)
    targets = _targets(data, "train", gpt2_tok) + _targets(data, "val", gpt2_tok)
    assert sorted(targets) == sorted(" " + r["assistant"] + "<|endoftext|>" for r in records)
    # the prompt part is exactly what the backend feeds the model at inference
    fmt = ChatFormat.for_tokenizer(gpt2_tok)
    split = "train" if "conv-0" in read_manifest(data)["splits"]["train"]["conversations"] else "val"
    s = load_split(data, split)
    ids, mask = s.example(read_manifest(data)["splits"][split]["conversations"].index("conv-0"))
    n_prompt = int(np.argmax(mask))
    assert list(ids[:n_prompt]) == gpt2_tok.encode(fmt.render([{"role": "system", "content": "Be terse."},
                                                               {"role": "user", "content": FACTS[0][0]}]))


def test_template_format_masks_reply_and_end_marker(tmp_path, template_tok):
    data = tmp_path / "d"
    prepare_chat_data(write_log(tmp_path / "log.jsonl", fact_log_records(4)), template_tok, data, min_exchanges=1)
    targets = set(_targets(data, "train", template_tok) + _targets(data, "val", template_tok))
    assert targets == {a + "<|im_end|>\n" for _, a in FACTS}
    ids, mask = load_split(data, "train").example(0)
    prompt = template_tok.decode(ids[:int(np.argmax(mask))])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert template_tok.special_tokens["<|im_start|>"] in ids.tolist()  # markup parsed, not spelled out


def test_edits_replace_replies_and_feedback_filters_choose_targets(tmp_path, gpt2_tok):
    records = fact_log_records(6)
    feedback = [
        {"type": "feedback", "conversation_id": "conv-0", "turn": 0, "rating": "like", "edited": None},
        {"type": "feedback", "conversation_id": "conv-1", "turn": 0, "rating": "dislike", "edited": None},
        {"type": "feedback", "conversation_id": "conv-2", "turn": 1, "rating": "dislike", "edited": None},
        {"type": "feedback", "conversation_id": "conv-2", "turn": 1, "rating": None, "edited": "Fixed by hand."},
    ]
    log = write_log(tmp_path / "log.jsonl", records + feedback)

    def targets(**filters):
        data = tmp_path / ("d" + "".join(sorted(filters)))
        prepare_chat_data(log, gpt2_tok, data, min_exchanges=1, **filters)
        return sorted(_targets(data, "train", gpt2_tok) + _targets(data, "val", gpt2_tok))

    everything = targets()
    assert len(everything) == 18 + 2  # and the edit asked afresh, in the train and in the val split
    assert everything.count(" Fixed by hand.<|endoftext|>") == 3
    edited_original = records[2 * 3 + 1]["assistant"]
    assert everything.count(f" {edited_original}<|endoftext|>") == 5  # 6 conversations, one reply edited
    liked = targets(only_liked=True)
    assert liked == sorted([f" {records[0]['assistant']}<|endoftext|>", *[" Fixed by hand.<|endoftext|>"] * 3])
    no_disliked = targets(exclude_disliked=True)
    assert len(no_disliked) == 17 + 2 and " Fixed by hand.<|endoftext|>" in no_disliked


def test_only_liked_with_too_few_likes_is_refused(tmp_path, gpt2_tok):
    log = write_log(tmp_path / "log.jsonl", fact_log_records(6))
    with pytest.raises(DataError, match="0 usable exchanges after --only-liked"):
        prepare_chat_data(log, gpt2_tok, tmp_path / "d", only_liked=True)


def test_tokens_are_uint16_when_the_vocabulary_fits_else_uint32(tmp_path, gpt2_tok):
    assert token_dtype(50257) == np.uint16 and token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32
    data = tmp_path / "d"
    m = prepare_chat_data(write_log(tmp_path / "log.jsonl", fact_log_records(4)), gpt2_tok, data, min_exchanges=1)
    assert m["dtype"] == "uint16"
    assert (data / "train.tokens.bin").stat().st_size == 2 * m["splits"]["train"]["tokens"]
    assert (data / "train.mask.bin").stat().st_size == m["splits"]["train"]["tokens"]
    big = [([70000, 1, 99999], [0, 1, 1])]
    write_split(tmp_path, "big", big, token_dtype(100000))
    assert np.fromfile(tmp_path / "big.tokens.bin", dtype=np.uint32).tolist() == [70000, 1, 99999]


def test_a_manifest_is_written_only_when_the_arrays_are_complete(tmp_path, gpt2_tok):
    data = tmp_path / "d"
    prepare_chat_data(write_log(tmp_path / "log.jsonl", fact_log_records(4)), gpt2_tok, data, min_exchanges=1)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train"]["examples"] + manifest["splits"]["val"]["examples"] == 12
    with pytest.raises(DataError):  # a failed re-preparation leaves no stale manifest behind
        prepare_chat_data(tmp_path / "missing.jsonl", gpt2_tok, data)
    assert (data / "manifest.json").is_file()


def test_clip_keeps_the_whole_reply_and_drops_the_oldest_prompt_tokens():
    ids, mask = np.arange(20), np.array([0] * 15 + [1] * 5)
    clipped_ids, clipped_mask = clip_example(ids, mask, 8)
    assert clipped_ids.tolist() == list(range(12, 20)) and clipped_mask.sum() == 5
    long_reply = np.array([0] * 3 + [1] * 30)
    ids2, mask2 = clip_example(np.arange(33), long_reply, 8)
    assert ids2.tolist() == list(range(2, 10)) and mask2.tolist() == [0] + [1] * 7


def test_packed_chat_batches_count_only_reply_tokens_and_never_padding(tmp_path, gpt2_tok):
    data = tmp_path / "d"
    prepare_chat_data(write_log(tmp_path / "log.jsonl", fact_log_records(12)), gpt2_tok, data, min_exchanges=1)
    train, val = load_split(data, "train"), load_split(data, "val")
    batches = ChatBatches(train, val, block_size=64, batch_size=4, pad_id=gpt2_tok.eot_id, seed=1)
    x, y, m = batches.train_batch(torch.device("cpu"))
    assert x.shape == y.shape == m.shape == (4, 64)
    real = y[:, :-1] >= 0
    assert torch.equal(x[:, 1:][real], y[:, :-1][real])  # targets are the inputs shifted by one
    assert m.sum() > 0 and ((y == -1) <= (m == 0)).all()  # padding is never a target
    texts = [gpt2_tok.decode(y[b][m[b].bool()].tolist()) for b in range(4)]
    assert all(t and any(a in t for _, a in FACTS) for t in texts)
    # validation batches are fixed: the val loss depends on the weights only
    first = [t[0].tolist() for t in batches.val_batches(10, torch.device("cpu"))]
    again = [t[0].tolist() for t in batches.val_batches(10, torch.device("cpu"))]
    assert first == again and first


def test_text_batches_are_shifted_windows_with_every_token_a_target(tmp_path, gpt2_tok):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    prepare_text_data(text, gpt2_tok, tmp_path / "d", min_tokens=34)
    batches = TextBatches(load_split(tmp_path / "d", "train"), load_split(tmp_path / "d", "val"), 32, 3)
    x, y, m = batches.train_batch(torch.device("cpu"))
    assert x.shape == (3, 32) and torch.equal(x[:, 1:], y[:, :-1]) and bool(m.all())


def test_text_too_short_for_the_block_says_what_to_do(tmp_path, gpt2_tok):
    text = tmp_path / "t.txt"
    text.write_text("too short")
    with pytest.raises(DataError, match="smaller --block-size"):
        prepare_text_data(text, gpt2_tok, tmp_path / "d", min_tokens=258)
