"""Training hyperparameters: defaults here, a TOML file over them, command-line flags over that.

    cfg = load_config("configs/finetune.toml", overrides={"lr": 1e-4})   # ConfigError on bad values

Fine-tuning also accepts "auto" for the fields in AUTO_FIELDS (configs/finetune.toml sets most of them):
training.auto chooses those from the data and the device; a number in the file or a flag wins over it.

The TOML file holds top-level `key = value` lines named like the fields below (see configs/finetune.toml).
Both entry points (training.finetune, training.pretrain) share this one set of fields and its checks.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    """A hyperparameter or config file is invalid; the message names it and says what is allowed."""


@dataclass
class TrainConfig:
    max_iters: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    block_size: int = 512  # capped at the model's context length
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_iters: int = 20
    eval_interval: int = 25
    eval_iters: int = 20
    patience: int = 4  # evaluations without an improvement of at least min_delta before stopping
    min_delta: float = 1e-3
    dropout: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype on CUDA; weights stay fp32 for the optimizer
    seed: int = 1337
    compile: bool = False
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: str = "all"  # which matrices get adapters: all, attention or mlp
    epochs: float = 0.0  # > 0 with max_iters "auto": run this many passes over the training data
    replay: int = 0  # fine-tuning: general prompts whose base answers train alongside the log (training.replay)
    kl: float = 0.0  # LoRA fine-tuning: weight of a KL penalty to the base's next-token distribution (training.anchor)

    def to_dict(self) -> dict:
        return asdict(self)


# Help text for every field, shared by the TOML file's documentation and the command-line flags.
HELP = {
    "max_iters": "optimizer steps to run at most",
    "batch_size": "sequences per micro-batch (per process under torchrun)",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "block_size": "tokens per training sequence (capped at the model's context length)",
    "lr": "peak learning rate after warmup",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "steps of linear warmup from 0 to --lr",
    "eval_interval": "evaluate train/val loss (and keep the best checkpoint) every N steps",
    "eval_iters": "batches per loss evaluation",
    "patience": "stop after this many evaluations without a val-loss improvement of --min-delta (0: never)",
    "min_delta": "smallest val-loss decrease that counts as an improvement for early stopping",
    "dropout": "dropout probability during training",
    "weight_decay": "AdamW weight decay (applied to 2-D weights only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this value (0: no clipping)",
    "val_fraction": "share of conversations (or of the text) held out for validation",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "dtype": "auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, bf16 or fp16",
    "seed": "random seed for the data split, batches and initialisation",
    "compile": "compile the model with torch.compile (slow start, faster steps on GPU)",
    "lora_rank": "fine-tune rank-R LoRA adapters (on --lora-targets) instead of every weight "
                 "(0: full fine-tuning; LoRA wants a larger --lr, e.g. 1e-3); checkpoints are saved merged",
    "lora_alpha": "LoRA scale numerator: updates are scaled by lora_alpha / lora_rank",
    "lora_targets": "matrices that get LoRA adapters: all (attention and MLP), attention, or mlp",
    "epochs": "passes over the training data (used when --max-iters is auto)",
    "replay": "train also on the base model's own answers to this many of training.replay's general prompts, "
              "against forgetting (0: none)",
    "kl": "LoRA only: add this times the KL divergence from the base model's next-token distribution, at reply "
          "tokens where the data says what the base would, against forgetting (0: none)",
}

# Fields that fine-tuning may leave to training.auto (value "auto"); pretraining needs them all set.
AUTO_FIELDS = ("max_iters", "epochs", "batch_size", "block_size", "lr", "min_lr", "warmup_iters", "eval_interval",
               "eval_iters", "patience", "lora_rank", "lora_alpha", "replay", "kl")
AUTO = "auto"

_POSITIVE_INTS = ("max_iters", "batch_size", "grad_accum", "block_size", "eval_interval", "eval_iters")
_NON_NEGATIVE_INTS = ("warmup_iters", "patience", "lora_rank", "replay")


def validate(cfg: TrainConfig, allow_auto: bool = False) -> TrainConfig:
    """Raise ConfigError naming the first invalid field; returns `cfg` unchanged otherwise. With `allow_auto`,
    "auto" is accepted for AUTO_FIELDS (and those fields are checked once resolved)."""
    def fail(name, expected):
        raise ConfigError(f"{name.replace('_', '-')} must be {expected}, got {getattr(cfg, name)!r}.")

    original = cfg
    for name in AUTO_FIELDS:
        if getattr(cfg, name) == AUTO:
            if not allow_auto:
                fail(name, "a number here ('auto' is for fine-tuning only)")
            stand_in = 0.0 if name == "min_lr" else getattr(TrainConfig(), name)
            cfg = TrainConfig(**{**cfg.to_dict(), name: stand_in})  # check the others now

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

    for name in _POSITIVE_INTS:
        if not is_int(getattr(cfg, name)) or getattr(cfg, name) < 1:
            fail(name, "an integer >= 1")
    for name in _NON_NEGATIVE_INTS:
        if not is_int(getattr(cfg, name)) or getattr(cfg, name) < 0:
            fail(name, "an integer >= 0")
    if not is_num(cfg.lr) or cfg.lr <= 0:
        fail("lr", "a number > 0")
    if not is_num(cfg.min_lr) or not 0 <= cfg.min_lr <= cfg.lr:
        fail("min_lr", f"a number between 0 and lr ({cfg.lr})")
    for name in ("min_delta", "weight_decay", "grad_clip"):
        if not is_num(getattr(cfg, name)) or getattr(cfg, name) < 0:
            fail(name, "a number >= 0")
    if not is_num(cfg.epochs) or cfg.epochs < 0:
        fail("epochs", "a number >= 0")
    if not is_num(cfg.lora_alpha) or cfg.lora_alpha <= 0:
        fail("lora_alpha", "a number > 0")
    if not is_num(cfg.kl) or cfg.kl < 0:
        fail("kl", "a number >= 0")
    if cfg.kl and not cfg.lora_rank and original.lora_rank != AUTO:
        fail("kl", "0 without LoRA (the base it compares with is the model with its adapters off; set --lora-rank)")
    if cfg.lora_targets not in ("all", "attention", "mlp"):
        fail("lora_targets", "one of all, attention, mlp")
    if not is_num(cfg.dropout) or not 0 <= cfg.dropout < 1:
        fail("dropout", "a number in [0, 1)")
    for name in ("beta1", "beta2"):
        if not is_num(getattr(cfg, name)) or not 0 <= getattr(cfg, name) < 1:
            fail(name, "a number in [0, 1)")
    if not is_num(cfg.val_fraction) or not 0 < cfg.val_fraction < 1:
        fail("val_fraction", "a number strictly between 0 and 1")
    if cfg.dtype not in ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"):
        fail("dtype", "one of auto, fp32, bf16, fp16")
    if not isinstance(cfg.device, str) or not cfg.device:
        fail("device", "a device name such as auto, cpu or cuda")
    if not is_int(cfg.seed):
        fail("seed", "an integer")
    if not isinstance(cfg.compile, bool):
        fail("compile", "true or false")
    return original


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                defaults: dict | None = None, allow_auto: bool = False) -> TrainConfig:
    """Built-in defaults (updated by `defaults`), then the TOML file at `path` (if any), then `overrides`
    (None values are ignored). With `allow_auto`, AUTO_FIELDS may stay "auto" (see training.auto)."""
    values: dict = dict(defaults or {})
    if path is not None:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        except FileNotFoundError:
            raise ConfigError(f"Config file {path} does not exist: pass an existing --config file.") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"Config file {path} could not be read ({e}): fix its TOML syntax.") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"Unknown setting {unknown[0]!r} in {path or 'the overrides'}: "
                          f"use one of {', '.join(sorted(known))}.")
    cfg = TrainConfig()
    for name, value in values.items():
        # TOML writes 1e-4 as a float but 3 as an int; accept ints where floats are expected.
        if known[name].type == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        setattr(cfg, name, value)
    validate(cfg, allow_auto)
    return cfg


def add_config_flags(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One `--flag` per TrainConfig field (default None: the config file or the built-in default wins)."""
    group = parser.add_argument_group("hyperparameters (override the --config file)")
    shown = {**TrainConfig().to_dict(), **(defaults or {})}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = shown[f.name]
        help_text = f"{HELP[f.name]} (default {default})"
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            if f.name in AUTO_FIELDS:
                kind = _number_or_auto(kind)
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def _number_or_auto(kind):
    def parse(text: str):
        return AUTO if text == AUTO else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def overrides_from_args(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
