"""Per-backend generation defaults: the app's [generation], a model's generation_config.json, an entry's table."""

from __future__ import annotations

import json
import shutil

import pytest

from backends import BackendError, GenerationConfig, create_backend
from backends.registry import generation_defaults, load_config


def write_config(tmp_path, body: str):
    path = tmp_path / "app.toml"
    path.write_text("""
[generation]
max_new_tokens = 100
temperature = 0.7
top_k = 50
top_p = 0.95
repetition_penalty = 1.1
""" + body)
    return load_config(path)


def test_an_entry_without_settings_of_its_own_gets_the_app_wide_generation_table(tmp_path):
    config = write_config(tmp_path, '[backends.plain]\nkind = "hf"\nmodel = "gpt2"\n')
    assert generation_defaults(config, "plain") == GenerationConfig(max_new_tokens=100, temperature=0.7, top_k=50,
                                                                    top_p=0.95, repetition_penalty=1.1)
    assert generation_defaults(config, "plain") == generation_defaults(config)  # None: the app-wide ones


def test_an_entry_table_overrides_the_app_wide_fields_it_names_and_keeps_the_rest(tmp_path):
    config = write_config(tmp_path, """
[backends.small]
kind = "hf"
model = "gpt2"
[backends.small.generation]
temperature = 0.2
top_p = 0.9
top_k = 0
stop = ["\\nUser:"]
""")
    d = generation_defaults(config, "small")
    assert (d.temperature, d.top_p, d.top_k, d.stop) == (0.2, 0.9, None, ("\nUser:",))  # top_k 0: off
    assert (d.max_new_tokens, d.repetition_penalty) == (100, 1.1)


def test_a_native_checkpoints_generation_config_json_is_read_and_do_sample_false_means_greedy(
        tmp_path, tiny_native_ckpt):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_native_ckpt, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "do_sample": False, "temperature": 0.6, "top_p": 0.8, "top_k": 20,
         "repetition_penalty": 1.05, "max_new_tokens": 64, "max_length": 2048}))
    config = write_config(tmp_path, f'[backends.mine]\nkind = "native"\ncheckpoint = {json.dumps(str(ckpt))}\n')
    d = generation_defaults(config, "mine")
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_new_tokens) == (0.0, 0.8, 20, 1.05, 64)


def test_the_entry_table_wins_over_the_model_file_and_an_hf_directory_is_read_too(tmp_path, tiny_gpt2_hf_dir):
    model = tmp_path / "hf-model"
    shutil.copytree(tiny_gpt2_hf_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.3, "top_p": 0.5}))
    config = write_config(tmp_path, f"""
[backends.mine]
kind = "hf"
model = {json.dumps(str(model))}
[backends.mine.generation]
top_p = 0.85
""")
    d = generation_defaults(config, "mine")
    assert (d.temperature, d.top_p) == (0.3, 0.85)


def test_an_unreadable_model_file_is_no_preference(tmp_path, tiny_gpt2_hf_dir):
    model = tmp_path / "hf-model"
    shutil.copytree(tiny_gpt2_hf_dir, model)
    (model / "generation_config.json").write_text("{not json")
    config = write_config(tmp_path, f'[backends.mine]\nkind = "hf"\nmodel = {json.dumps(str(model))}\n')
    assert generation_defaults(config, "mine") == generation_defaults(config)


def test_a_bad_entry_setting_is_one_sentence_naming_the_field_and_where_to_fix_it(tmp_path):
    config = write_config(tmp_path, '[backends.b]\nkind = "hf"\nmodel = "gpt2"\n[backends.b.generation]\ntop_p = 3\n')
    with pytest.raises(BackendError, match=r"top_p.*\[backends\.b\.generation\]"):
        generation_defaults(config, "b")
    config = write_config(tmp_path, '[backends.b]\nkind = "hf"\nmodel = "gpt2"\n[backends.b.generation]\ntemp = 1\n')
    with pytest.raises(BackendError, match="Unknown generation setting.*temp"):
        generation_defaults(config, "b")


def test_the_generation_table_is_not_passed_to_the_backend_class(tmp_path, tiny_native_ckpt):
    config = write_config(tmp_path, f"""
[backends.mine]
kind = "native"
checkpoint = {json.dumps(str(tiny_native_ckpt))}
[backends.mine.generation]
temperature = 0.1
""")
    assert create_backend("mine", config).name == "mine"


def test_the_bundled_smollm2_entries_default_to_greedy_with_its_authors_top_p():
    config = load_config()  # the shipped configs/app.toml; docs/benchmarks.md has the measurement behind it
    for key in ("smollm2", "native"):
        d = generation_defaults(config, key)
        assert (d.temperature, d.top_p, d.repetition_penalty) == (0.0, 0.9, 1.0), key
