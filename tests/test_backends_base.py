"""GenerationConfig: any value a caller can send is either a config that samples finitely or one sentence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import GenerationConfig
from backends.base import MAX_SEED
from gpt.sampling import SamplingParams, sample_next

FIELDS = GenerationConfig.field_names()

anything = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 0.0, 1e-40, 1e40, 0.01, 100.0, 2**63]),
    st.text(max_size=5), st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


def _sample_once(cfg: GenerationConfig) -> int:
    torch.manual_seed(0)
    logits = torch.randn(1, 64) * 30  # logits of real models stay within about +-100
    seen = torch.randint(0, 64, (1, 8))
    generator = torch.Generator()
    generator.manual_seed(cfg.seed if cfg.seed is not None else 1)
    params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    return int(sample_next(logits, params, seen, generator)[0])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), anything, max_size=4))
def test_any_values_give_a_config_that_samples_or_one_sentence_naming_the_field(values):
    try:
        cfg = GenerationConfig(**values)
    except ValueError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 300
        assert any(message.startswith(f"{name} must be") for name in values), message
        return
    assert 0 <= _sample_once(cfg) < 64  # finite probabilities: multinomial would raise on NaN or inf


@pytest.mark.parametrize("field, value, sentence", [
    ("seed", 2**64, "seed must be None (random) or a whole number from 0 to 9223372036854775807"),
    ("seed", -1, "seed must be None (random) or a whole number from 0 to"),
    ("temperature", 1e-40, "temperature must be 0 (greedy) or a number from 0.01 to 100.0, got 1e-40"),
    ("repetition_penalty", 1e-40, "repetition_penalty must be a number from 0.01 to 100.0"),
    ("repetition_penalty", 1e40, "repetition_penalty must be a number from 0.01 to 100.0"),
    ("stop", ("x" * 10_000,) * 2 + (3,), "stop must be a list of non-empty strings, got ('xxxx"),
])
def test_values_that_broke_sampling_are_refused_with_the_allowed_range(field, value, sentence):
    with pytest.raises(ValueError) as info:
        GenerationConfig(**{field: value})
    assert str(info.value).startswith(sentence) and len(str(info.value)) < 200


def test_the_extremes_allowed_still_sample_finitely():
    for temperature, penalty in [(0.01, 0.01), (0.01, 100.0), (100.0, 0.01), (100.0, 100.0), (0, 100.0)]:
        cfg = GenerationConfig(temperature=temperature, repetition_penalty=penalty, top_p=1e-300, seed=MAX_SEED)
        assert 0 <= _sample_once(cfg) < 64


def test_one_parser_reads_loose_values_over_defaults():
    defaults = GenerationConfig(temperature=0.2, seed=7)
    assert GenerationConfig.parse(None) == GenerationConfig()
    assert GenerationConfig.parse(defaults) is defaults
    parsed = GenerationConfig.parse({"top_k": 0, "stop": ["a", "b"], "max_new_tokens": 9}, defaults=defaults)
    assert parsed == GenerationConfig(temperature=0.2, seed=7, top_k=None, stop=("a", "b"), max_new_tokens=9)
    with pytest.raises(ValueError, match="Unknown generation setting.*temprature"):
        GenerationConfig.parse({"temprature": 1})
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig.parse({"top_p": 2}, defaults=defaults)
    with pytest.raises(TypeError, match="dict of its fields"):
        GenerationConfig.parse("temperature=1")
