"""Import and export Hugging Face models as native checkpoints.

    python -m gpt.convert gpt2 models/native/gpt2            # HF GPT-2: hub id (cached or online) or a local dir
    python -m gpt.convert bundled models/native/smollm2       # the bundled SmolLM2 GGUF (Llama family)
    python -m gpt.convert model.gguf OUT                      # any Llama GGUF, or an HF Llama dir or hub id
    python -m gpt.convert models/native/gpt2 OUT --to-hf      # native -> GPT2LMHeadModel / LlamaForCausalLM dir

GPT-2 import/export lives here; Llama-family import lives in gpt/convert_llama.py. transformers is imported
lazily, never at `import gpt`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.convert_llama import LlamaImportError, convert_llama_to_native, is_llama_source, llama_to_hf_model
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import GPT2Tokenizer, Tokenizer

# HF GPT-2 uses Conv1D (in, out) for these; the native model uses nn.Linear (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class ConvertError(RuntimeError):
    """The source cannot be converted; the message says what to do."""


def gpt2_config_from_hf(hf_config) -> GPTConfig:
    return GPTConfig(vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions, n_layer=hf_config.n_layer,
                     n_head=hf_config.n_head, n_embd=hf_config.n_embd, bias=True,
                     norm_eps=hf_config.layer_norm_epsilon)


def gpt2_from_hf_model(hf_model) -> GPT:
    """A native GPT with the weights of a transformers GPT2LMHeadModel."""
    model = GPT(gpt2_config_from_hf(hf_model.config))
    state = {}
    for key, value in hf_model.state_dict().items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        state[key] = value.t() if key.endswith(_CONV1D) else value
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model.load_state_dict(state, strict=True)
    model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def gpt2_to_hf_model(model: GPT):
    """A transformers GPT2LMHeadModel with the weights of a native GPT-2 model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    if not is_gpt2_architecture(cfg):
        raise ConvertError("this checkpoint is not GPT-2-architecture; export it with llama_to_hf_model.")
    hf_config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                           n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.norm_eps,
                           activation_function="gelu_new", tie_word_embeddings=True)
    hf_model = GPT2LMHeadModel(hf_config)
    state = {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in model.state_dict().items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ConvertError(f"weights do not match GPT-2: missing {missing}, unexpected {unexpected}")
    return hf_model.eval()


def uncached_hint(source: str) -> str:
    return (f"Could not load {source!r}: it is not a local directory and not in the Hugging Face cache (this "
            f"machine may be offline); on a machine with network run `python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{source}')\"` to cache it, or pass a directory "
            f"written by save_pretrained.")


def hf_model_type(source: str) -> str:
    """The model_type of a local model directory or a hub id (offline: from the cache)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as e:  # ValueError: neither a directory nor a valid hub id
        if Path(source).is_dir():
            raise ConvertError(f"Could not read the model directory {source} ({str(e).splitlines()[0][:200]}); "
                               f"pass a complete directory written by save_pretrained.") from None
        raise ConvertError(uncached_hint(source)) from None


def load_hf_gpt2(source: str):
    """A GPT2LMHeadModel from a local directory or a hub id; offline and uncached, one clear sentence."""
    from transformers import GPT2LMHeadModel

    try:
        return GPT2LMHeadModel.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as e:
        if Path(source).is_dir():
            raise ConvertError(f"Could not load the GPT-2 directory {source} ({str(e).splitlines()[0][:200]}); "
                               f"pass a complete directory written by save_pretrained.") from None
        raise ConvertError(uncached_hint(source)) from None


def convert_to_native(source: str, out: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Convert an HF GPT-2 or Llama (hub id or directory), `bundled`, or a Llama .gguf into a native checkpoint."""
    source = str(source)
    if is_llama_source(source):
        return convert_llama_to_native(source, out)
    model_type = hf_model_type(source)
    if model_type == "llama":  # a hub id of a Llama model
        return convert_llama_to_native(source, out)
    if model_type != "gpt2":
        raise ConvertError(f"{source} is a {model_type!r} model; gpt.convert imports GPT-2 and Llama models only "
                           f"(serve others through the hf backend).")
    model = gpt2_from_hf_model(load_hf_gpt2(source))
    meta = {"source": source, "converted_from": "transformers GPT2LMHeadModel", "created": time.time()}
    return save_checkpoint(model, out, tokenizer or GPT2Tokenizer(), meta)


def is_gpt2_architecture(cfg: GPTConfig) -> bool:
    return cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.bias


def convert_to_hf(checkpoint: str, out: str | os.PathLike) -> Path:
    """Write a transformers directory (model, and the tokenizer files of template models) for a checkpoint."""
    model, tokenizer, meta = load_checkpoint(checkpoint)
    hf_model = gpt2_to_hf_model(model) if is_gpt2_architecture(model.config) else llama_to_hf_model(model)
    out = Path(out)
    hf_model.save_pretrained(str(out))
    if not isinstance(tokenizer, GPT2Tokenizer):  # GPT-2 dirs usually carry no tokenizer files
        tokenizer.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="an HF GPT-2 or Llama hub id or directory, `bundled` (the bundled SmolLM2 GGUF), "
                                    "or a Llama .gguf file; with --to-hf: a native checkpoint or `latest`")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--to-hf", action="store_true", help="export a native checkpoint to a transformers directory")
    args = parser.parse_args(argv)
    try:
        path = convert_to_hf(args.src, args.out) if args.to_hf else convert_to_native(args.src, args.out)
    except (ConvertError, LlamaImportError, FileNotFoundError) as e:  # incl. AssetMissing, CheckpointError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
