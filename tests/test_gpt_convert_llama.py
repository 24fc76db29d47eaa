"""Llama-family import: a tiny random LlamaForCausalLM (GQA; tied and untied heads) becomes a native checkpoint
whose logits and greedy continuations equal transformers'.

Run: .venv/bin/python -m pytest tests/test_gpt_convert_llama.py
"""

from __future__ import annotations

import json

import pytest
import torch

from gpt.chat_format import ChatFormat
from gpt.checkpoint import load_checkpoint
from gpt.convert import convert_to_hf, main
from gpt.engine import Engine
from gpt.sampling import SamplingParams
from gpt.tokenizer import HFTokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. Héllo wörld, naïve café! 日本語のテキスト. "
        "Models learn from data; tokenizers split text into pieces. ") * 20


def make_tokenizer():
    """A small byte-level BPE with ChatML specials, in transformers' fast-tokenizer form."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([TEXT], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def make_llama_dir(path, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(11 if tie else 12)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=tie, initializer_range=0.2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so a mis-mapped norm cannot hide behind all-ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model, tok


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama_pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    hf_model, hf_tok = make_llama_dir(root / "hf", tie=request.param)
    assert main([str(root / "hf"), str(root / "native")]) == 0
    native, tokenizer, meta = load_checkpoint(root / "native")
    return hf_model, hf_tok, native, tokenizer, meta, root


def test_llama_converts_to_the_native_llama_switches(llama_pair):
    hf_model, _, native, _, meta, _ = llama_pair
    cfg = native.config
    assert (cfg.pos, cfg.norm, cfg.mlp, cfg.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert (cfg.n_head, cfg.n_kv_head, cfg.intermediate_size) == (4, 2, 96)
    assert cfg.block_size == 256 and cfg.rope_theta == 5000.0 and cfg.norm_eps == 1e-5
    assert cfg.tie_embeddings == hf_model.config.tie_word_embeddings
    assert (native.lm_head.weight is native.transformer.wte.weight) == cfg.tie_embeddings
    assert meta["converted_from"] == "transformers LlamaForCausalLM"


def test_llama_logits_equal_transformers(llama_pair):
    hf_model, _, native, _, _, _ = llama_pair
    idx = torch.randint(0, native.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(native(idx), hf_model(idx).logits, atol=1e-3, rtol=0)


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_greedy_continuation_equals_transformers_generate(llama_pair, penalty):
    hf_model, hf_tok, native, tokenizer, _, _ = llama_pair
    prompt = tokenizer.encode("The quick brown fox")
    assert prompt == hf_tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                repetition_penalty=penalty, eos_token_id=tokenizer.eot_id,
                                pad_token_id=tokenizer.eot_id)
    expected = out[0, len(prompt):].tolist()
    if tokenizer.eot_id in expected:
        expected = expected[:expected.index(tokenizer.eot_id)]
    got = list(Engine(native).generate(prompt, 24, SamplingParams(temperature=0, repetition_penalty=penalty),
                                       stop_ids={tokenizer.eot_id}))
    assert got == expected and len(got) > 5


def test_tokenizer_and_chat_template_travel_with_the_checkpoint(llama_pair):
    _, hf_tok, _, tokenizer, _, root = llama_pair
    assert isinstance(tokenizer, HFTokenizer)
    config = json.loads((root / "native" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML and config["eos_token"] == "<|im_end|>"
    assert config["model_max_length"] == 256 and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer.eot_id == hf_tok.eos_token_id and tokenizer.eot_id in tokenizer.stop_ids
    messages = [{"role": "user", "content": "Héllo wörld"}]
    rendered = ChatFormat.for_tokenizer(tokenizer).render(messages)
    assert rendered == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode_markup(rendered) == hf_tok(rendered, add_special_tokens=False)["input_ids"]


def test_to_hf_exports_a_llama_that_transformers_loads_with_equal_logits(llama_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model, _, native, _, _, root = llama_pair
    out = convert_to_hf(str(root / "native"), root / "exported")
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert exported.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    idx = torch.randint(0, native.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, hf_model(idx).logits, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHATML


def test_llama_with_unsupported_rope_scaling_is_refused_in_one_sentence(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    make_tokenizer().save_pretrained(str(tmp_path / "hf"))
    capsys.readouterr()  # drop transformers' progress output from saving
    assert main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "'linear' rope scaling" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bundled_without_the_asset_says_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOGPT_CHAT_ASSETS", str(tmp_path / "no-assets"))
    assert main(["bundled", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf is not in" in err and "make setup" in err and len(err.splitlines()) == 1


def test_sources_are_routed_to_the_llama_importer_by_form(tmp_path):
    from gpt.convert_llama import is_llama_source

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    assert is_llama_source("bundled") and is_llama_source("x/Model.Q8_0.GGUF")
    assert is_llama_source(str(tmp_path / "llama"))
    assert not is_llama_source(str(tmp_path / "gpt2")) and not is_llama_source("gpt2")


def fake_hub_cache(cache, repo_id: str, files_from) -> None:
    """Lay `files_from` out as the Hugging Face cache does for a downloaded `repo_id` (no network needed)."""
    import shutil

    repo = cache / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)


def test_cached_hub_ids_convert_offline_for_gpt2_and_llama(tiny_gpt2_hf_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gpt.convert_llama import llama_from_hf_model

    hf_llama, _ = make_llama_dir(tmp_path / "llama-dir", tie=True)
    fake_hub_cache(tmp_path / "hf-home", "someone/tiny-gpt2", tiny_gpt2_hf_dir)
    fake_hub_cache(tmp_path / "hf-home", "someone/tiny-llama", tmp_path / "llama-dir")
    script = ("import sys; from gpt.convert import main; "
              "sys.exit(main([sys.argv[1], sys.argv[2]]) or main([sys.argv[3], sys.argv[4]]))")
    result = subprocess.run(
        [sys.executable, "-c", script, "someone/tiny-gpt2", str(tmp_path / "gpt2"), "someone/tiny-llama",
         str(tmp_path / "llama")], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    gpt2, _, gpt2_meta = load_checkpoint(tmp_path / "gpt2")
    llama, tokenizer, llama_meta = load_checkpoint(tmp_path / "llama")
    assert gpt2.config.pos == "learned" and gpt2_meta["source"] == "someone/tiny-gpt2"
    assert llama.config.pos == "rope" and llama_meta["source"] == "someone/tiny-llama"
    expected = llama_from_hf_model(hf_llama).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in llama.state_dict().items())
    assert tokenizer.chat_template == CHATML
