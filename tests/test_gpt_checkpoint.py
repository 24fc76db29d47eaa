"""Checkpoints: atomic saves (an interrupted save leaves the previous one loadable), `latest`, clear errors.

Run: .venv/bin/python -m pytest tests/test_gpt_checkpoint.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gpt.checkpoint as checkpoint
from gpt.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import GPT2Tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)


def tiny_model(seed: int, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def same_weights(a: GPT, b: GPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2Tokenizer()


def test_save_then_load_round_trips_weights_config_and_meta(tmp_path, tokenizer):
    model = tiny_model(0, tie_embeddings=False, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1)
    save_checkpoint(model, tmp_path / "ck", tokenizer, {"iterations": 3})
    loaded, tok, meta = load_checkpoint(tmp_path / "ck")
    assert same_weights(model, loaded) and loaded.config == model.config
    assert meta["iterations"] == 3 and meta["path"] == str(tmp_path / "ck") and "created" in meta
    assert tok.name == "gpt2" and not loaded.training
    assert all(p.requires_grad for p in loaded.parameters())  # ready to fine-tune


def test_tied_checkpoint_stores_the_embedding_once_and_reloads_tied(tmp_path, tokenizer):
    from safetensors import safe_open

    save_checkpoint(tiny_model(0), tmp_path / "ck", tokenizer)
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_save_failing_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path, tokenizer, monkeypatch):
    first = tiny_model(1)
    save_checkpoint(first, tmp_path / "ck", tokenizer, {"run": 1})

    def half_written(state, path, *args, **kwargs):
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(2), tmp_path / "ck", tokenizer, {"run": 2})
    loaded, _, meta = load_checkpoint(tmp_path / "ck")
    assert same_weights(first, loaded) and meta["run"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind


def test_crash_between_the_two_renames_still_finds_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    first = tiny_model(1)
    save_checkpoint(first, tmp_path / "ck", tokenizer, {"run": 1})
    real_replace, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped right between moving the old one away and in
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model(2), tmp_path / "ck", tokenizer, {"run": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # the previous copy is back under its name
    loaded, _, meta = load_checkpoint(tmp_path / "ck")
    assert same_weights(first, loaded) and meta["run"] == 1


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _killed_between_renames(tmp_path, tokenizer, new_copy: bool) -> None:
    """The folder as a save process killed between its two renames leaves it (ck moved aside, not replaced)."""
    pid = _dead_pid()
    save_checkpoint(tiny_model(1), tmp_path / "ck", tokenizer, {"run": 1, "created": 1000.0})
    save_checkpoint(tiny_model(7), tmp_path / "other", tokenizer, {"run": 7, "created": 1500.0})
    if new_copy:
        save_checkpoint(tiny_model(2), tmp_path / "new", tokenizer, {"run": 2, "created": 2000.0})
        os.replace(tmp_path / "new", tmp_path / f".ck.tmp-{pid}-x1y2")
    os.replace(tmp_path / "ck", tmp_path / f".ck.old-{pid}")


def test_a_save_killed_between_its_renames_is_finished_and_latest_serves_the_new_model(tmp_path, tokenizer,
                                                                                      monkeypatch):
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(tmp_path))
    _killed_between_renames(tmp_path, tokenizer, new_copy=True)
    assert resolve_checkpoint("latest") == tmp_path / "ck"  # not the older "other"
    assert load_checkpoint("latest")[2]["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "other"]


def test_a_save_killed_before_its_new_copy_was_named_is_undone_and_the_next_save_keeps_the_only_copy(
        tmp_path, tokenizer, monkeypatch):
    _killed_between_renames(tmp_path, tokenizer, new_copy=False)
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(3), tmp_path / "ck", tokenizer, {"run": 3})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "ck")[2]["run"] == 1  # the only surviving copy was kept
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(tmp_path))
    assert resolve_checkpoint("latest") == tmp_path / "other"  # ck's copy is the older one, honestly


KILLED_SAVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    import gpt.checkpoint as checkpoint
    from gpt.model import GPT, GPTConfig
    from gpt.tokenizer import GPT2Tokenizer

    real_save = checkpoint.save_file
    def slow_save(state, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")  # half of the file is on disk when the process dies
        print("writing", flush=True)
        time.sleep(60)
    checkpoint.save_file = slow_save
    torch.manual_seed(9)
    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16))
    checkpoint.save_checkpoint(model, sys.argv[1], GPT2Tokenizer(), {"run": 2})
""")


def test_process_killed_mid_save_leaves_the_previous_checkpoint_as_latest(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(tmp_path))
    first = tiny_model(1)
    save_checkpoint(first, tmp_path / "ck", tokenizer, {"run": 1})
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(tmp_path / "ck")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ck.tmp-")]
    assert leftovers  # the dead save's temporary directory, which must not count as a checkpoint
    assert resolve_checkpoint("latest") == tmp_path / "ck"
    loaded, _, meta = load_checkpoint("latest")
    assert same_weights(first, loaded) and meta["run"] == 1
    save_checkpoint(tiny_model(3), tmp_path / "ck", tokenizer, {"run": 3})  # the next save tidies up
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_latest_resolves_the_newest_checkpoint_by_created(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(tmp_path))
    now = time.time()
    save_checkpoint(tiny_model(1), tmp_path / "b-old", tokenizer, {"created": now - 100})
    save_checkpoint(tiny_model(2), tmp_path / "a-new", tokenizer, {"created": now})
    save_checkpoint(tiny_model(3), tmp_path / "c-middle", tokenizer, {"created": now - 50})
    (tmp_path / "not-a-checkpoint").mkdir()
    assert resolve_checkpoint("latest") == tmp_path / "a-new"
    assert load_checkpoint("latest")[2]["path"] == str(tmp_path / "a-new")


def test_latest_with_no_checkpoint_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="make setup"):
        resolve_checkpoint("latest")


def test_incomplete_directory_names_the_missing_files(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing model.safetensors, meta.json"):
        load_checkpoint(tmp_path / "ck")


def test_damaged_checkpoint_is_a_clear_error_not_a_crash(tmp_path, tokenizer):
    save_checkpoint(tiny_model(1), tmp_path / "ck", tokenizer)
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(tmp_path / "ck")
    save_checkpoint(tiny_model(1), tmp_path / "ck2", tokenizer)
    config = json.loads((tmp_path / "ck2" / "config.json").read_text())
    config["model"]["n_embd"] = 32  # weights no longer fit the architecture
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(tmp_path / "ck2")


class _PickleBomb:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this touches the marker file
        return (Path.touch, (self.marker,))


def test_loading_never_unpickles(tmp_path, tokenizer):
    """A pickle bomb named model.safetensors is refused by the safetensors reader, never executed."""
    import pickle

    save_checkpoint(tiny_model(1), tmp_path / "ck", tokenizer)
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(_PickleBomb(marker))
    pickle.loads(bomb)
    assert marker.exists()  # the bomb works when unpickled ...
    marker.unlink()
    (tmp_path / "ck" / "model.safetensors").write_bytes(bomb)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "ck")
    assert not marker.exists()  # ... and loading a checkpoint never unpickled it
