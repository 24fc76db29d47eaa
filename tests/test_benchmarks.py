"""Smoke tests of the benchmarks: both run at a tiny size on CPU and report what docs/benchmarks.md quotes.

No timing assertions: speed on a shared CI machine says nothing; the keys, the id check and the
arithmetic between the reported figures are what these pin.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import decode, train
from gpt.quantize import INT8_BF16_MODULES

TINY_DECODE = ["--device", "cpu", "--dtype", "fp32", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
               "--prompt-tokens", "24", "--new-tokens", "6", "--repeats", "2", "--bandwidth-mib", "16", "--json"]


def last_json_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_decode_benchmark_json_has_the_agreed_keys_and_identical_ids(capsys):
    assert decode.main(TINY_DECODE + ["--no-ppl"]) == 0
    result = last_json_line(capsys)
    for key in ("native_tok_s", "hf_tok_s", "ratio", "identical", "native_ttft_s", "hf_ttft_s", "roofline_tok_s",
                "native_peak_mb", "hf_peak_mb", "native_roofline_pct", "hf_roofline_pct"):
        assert key in result, key
    assert result["identical"] is True
    assert result["native_deterministic"] is True
    assert result["native_tok_s"] > 0 and result["hf_tok_s"] > 0
    assert result["ratio"] == pytest.approx(result["native_tok_s"] / result["hf_tok_s"])
    assert result["native_roofline_pct"] == pytest.approx(100 * result["native_tok_s"] / result["roofline_tok_s"])
    assert result["device"] == "cpu" and result["native_fast_path"] is False
    assert "hf_static_tok_s" not in result  # transformers' static cache + compile is a CUDA-only comparison


def test_decode_benchmark_reports_the_weight_format_its_perplexity_ratio_and_prefill_speed(capsys):
    assert decode.main(TINY_DECODE + ["--weights", "int8"]) == 0
    result = last_json_line(capsys)
    assert result["weights"] == "int8" and result["dtype"] == "float32"  # transformers stays the fp32 reference
    assert result["bf16_products"] == list(INT8_BF16_MODULES)  # what the int8 format keeps in bf16, on record
    assert result["ppl_tokens"] > 2000  # the shipped text, tokenised
    assert result["ppl_ratio"] == pytest.approx(result["ppl"] / result["ppl_fp32"])
    assert 0.98 < result["ppl_ratio"] < 1.02
    assert result["native_prefill_tok_s"] == pytest.approx(result["prompt_tokens"] / result["native_ttft_s"])
    assert 0 <= result["matching_prefix"] <= result["new_tokens"]


def test_decode_benchmark_generates_every_requested_token_on_both_sides():
    native, hf, _ = decode.build_models("gpt2-124m", decode.torch.device("cpu"), decode.torch.float32, 7,
                                     dict(n_layer=1, n_head=2, n_embd=32))
    prompt = decode.prompt_ids(native.config.vocab_size, 10, 7)
    from gpt.engine import Engine

    native_run = decode.run_native(Engine(native), prompt, 9)
    hf_run = decode.run_hf(hf, prompt, 9, "dynamic")
    assert len(native_run.ids) == len(hf_run.ids) == 9  # no stop token on either side
    assert native_run.ids == hf_run.ids
    assert native_run.ttft_s > 0 and hf_run.ttft_s > 0


def test_decode_benchmark_refuses_a_prompt_longer_than_the_context(capsys):
    assert decode.main(TINY_DECODE[:-1] + ["--prompt-tokens", "1020", "--new-tokens", "10"]) == 2
    assert "context of 1024 tokens" in capsys.readouterr().err


def test_train_benchmark_reports_throughput_and_mfu_only_with_a_known_peak(capsys):
    tiny = ["--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "128",
            "--block", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--json"]
    assert train.main(tiny) == 0
    result = last_json_line(capsys)
    assert result["tokens_per_s"] == pytest.approx(2 * 16 / result["step_s"])
    assert result["mfu"] is None and result["peak_tflops"] is None
    assert result["final_loss"] > 0
    assert train.main(tiny + ["--peak-tflops", "1"]) == 0
    assert 0 < last_json_line(capsys)["mfu"] < 1


def test_serve_benchmark_reports_every_stream_count_for_both_backends(capsys):
    from benchmarks import serve

    assert serve.main(["--device", "cpu", "--dtype", "fp32", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                       "--streams", "1,3", "--prompt-tokens", "12", "--new-tokens", "5", "--repeats", "3",
                       "--json"]) == 0
    result = last_json_line(capsys)
    rows = {(r["backend"], r["streams"]): r for r in result["rows"]}
    assert set(rows) == {("native", 1), ("native", 3), ("hf-threads", 1), ("hf-threads", 3)}
    for r in rows.values():
        assert r["errors"] == 0 and r["agg_tok_s"] > 0 and r["itl_p95_ms"] >= r["itl_p50_ms"]
        assert sorted(r["agg_tok_s_rounds"])[1] == r["agg_tok_s"]  # the median of three rounds
    assert rows[("native", 3)]["vs_one"] == pytest.approx(rows[("native", 3)]["agg_tok_s"] / rows[("native", 1)]["agg_tok_s"])
    assert rows[("native", 3)]["same_as_alone"] == 9  # fp32 on CPU: batching changes no reply here (3 rounds)
    assert rows[("native", 3)]["same_of"] == 9
