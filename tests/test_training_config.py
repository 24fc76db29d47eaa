"""Training hyperparameters: TOML file, flag overrides, validation, and the learning-rate schedule."""

from __future__ import annotations

import pytest

from training.config import ConfigError, TrainConfig, load_config, overrides_from_args
from training.finetune import DEFAULT_CONFIG, build_parser
from training.loop import lr_at


def test_the_shipped_config_file_is_valid_and_complete():
    cfg = load_config(DEFAULT_CONFIG, allow_auto=True)
    assert isinstance(cfg, TrainConfig) and cfg.lr == "auto" and cfg.max_iters == "auto"
    with pytest.raises(ConfigError, match="'auto' is for fine-tuning only"):
        load_config(DEFAULT_CONFIG)  # pretraining needs numbers
    text = DEFAULT_CONFIG.read_text()
    for key in ("max_iters", "lr", "min_lr", "patience", "min_delta", "eval_interval", "block_size"):
        assert f"\n{key} =" in text


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "ft.toml"
    path.write_text("lr = 1e-4\nbatch_size = 3\nmin_lr = 0\n")
    args = build_parser().parse_args(["--config", str(path), "--batch-size", "5", "--compile"])
    cfg = load_config(args.config, overrides_from_args(args))
    assert (cfg.lr, cfg.batch_size, cfg.min_lr, cfg.compile) == (1e-4, 5, 0.0, True)
    assert cfg.max_iters == TrainConfig().max_iters


@pytest.mark.parametrize("override, message", [
    ({"lr": -1.0}, "lr must be a number > 0"),
    ({"lr": 1e-4, "min_lr": 1e-3}, "min-lr must be a number between 0 and lr"),
    ({"batch_size": 0}, "batch-size must be an integer >= 1"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
    ({"patience": -1}, "patience must be an integer >= 0"),
    ({"val_fraction": 1.0}, "val-fraction must be a number strictly between 0 and 1"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_invalid_hyperparameters_name_the_field_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_unknown_keys_and_broken_files_are_reported(tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("learning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match="Unknown setting 'learning_rate'"):
        load_config(bad_key)
    broken = tmp_path / "b.toml"
    broken.write_text("lr = = 3\n")
    with pytest.raises(ConfigError, match="fix its TOML syntax"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    warm = [lr_at(i, cfg) for i in range(10)]
    assert warm == sorted(warm) and warm[0] < 0.2 and warm[-1] < 1.0
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    decay = [lr_at(i, cfg) for i in range(10, 111)]
    assert decay == sorted(decay, reverse=True)
