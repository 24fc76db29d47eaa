"""LoRA fine-tuning: adapters start at the base model, only they train, and checkpoints are saved merged."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from training_fixtures import (
    fact_log_records,
    make_template_checkpoint,
    one_thread,  # noqa: F401 (autouse: one torch thread)
    write_log,
)

from gpt.checkpoint import load_checkpoint
from training.finetune import main
from training.lora import LoRALinear, apply_lora, merged_copy


@pytest.fixture
def tiny(tmp_path):
    return make_template_checkpoint(tmp_path / "base")


def test_adapters_start_at_the_base_model_and_only_they_train(tiny):
    model, _, _ = load_checkpoint(tiny)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    before = model(idx)
    apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(idx), before)  # B is zero at the start
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * model.config.n_layer


def test_the_merged_copy_computes_what_the_adapted_model_computes(tiny):
    model, _, _ = load_checkpoint(tiny)
    apply_lora(model, rank=4, alpha=8)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b, std=0.05)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    plain = merged_copy(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(idx), model(idx), atol=1e-5, rtol=1e-4)


def test_lora_finetuning_lowers_val_loss_and_writes_an_ordinary_checkpoint(tiny, tmp_path, capsys):
    log = write_log(tmp_path / "log.jsonl", fact_log_records(6))
    base_hash = hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
    out = tmp_path / "out"
    assert main(["--history", str(log), "--base", str(tiny), "--out", str(out), "--lora-rank", "8",
                 "--lr", "1e-2", "--min-lr", "1e-3", "--max-iters", "30", "--eval-interval", "15",
                 "--eval-iters", "2", "--batch-size", "8", "--block-size", "128", "--warmup-iters", "3",
                 "--replay", "0", "--no-progress"]) == 0  # the val loss of the log alone
    assert "LoRA rank 8" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["best_val_loss"] < meta["history"][0]["val_loss"] - 0.5
    assert meta["config"]["lora_rank"] == 8
    model, _, _ = load_checkpoint(out)  # strict load: no adapter keys, plain weights
    base, _, _ = load_checkpoint(tiny)
    # The default targets (configs/finetune.toml) are the MLP matrices: they learn, attention stays the base's.
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, base.transformer.h[0].mlp.c_fc.weight)
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)  # frozen
    assert hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest() == base_hash


def test_pretraining_refuses_lora(tmp_path, capsys):
    from training.pretrain import main as pretrain_main

    text = tmp_path / "t.txt"
    text.write_text("word " * 500)
    assert pretrain_main(["--text", str(text), "--out", str(tmp_path / "o"), "--lora-rank", "4"]) == 2
    assert "pretraining trains every weight" in capsys.readouterr().err
