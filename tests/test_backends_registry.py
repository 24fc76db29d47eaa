"""configs/app.toml and the registry: keys, labels, options, and the one-sentence errors users can cause.

    .venv/bin/python -m pytest tests/test_backends_registry.py
"""

from __future__ import annotations

import json
import shutil

import pytest

from backends import (
    BackendError,
    GenerationConfig,
    create_backend,
    generation_defaults,
    list_backends,
    load_config,
)
from backends.hf import HFBackend
from backends.native import NativeBackend
from backends.registry import DEFAULT_CONFIG

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0)


def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.rstrip().endswith((".", ")")), message


def test_app_config_has_the_app_settings_generation_defaults_and_three_backends():
    config = load_config()
    assert config["app"]["default_backend"] == "native"  # the batched engine, serving fine-tunes too
    assert config["app"]["history"] == "chat_history.jsonl"
    assert config["app"]["ready_for_finetune"] == 10 and config["app"]["system_prompt"]
    assert generation_defaults(config) == GenerationConfig()  # the defaults, in one place each
    listed = list_backends(config)
    assert [b["key"] for b in listed][:3] == ["smollm2", "native", "gpt2"]
    assert {b["key"]: b["kind"] for b in listed} == {"smollm2": "hf", "native": "native", "gpt2": "hf"}
    assert all(b["label"] and b["label"] != b["key"] for b in listed)
    assert config["backends"]["smollm2"]["gguf_file"] == "bundled"
    assert config["backends"]["native"]["checkpoint"] == "latest"
    assert config["backends"]["gpt2"]["model"] == "gpt2"


def test_config_path_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    custom = tmp_path / "app.toml"
    custom.write_text('[app]\ndefault_backend = "mine"\n[backends.mine]\nlabel = "Mine"\nkind = "hf"\nmodel = "x"\n')
    monkeypatch.setenv("NANOGPT_CHAT_CONFIG", str(custom))
    assert [b["key"] for b in list_backends()] == ["mine"]
    assert [b["key"] for b in list_backends(load_config(DEFAULT_CONFIG))][0] == "smollm2"


@pytest.mark.parametrize("text,expected", [
    ("[backends.x]\nkind = \"onnx\"\n", "kind"),
    ("[app\n", "not valid TOML"),
    ("[app]\ndefault_backend = \"nope\"\n", "default_backend"),
])
def test_bad_config_file_is_one_clear_sentence(tmp_path, text, expected):
    path = tmp_path / "app.toml"
    path.write_text(text)
    with pytest.raises(BackendError, match=expected) as err:
        load_config(path)
    _one_sentence(str(err.value))


def test_missing_config_file_says_what_to_do(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_unknown_key_names_the_known_keys():
    with pytest.raises(BackendError) as err:
        create_backend("llama-9000")
    message = str(err.value)
    assert "'llama-9000'" in message and all(key in message for key in ("smollm2", "native", "gpt2", "hf"))
    _one_sentence(message)


def test_unknown_option_is_refused_with_the_accepted_ones(tiny_native_ckpt):
    with pytest.raises(BackendError, match="checkpoint") as err:
        create_backend("native", checkpoint=str(tiny_native_ckpt), temprature=1)
    assert "temprature" in str(err.value)


def test_configured_key_and_bare_kind_build_the_right_classes(tiny_native_ckpt, tiny_gpt2_hf_dir):
    native = create_backend("native", checkpoint=str(tiny_native_ckpt))  # the key, its option overridden
    assert isinstance(native, NativeBackend) and native.name == "native"
    assert native.model_name == str(tiny_native_ckpt)
    hf = create_backend("hf", model=str(tiny_gpt2_hf_dir))
    assert isinstance(hf, HFBackend) and hf.name == "hf" and hf.model_name == str(tiny_gpt2_hf_dir)
    config = {"backends": {"tiny": {"label": "Tiny", "kind": "native", "checkpoint": str(tiny_native_ckpt)}}}
    assert create_backend("tiny", config).name == "tiny"


def test_backends_load_lazily(tiny_native_ckpt, tiny_gpt2_hf_dir):
    native = create_backend("native", checkpoint=str(tiny_native_ckpt))
    hf = create_backend("hf", model=str(tiny_gpt2_hf_dir))
    assert native._loaded is None and hf._loaded is None
    native.generate(native.format_chat([{"role": "user", "content": "Hi"}]), GREEDY)
    assert native._loaded is not None


def test_missing_checkpoint_is_one_clear_sentence(tmp_path, monkeypatch):
    with pytest.raises(BackendError, match="not a native checkpoint") as err:
        create_backend("native", checkpoint=str(tmp_path / "no-such-run"))
    _one_sentence(str(err.value))
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(tmp_path / "empty"))
    with pytest.raises(BackendError, match="make setup") as err:
        create_backend("native")  # checkpoint = "latest" with nothing under models/native
    _one_sentence(str(err.value))


def test_uncached_hub_id_offline_is_one_clear_sentence_and_fast():
    import time

    started = time.perf_counter()
    backend = create_backend("hf", model="nobody-here/not-a-cached-model")
    with pytest.raises(BackendError, match="not in the Hugging Face cache") as err:
        backend.generate("Hello", GREEDY)
    assert time.perf_counter() - started < 10
    assert "HF_HUB_OFFLINE" in str(err.value)
    _one_sentence(str(err.value))


def test_native_reload_picks_up_a_newer_latest_checkpoint(tiny_native_ckpt, tmp_path, monkeypatch):
    models = tmp_path / "native"
    models.mkdir()
    monkeypatch.setenv("NANOGPT_CHAT_MODELS", str(models))
    _copy_checkpoint(tiny_native_ckpt, models / "base", created=1.0)
    backend = create_backend("native")
    assert backend.model_name == str(models / "base")
    _copy_checkpoint(tiny_native_ckpt, models / "finetuned", created=2.0)
    assert backend.model_name == str(models / "base")  # a loaded backend keeps its model until reloaded
    assert backend.reload() == models / "finetuned"
    assert create_backend("native", checkpoint=str(models / "latest")).model_name == str(models / "finetuned")
    assert backend.model_name == str(models / "finetuned")
    prompt = backend.format_chat([{"role": "user", "content": "Hi"}])
    assert backend.generate(prompt, GREEDY) == create_backend("native", checkpoint=str(tiny_native_ckpt)).generate(
        prompt, GREEDY)


def test_stream_under_way_finishes_on_its_model_when_released(tiny_native_ckpt):
    backend = create_backend("native", checkpoint=str(tiny_native_ckpt))
    prompt = backend.format_chat([{"role": "user", "content": "Hi"}])
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    expected = backend.generate(prompt, cfg)
    stream = backend.stream(prompt, cfg)
    first = next(stream)
    backend.release()
    assert first + "".join(stream) == expected


def _copy_checkpoint(src, dst, created: float):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["created"] = created
    (dst / "meta.json").write_text(json.dumps(meta))


def test_app_settings_read_app_once_with_one_set_of_fallbacks():
    from backends import AppSettings

    bare = AppSettings({"backends": {"first": {"kind": "hf"}, "second": {"kind": "hf"}}})
    assert (bare.default_backend, bare.history, bare.system_prompt, bare.ready_for_finetune) == \
        ("first", "chat_history.jsonl", "", 10)
    assert bare.generation("first") == bare.generation() == GenerationConfig()
    chosen = AppSettings({"app": {"default_backend": "second", "history": "h.jsonl", "system_prompt": "Be kind.",
                                  "ready_for_finetune": 3}, "generation": {"top_k": 0, "stop": ["END"]},
                          "backends": {"first": {"kind": "hf"}, "second": {"kind": "hf"}}})
    assert (chosen.default_backend, chosen.history, chosen.system_prompt, chosen.ready_for_finetune) == \
        ("second", "h.jsonl", "Be kind.", 3)
    assert chosen.generation("first") == GenerationConfig(top_k=None, stop=("END",))
    with pytest.raises(BackendError, match="no backends"):
        _ = AppSettings({}).default_backend
