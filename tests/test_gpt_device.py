"""Device and dtype choice: CUDA -> MPS -> CPU unless named; unknown or unavailable choices are clear errors.

Run: .venv/bin/python -m pytest tests/test_gpt_device.py
"""

from __future__ import annotations

import pytest
import torch

from gpt.device import pick_device, pick_dtype


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device(None).type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("") == torch.device("cpu")


def test_named_cpu_is_honoured_even_when_cuda_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, message", [("cuda", "CUDA is not available"), ("mps", "MPS is not available"),
                                           ("gpu", "device must be auto, cpu"), ("tpu", "device must be auto")])
def test_unavailable_or_unknown_device_is_a_clear_error(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        pick_device(name)


def test_cuda_index_beyond_the_devices_present_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        pick_device("cuda:1")


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                                         ("bfloat16", torch.bfloat16), (torch.float16, torch.float16)])
def test_dtype_names(name, dtype):
    assert pick_dtype(name, torch.device("cpu")) == dtype


def test_auto_dtype_is_fp32_on_cpu_and_bf16_on_a_bf16_gpu(monkeypatch):
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype(None, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype(None, torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="does not support bf16"):
        pick_dtype("bf16", torch.device("cuda"))


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype must be one of auto, fp32, bf16, fp16"):
        pick_dtype("int8", torch.device("cpu"))
