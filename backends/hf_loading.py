"""Loading a transformers causal LM and its tokenizer: hub id, local directory, or GGUF file.

Used by backends/hf.py; every failure a user can cause becomes one `BackendError` sentence:
- a hub id that is not cached while the hub is unreachable fails at once (never minutes of retries);
- a GPT-2 directory without tokenizer files gets the offline GPT-2 tokenizer (models/assets/gpt2.tiktoken);
- an empty tokenizer (what an offline hub lookup can silently return) is refused;
- a GGUF file is dequantised once (~20 s for the bundled SmolLM2) and cached as safetensors under
  models/cache/ (env NANOGPT_CHAT_CACHE), so later loads take ~2 s.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from backends.base import BackendError
from gpt.assets import GPT2_BPE, REPO_ROOT, SMOLLM2_GGUF, AssetMissing, asset_path, sha256_of
from gpt.tokenizer import GPT2_EOT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `location` is a local directory or a hub id; `gguf` a local GGUF file."""

    location: str
    gguf: Path | None = None

    @property
    def description(self) -> str:
        return str(self.gguf) if self.gguf else self.location


def cache_dir() -> Path:
    return Path(os.environ.get("NANOGPT_CHAT_CACHE", REPO_ROOT / "models" / "cache"))


def resolve_source(model: str | None, gguf_file: str | None) -> ModelSource:
    """Turn the `model`/`gguf_file` options into a ModelSource; local files are checked here."""
    if gguf_file == "bundled":
        try:
            return ModelSource(str(asset_path(SMOLLM2_GGUF).parent), asset_path(SMOLLM2_GGUF))
        except AssetMissing as e:
            raise BackendError(str(e)) from None
    if gguf_file:
        candidates = [Path(gguf_file)] + ([Path(model) / gguf_file] if model else [])
        for path in candidates:
            if path.is_file():
                return ModelSource(str(path.parent), path.resolve())
        if model and not Path(model).is_dir():
            return ModelSource(model, _hub_file(model, gguf_file))
        raise BackendError(f"GGUF file {gguf_file!r} was not found{f' in {model}' if model else ''}: pass the "
                           f"path of an existing .gguf file, or gguf_file=\"bundled\" for the bundled SmolLM2.")
    if not model:
        raise BackendError("The hf backend needs a model: a hub id (model=\"gpt2\"), a local directory, or a "
                           "GGUF file (gguf_file=...).")
    return ModelSource(model)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hugging Face hub be reached? A bounded probe, so an offline machine answers in seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def probe():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer)


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _not_cached(repo_id: str, what: str) -> BackendError:
    return BackendError(
        f"{repo_id!r} is not a local directory and {what} is not in the Hugging Face cache, and the hub cannot "
        f"be reached (offline{' mode: HF_HUB_OFFLINE is set' if hub_offline() else ''}): connect once to "
        f"download it, or pass a local model directory or a GGUF file instead.")


def _hub_local_only(repo_id: str, filename: str) -> bool:
    """True when the hub must not be contacted (cached, but offline); raises when neither works."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, filename), str)
    except HFValidationError:
        raise BackendError(f"{repo_id!r} is neither an existing local directory nor a valid Hugging Face hub id "
                           f"(like \"gpt2\" or \"org/name\"): check the spelling.") from None
    if hub_offline():
        if not cached:
            raise _not_cached(repo_id, filename)
        return True
    online = hub_reachable()
    if not online and not cached:
        raise _not_cached(repo_id, filename)
    return not online


def _hub_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    local_only = _hub_local_only(repo_id, filename)
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
    except Exception as e:  # noqa: BLE001 - the hub library raises many kinds; all mean "not available"
        raise BackendError(f"Could not get {filename} from {repo_id!r} ({e.__class__.__name__}): check the repo "
                           f"id and file name, or download the file and pass its path.") from None


def load_model_and_tokenizer(source: ModelSource, device: torch.device, dtype: torch.dtype):
    """(model in eval mode on `device`, tokenizer) for `source`."""
    from transformers import AutoModelForCausalLM

    if source.gguf is not None:
        model, tokenizer = _load_gguf(source.gguf, dtype)
    else:
        local = Path(source.location).is_dir()
        local_only = False if local else _hub_local_only(source.location, "config.json")
        try:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, local_files_only=local_only)
        except OSError as e:
            raise BackendError(f"Could not load a model from {source.location!r} ({str(e).splitlines()[0][:200]}): "
                               f"pass a directory written by save_pretrained, a cached hub id, or a GGUF file.") from None
        tokenizer = _load_tokenizer(source.location, model.config, local, local_only)
    check_tokenizer(tokenizer, source.description)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _load_tokenizer(location: str, config, local: bool, local_only: bool):
    from transformers import AutoTokenizer

    if local and not any((Path(location) / name).is_file() for name in TOKENIZER_FILES):
        if config.model_type == "gpt2":
            return offline_gpt2_tokenizer()
        raise BackendError(f"{location} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the "
                           f"tokenizer into it with tokenizer.save_pretrained(dir).")
    try:
        return AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise BackendError(f"Could not load the tokenizer of {location!r} ({str(e).splitlines()[0][:200]}): "
                           f"save it next to the model with tokenizer.save_pretrained(dir).") from None


def check_tokenizer(tokenizer, what: str) -> None:
    """Refuse an empty tokenizer: offline, a hub lookup can return one silently (encode gives [])."""
    if len(tokenizer) <= 1 or not tokenizer.encode("Hello world", add_special_tokens=False):
        raise BackendError(f"The tokenizer for {what} is empty (an offline hub lookup that found no files): "
                           f"download the model's tokenizer files, or pass a directory that contains them.")


_GPT2_TOKENIZER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def offline_gpt2_tokenizer():
    """GPT-2's tokenizer built from the offline BPE ranks; cached on disk and shared in this process (every
    user encodes plain text with the same settings, so sharing it is safe)."""
    from transformers import GPT2TokenizerFast

    try:
        bpe = asset_path(GPT2_BPE)
    except AssetMissing as e:
        raise BackendError(str(e)) from None
    target = cache_dir() / f"gpt2-tokenizer-{GPT2_BPE.sha256[:12]}"
    with _GPT2_TOKENIZER_LOCK:
        if not (target / "tokenizer.json").is_file():
            from tiktoken_ext.openai_public import r50k_pat_str
            from transformers.convert_slow_tokenizer import TikTokenConverter

            backend = TikTokenConverter(vocab_file=str(bpe), pattern=r50k_pat_str,
                                        extra_special_tokens={GPT2_EOT: 50256}).converted()
            tokenizer = GPT2TokenizerFast(tokenizer_object=backend, eos_token=GPT2_EOT, bos_token=GPT2_EOT,
                                          unk_token=GPT2_EOT, model_max_length=1024)
            _write_atomically(target, tokenizer.save_pretrained)
    return GPT2TokenizerFast.from_pretrained(str(target))


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF model; the first load dequantises it and caches a safetensors copy for later loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = SMOLLM2_GGUF.sha256 if path.name == SMOLLM2_GGUF.filename and path.parent == _bundled_dir() \
        else sha256_of(path)  # the bundled file was checked against this hash when it was fetched
    cached = cache_dir() / f"{path.stem}-{digest[:12]}"
    if (cached / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, local_files_only=True)
        return model, AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True)
    except ImportError as e:
        raise BackendError(f"Loading a GGUF file needs more packages ({e}): run `make setup`.") from None
    except (OSError, ValueError, KeyError) as e:
        raise BackendError(f"{path} could not be loaded as a GGUF model ({str(e).splitlines()[0][:200]}): "
                           f"check that it is a complete GGUF file of an architecture transformers supports.") from None
    try:
        _write_atomically(cached, lambda tmp: _save_dequantised(model, tokenizer, tmp))
    except OSError:
        pass  # a read-only models/ folder only costs the next load its ~20 s again
    return model, tokenizer


def _bundled_dir() -> Path:
    try:
        return asset_path(SMOLLM2_GGUF).parent
    except AssetMissing:
        return Path()


def _save_dequantised(model, tokenizer, out: Path) -> None:
    """save_pretrained refuses a GGUF-loaded model; a model built from its config without the quantisation
    note, holding the same tensors (no copy, no random init), saves fine."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _write_atomically(target: Path, write) -> None:
    """Write a directory through `write(tmp)` and rename it into place: never half a cache under `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp (and safetensors) make it private; the cache serves every user here
        for item in tmp.iterdir():
            if item.is_file():
                os.chmod(item, 0o644)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # another process finished first: its copy is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

