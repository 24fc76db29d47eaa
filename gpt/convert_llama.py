"""Import (and export) Llama-family models: the bundled SmolLM2 GGUF, any .gguf file, an HF Llama directory.

    python -m gpt.convert bundled models/native/smollm2-135m-instruct   # the bundled GGUF (gpt.assets)
    python -m gpt.convert path/to/model.gguf OUT                        # any Llama-architecture GGUF
    python -m gpt.convert path/to/llama-dir OUT                         # a save_pretrained LlamaForCausalLM
    python -m gpt.convert HuggingFaceTB/SmolLM2-360M-Instruct OUT        # a hub id (cached, or online)

transformers reads the GGUF: it dequantises the weights to fp32 and undoes llama.cpp's q/k row permutation,
so what lands here is exactly the state dict of a `LlamaForCausalLM`. The native names are then:

    model.embed_tokens                      -> transformer.wte
    layers.i.input_layernorm                -> transformer.h.i.ln_1
    layers.i.self_attn.{q,k,v}_proj         -> transformer.h.i.attn.c_attn   (rows: q, then k, then v)
    layers.i.self_attn.o_proj               -> transformer.h.i.attn.c_proj
    layers.i.post_attention_layernorm       -> transformer.h.i.ln_2
    layers.i.mlp.{gate,up}_proj             -> transformer.h.i.mlp.c_fc      (rows: gate, then up)
    layers.i.mlp.down_proj                  -> transformer.h.i.mlp.c_proj
    model.norm                              -> transformer.ln_f
    lm_head                                 -> lm_head (absent when tied to wte)

The tokenizer is saved as tokenizer.json + tokenizer_config.json (with the chat template, bos and eos), which
gpt.tokenizer.HFTokenizer reads without transformers. transformers is imported lazily, inside functions.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gpt.model import GPT, GPTConfig

BUNDLED = "bundled"


class LlamaImportError(RuntimeError):
    """The source is not a Llama model this engine can run; the message says what to do."""


def is_llama_source(source: str) -> bool:
    """True for `bundled`, a .gguf file, or a directory whose config.json says model_type "llama"."""
    if source == BUNDLED or source.lower().endswith(".gguf"):
        return True
    config = Path(source) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "llama"
    except ValueError:
        return False


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise LlamaImportError(f"this model uses {kind!r} rope scaling, which the native engine does not "
                               f"implement; serve it through the hf backend instead.")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def llama_config_from_hf(hf_config) -> GPTConfig:
    """The native config of a transformers LlamaConfig (rejecting variants the native model lacks)."""
    if getattr(hf_config, "model_type", "llama") != "llama":
        raise LlamaImportError(f"model_type {hf_config.model_type!r} is not a Llama model; the native engine "
                               f"imports GPT-2 and Llama checkpoints only.")
    n_head, n_embd = hf_config.num_attention_heads, hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or n_embd // n_head
    problems = []
    if head_dim * n_head != n_embd:
        problems.append(f"head_dim {head_dim} x {n_head} heads != hidden size {n_embd}")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        problems.append("attention or MLP biases")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {hf_config.hidden_act!r}")
    if problems:
        raise LlamaImportError(f"this Llama variant has {', '.join(problems)}, which the native model does not "
                               f"support; serve it through the hf backend instead.")
    return GPTConfig(
        vocab_size=hf_config.vocab_size, block_size=hf_config.max_position_embeddings,
        n_layer=hf_config.num_hidden_layers, n_head=n_head, n_embd=n_embd,
        n_kv_head=getattr(hf_config, "num_key_value_heads", None) or n_head,
        intermediate_size=hf_config.intermediate_size, bias=False, norm="rmsnorm",
        norm_eps=float(hf_config.rms_norm_eps), mlp="swiglu", pos="rope", rope_theta=_rope_theta(hf_config),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))


def llama_state_to_native(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse) a LlamaForCausalLM state dict into the native GPT's names."""
    out = {"transformer.wte.weight": state["model.embed_tokens.weight"],
           "transformer.ln_f.weight": state["model.norm.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        out[dst + "ln_1.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "ln_2.weight"] = state[src + "post_attention_layernorm.weight"]
        out[dst + "attn.c_attn.weight"] = torch.cat([state[src + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.c_proj.weight"] = state[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.c_fc.weight"] = torch.cat([state[src + "mlp.gate_proj.weight"],
                                                  state[src + "mlp.up_proj.weight"]])
        out[dst + "mlp.c_proj.weight"] = state[src + "mlp.down_proj.weight"]
    out["lm_head.weight"] = out["transformer.wte.weight"] if cfg.tie_embeddings else state["lm_head.weight"]
    return out


def native_state_to_llama(model: GPT) -> dict[str, torch.Tensor]:
    """The inverse of `llama_state_to_native`: split the fused matrices back into Llama's names."""
    cfg, state = model.config, model.state_dict()
    hd = cfg.head_dim
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ln_2.weight"]
        q, k, v = state[src + "attn.c_attn.weight"].split([cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd])
        out[dst + "self_attn.q_proj.weight"], out[dst + "self_attn.k_proj.weight"] = q, k
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.o_proj.weight"] = state[src + "attn.c_proj.weight"]
        gate, up = state[src + "mlp.c_fc.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.c_proj.weight"]
    out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def llama_from_hf_model(hf_model) -> GPT:
    """A native GPT with the weights of a transformers LlamaForCausalLM (fp32)."""
    cfg = llama_config_from_hf(hf_model.config)
    with torch.device("meta"):  # no random init: every weight is assigned below
        model = GPT(cfg)
    # clone: the native model must never share storage with (and so silently edit) the transformers one
    state = {k: v.detach().float().clone() for k, v in hf_model.state_dict().items()}
    model.load_state_dict(llama_state_to_native(state, cfg), strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def llama_to_hf_model(model: GPT):
    """A transformers LlamaForCausalLM with the weights of a native Llama-family model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rope_theta=cfg.rope_theta,
        attention_bias=False, mlp_bias=False, hidden_act="silu")
    hf_model = LlamaForCausalLM(hf_config)
    hf_model.load_state_dict(native_state_to_llama(model), strict=True)
    return hf_model.eval()


def resolve_llama_source(source: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for `bundled`, a .gguf path, a directory or a hub id."""
    if source == BUNDLED:
        from gpt.assets import SMOLLM2_GGUF, asset_path

        path = asset_path(SMOLLM2_GGUF)
        return str(path.parent), path.name
    path = Path(source)
    if source.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"{source} does not exist: pass the path of a .gguf file, or `bundled`.")
        return str(path.parent), path.name
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model directory (no config.json): pass a save_pretrained "
                                f"Llama directory, a .gguf file, or `bundled`.")
    return source, None  # a directory, or a hub id (from the cache when offline)


def load_hf_llama(source: str):
    """(LlamaForCausalLM in fp32, its transformers tokenizer) from `bundled`, a .gguf file or a directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = resolve_llama_source(source)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        hf_config = AutoConfig.from_pretrained(directory, **kwargs)
        llama_config_from_hf(hf_config)  # refuse unsupported variants before loading any weights
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        raise LlamaImportError(f"Could not load {source!r} with transformers ({str(e).splitlines()[0][:200]}); "
                               f"check that it is a complete Llama model with its tokenizer.") from None
    if len(tokenizer) == 0:  # transformers can hand back an empty tokenizer instead of failing
        raise LlamaImportError(f"{source!r} has no usable tokenizer; add tokenizer.json to the model directory.")
    return model.eval(), tokenizer


def export_tokenizer(hf_tokenizer, directory: Path, max_length: int | None = None) -> Path:
    """Write tokenizer.json and a tokenizer_config.json that carries the chat template, bos and eos
    (and `max_length`, the model's context, as model_max_length)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(directory))
    if not (directory / "tokenizer.json").is_file():
        raise LlamaImportError("this model's tokenizer has no fast (tokenizer.json) form; the native engine "
                               "needs one: convert it with transformers first.")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for key in ("is_local", "local_files_only", "backend"):  # facts about this load, not about the tokenizer
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the portable name for "a tokenizer.json"
    if max_length:
        config["model_max_length"] = max_length
    template = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        config["chat_template"] = template
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(hf_tokenizer, key, None)
        if value:
            config[key] = str(value)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (directory / "chat_template.jinja").unlink(missing_ok=True)  # it now lives in tokenizer_config.json
    return directory


def convert_llama_to_native(source: str, out, meta: dict | None = None) -> Path:
    """Convert `bundled`, a .gguf file or an HF Llama directory into a native checkpoint at `out` (atomically)."""
    from gpt.checkpoint import save_checkpoint
    from gpt.tokenizer import HFTokenizer

    hf_model, hf_tokenizer = load_hf_llama(source)
    model = llama_from_hf_model(hf_model)
    del hf_model
    with tempfile.TemporaryDirectory(prefix="nanogpt-tokenizer-") as tmp:
        tokenizer = HFTokenizer(export_tokenizer(hf_tokenizer, Path(tmp), model.config.block_size))
        if tokenizer.vocab_size > model.config.vocab_size:
            raise LlamaImportError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                   f"{model.config.vocab_size}; the model and tokenizer do not belong together.")
        directory, gguf_file = resolve_llama_source(source)
        info = {"source": str(Path(directory) / gguf_file) if gguf_file else directory,
                "converted_from": "GGUF via transformers" if gguf_file else "transformers LlamaForCausalLM"}
        return save_checkpoint(model, out, tokenizer, {**info, **(meta or {})})
