"""Native checkpoints: a directory with model.safetensors, config.json and meta.json.

    save_checkpoint(model, "models/native/my-run", tokenizer, meta={"iterations": 100})
    model, tokenizer, meta = load_checkpoint("latest")     # newest checkpoint under models/native/

Writes are atomic (a temporary sibling directory, renamed into place), so a crash never leaves a
half-written checkpoint under the target name. Loading never unpickles anything.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.assets import REPO_ROOT, AssetMissing
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
    """A checkpoint directory, or `latest`: the newest one under models/native/ (by meta.json's `created`).

    Hidden siblings (`.NAME.tmp-*` being written, `.NAME.old-*` being replaced) never count as checkpoints of
    their own. A save whose process died between its two renames is first finished (its new copy was
    complete) or undone, so NAME always names its newest complete copy; while a live save is between its
    renames, NAME's previous copy stands in for it.
    """
    if str(spec) == "latest":
        root = native_models_dir()
        found = []
        if root.is_dir():
            moved_aside = {p.name[1:].split(".old-")[0] for p in root.glob(".*.old-*")}
            for name in moved_aside:
                recover_interrupted_save(root / name)
            found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_checkpoint(p)]
            found += [old for name in moved_aside if not (root / name).exists() and (old := _replaced(root / name))]
        if not found:
            raise CheckpointError(f"No native checkpoint under {root}: run `make setup` (it converts the "
                                  f"bundled model) or `python -m training.finetune` to make one.")
        return max(found, key=_created)
    path = Path(spec)
    if not path.exists():
        recover_interrupted_save(path)
        if not path.exists() and _replaced(path):
            return _replaced(path)
    if not is_checkpoint(path):
        missing = [n for n in FILES if not (path / n).is_file()]
        raise CheckpointError(f"{path} is not a native checkpoint (missing {', '.join(missing)}): pass a "
                              f"directory written by gpt.convert or training.finetune, or `latest`.")
    return path


def _replaced(path: Path) -> Path | None:
    """The previous copy of `path` that a live save has moved aside for a moment, if any."""
    olds = [p for p in path.parent.glob(f".{glob.escape(path.name)}.old-*") if is_checkpoint(p)]
    return max(olds, key=lambda p: p.stat().st_mtime) if olds else None


def recover_interrupted_save(out_dir: Path) -> None:
    """Finish or undo a save of `out_dir` whose process died between its two renames.

    Then `out_dir` is missing and `.NAME.old-PID` holds the previous copy. The new copy `.NAME.tmp-PID-*`
    was complete (it is renamed only after every file is flushed), so it takes the name; without it the
    previous copy gets its name back. Nothing is deleted until a complete copy is under `out_dir`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        return
    for old in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.old-*"), key=lambda p: p.name):
        pid = old.name.rpartition("-")[2]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue  # a live save finishes on its own
        new = [p for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-{pid}-*") if is_checkpoint(p)]
        try:
            os.replace(max(new, key=lambda p: p.stat().st_mtime) if new else old, out_dir)
        except OSError:  # another process recovered it first, or the folder is read-only
            return
        if new:
            shutil.rmtree(old, ignore_errors=True)
        return


def _created(path: Path) -> float:
    try:
        return float(json.loads((path / "meta.json").read_text()).get("created", 0.0))
    except (OSError, ValueError):
        return 0.0


def save_checkpoint(model: GPT, out_dir: str | os.PathLike, tokenizer: Tokenizer, meta: dict | None = None) -> Path:
    """Write `model` atomically to `out_dir` (replacing an older checkpoint there only once complete)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(out_dir)  # before tidying up: the leftovers may hold the only copy
    _remove_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
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
            os.chmod(tmp / name, 0o644)
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
        if out_dir.exists():
            # Two renames: if the process dies between them, resolve_checkpoint finds the old one.
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:  # the save failed (or was interrupted): the previous copy keeps its name
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _remove_leftovers(out_dir: Path) -> None:
    """Delete `.NAME.tmp-PID-*` / `.NAME.old-PID` siblings left by saves whose process has died."""
    for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*-*"):
        kind, _, rest = path.name[len(out_dir.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def load_checkpoint(spec: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[GPT, Tokenizer, dict]:
    """Load a checkpoint (a directory or `latest`) as (model in eval mode, tokenizer, meta)."""
    path = resolve_checkpoint(spec)
    try:
        config = json.loads((path / "config.json").read_text())
        meta = json.loads((path / "meta.json").read_text())
        with torch.device("meta"):  # no random init of weights that are overwritten at once
            model = GPT(GPTConfig.from_dict(config["model"]))
        state = load_file(str(path / "model.safetensors"))
        if model.config.tie_embeddings:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        tokenizer = load_tokenizer(config.get("tokenizer", "gpt2"), base_dir=path)
    except AssetMissing:  # not the checkpoint's fault: its message says how to fetch the tokenizer
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # RuntimeError: weights that do not fit
        raise CheckpointError(f"{path} could not be read ({str(e)[:300]}): it may be damaged or incomplete; "
                              f"use another checkpoint or write it again.") from e
    if model.config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.to(device=device, dtype=dtype).eval()
    meta["path"] = str(path)
    return model, tokenizer, meta
