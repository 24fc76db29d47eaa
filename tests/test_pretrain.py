"""`python -m training.pretrain`: a native model from scratch on a text file, through the shared loop.

Run: .venv/bin/python -m pytest tests/test_pretrain.py
"""

from __future__ import annotations

import json

import pytest
from training_fixtures import one_thread  # noqa: F401 (autouse: one torch thread)

from gpt.checkpoint import load_checkpoint
from gpt.engine import Engine
from gpt.sampling import SamplingParams
from training.pretrain import main

TEXT = ("Once upon a time a small robot lived in a lighthouse. Every night it polished the great lamp, "
        "and every morning it counted the ships that had passed safely. ") * 60


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--eval-iters", "4", "--warmup-iters", "5", "--no-progress"]


def test_pretraining_on_a_small_text_lowers_the_loss(tmp_path, capsys):
    text = tmp_path / "input.txt"
    text.write_text(TEXT)
    out = tmp_path / "scratch"
    assert main(["--text", str(text), "--out", str(out), *TINY, "--max-iters", "40", "--eval-interval", "20",
                 "--lr", "1e-2", "--min-lr", "1e-3"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    history = meta["history"]
    assert [h["iter"] for h in history] == [0, 20, 40]
    assert meta["best_val_loss"] < history[0]["val_loss"] - 3.0  # random init starts near ln(50257) = 10.8
    assert meta["kind"] == "pretrain" and meta["data"]["train_tokens"] > meta["data"]["val_tokens"] > 0
    model, tokenizer, _ = load_checkpoint(out)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, tokenizer.name) == (1, 2, 32, 32, "gpt2")
    ids = tokenizer.encode("Once upon a time")
    reply = tokenizer.decode(list(Engine(model).generate(ids, 8, SamplingParams(temperature=0))))
    words = reply.split()
    assert words and sum(w in TEXT.split() for w in words) >= len(words) / 2  # it speaks the text's words
    assert (out / "loss_curve.png").is_file()
    assert "text " in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--n-embd", "33"], "--n-embd (33) must be divisible by --n-head (2)"),
    (["--n-layer", "0"], "--n-layer must be an integer >= 1"),
    (["--block-size", "4096"], "smaller --block-size"),
    (["--weight-decay", "-0.1"], "weight-decay must be a number >= 0"),
])
def test_bad_settings_exit_2_with_one_sentence(tmp_path, capsys, args, message):
    text = tmp_path / "input.txt"
    text.write_text(TEXT)
    assert main(["--text", str(text), "--out", str(tmp_path / "o"), *TINY, "--max-iters", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_missing_text_file_exits_2(tmp_path, capsys):
    assert main(["--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "does not exist: pass --text" in capsys.readouterr().err
