"""`python -m gpt.convert` for GPT-2: import, `--to-hf` round trip, and clear one-sentence errors.

Run: .venv/bin/python -m pytest tests/test_gpt_convert.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from gpt.checkpoint import load_checkpoint
from gpt.convert import main

REPO = Path(__file__).resolve().parent.parent


def run_convert(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt.convert", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


def test_to_hf_cli_round_trips_to_equal_logits(tiny_gpt2_hf_dir, tiny_native_ckpt, tmp_path):
    from transformers import GPT2LMHeadModel

    result = run_convert(str(tiny_native_ckpt), str(tmp_path / "hf"), "--to-hf")
    assert result.returncode == 0, result.stderr
    original = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_hf_dir)).eval()
    exported = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, original(idx).logits, atol=1e-4, rtol=0)

    # ... and back again: the re-imported checkpoint equals the first one.
    assert main([str(tmp_path / "hf"), str(tmp_path / "again")]) == 0
    first, _, _ = load_checkpoint(tiny_native_ckpt)
    again, _, meta = load_checkpoint(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(idx), first(idx), atol=0, rtol=0)
    assert meta["converted_from"] == "transformers GPT2LMHeadModel"


def test_uncached_hub_id_offline_fails_with_one_sentence_and_no_traceback(tmp_path):
    result = run_convert("gpt2", str(tmp_path / "out"), env={"HF_HOME": str(tmp_path / "empty-cache")})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: Could not load 'gpt2'") and "from_pretrained('gpt2')" in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_source_and_non_checkpoint_give_one_line_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nothing.gguf"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "out"), "--to-hf"]) == 1
    err = capsys.readouterr().err
    assert "is not a native checkpoint" in err and len(err.strip().splitlines()) == 1


def test_a_model_of_another_family_is_refused_not_misloaded(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    assert main([str(tmp_path), str(tmp_path / "out")]) == 1
    assert "'qwen2' model" in capsys.readouterr().err


def test_converted_checkpoint_is_gpt2_with_its_tokenizer(tiny_native_ckpt):
    model, tokenizer, meta = load_checkpoint(tiny_native_ckpt)
    assert tokenizer.name == "gpt2" and tokenizer.encode("Hello world") == [15496, 995]
    assert model.config.pos == "learned" and model.config.block_size == 128
    assert {"model.safetensors", "config.json", "meta.json"} <= {p.name for p in Path(tiny_native_ckpt).iterdir()}
