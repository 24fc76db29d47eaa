"""Native checkpoints: a directory with model.safetensors, config.json and meta.json.

    save_checkpoint(model, "models/native/my-run", tokenizer, meta={"iterations": 100})
    model, tokenizer, meta = load_checkpoint("latest")     # newest checkpoint under models/native/

Writes are atomic (a temporary sibling directory, renamed into place), so a crash never leaves a
half-written checkpoint under the target name. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpt.assets import REPO_ROOT
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import Tokenizer, load_tokenizer

FILES = ("model.safetensors", "config.json", "meta.json")


class CheckpointError(FileNotFoundError):
    """A checkpoint is missing or unreadable; the message says what to do."""


def native_models_dir() -> Path:
    return Path(os.environ.get("NANOGPT_CHAT_MODELS", REPO_ROOT / "models" / "native"))


def is_checkpoint(path: Path) -> bool:
    return all((Path(path) / name).is_file() for name in FILES)


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A checkpoint directory, or `latest`: the newest one under models/native/ (by meta.json's `created`)."""
    if str(spec) == "latest":
        root = native_models_dir()
        found = [p for p in root.iterdir() if p.is_dir() and is_checkpoint(p)] if root.is_dir() else []
        if not found:
            raise CheckpointError(f"No native checkpoint under {root}: run `make setup` (it converts the "
                                  f"bundled model) or `python -m training.finetune` to make one.")
        return max(found, key=_created)
    path = Path(spec)
    if not is_checkpoint(path):
        missing = [n for n in FILES if not (path / n).is_file()]
        raise CheckpointError(f"{path} is not a native checkpoint (missing {', '.join(missing)}): pass a "
                              f"directory written by gpt.convert or training.finetune, or `latest`.")
    return path


def _created(path: Path) -> float:
    try:
        return float(json.loads((path / "meta.json").read_text()).get("created", 0.0))
    except (OSError, ValueError):
        return 0.0


def save_checkpoint(model: GPT, out_dir: str | os.PathLike, tokenizer: Tokenizer, meta: dict | None = None) -> Path:
    """Write `model` atomically to `out_dir` (replacing an older checkpoint there only once complete)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # shared with wte; safetensors refuses shared tensors
        save_file(state, str(tmp / "model.safetensors"))
        config = {"model": model.config.to_dict(), "tokenizer": tokenizer.save(tmp)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        meta = dict(meta or {})
        meta.setdefault("created", time.time())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for name in os.listdir(tmp):  # flush file contents before the rename makes them visible
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_checkpoint(spec: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[GPT, Tokenizer, dict]:
    """Load a checkpoint (a directory or `latest`) as (model in eval mode, tokenizer, meta)."""
    path = resolve_checkpoint(spec)
    try:
        config = json.loads((path / "config.json").read_text())
        meta = json.loads((path / "meta.json").read_text())
        model = GPT(GPTConfig.from_dict(config["model"]))
        state = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} could not be read ({e}): it may be damaged; use another checkpoint.") from e
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.to(device=device, dtype=dtype).eval()
    meta["path"] = str(path)
    return model, load_tokenizer(config.get("tokenizer", "gpt2"), base_dir=path), meta
