"""launch.py: flags, one-sentence refusals (exit 2), and a real start that is up in seconds and answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client
from live_server import free_port, write_tiny_config

import launch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, sentence", [
    (["--port", "abc"], "Argument --port: invalid int value: 'abc'; see python launch.py --help."),
    (["--port", "70000"], "--port must be between 1 and 65535, got 70000."),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 makes the chat reachable from other machines: add --auth"),
    (["--share"], "--share makes the chat reachable from other machines: add --auth"),
    (["--auth", "alice"], "--auth must be USER:PASSWORD with both parts non-empty"),
    (["--auth", ":pw"], "--auth must be USER:PASSWORD with both parts non-empty"),
    (["--verbose"], "Unrecognized arguments: --verbose; see python launch.py --help."),
])
def test_bad_flags_are_one_sentence_and_exit_2(capsys, argv, sentence):
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert sentence in err and err.count("\n") == 1 and "Traceback" not in err


def test_loopback_hosts_need_no_auth_and_exposed_hosts_accept_it():
    assert launch.is_loopback("127.0.0.1") and launch.is_loopback("localhost") and launch.is_loopback("::1")
    assert not launch.is_loopback("0.0.0.0") and not launch.is_loopback("192.168.1.5")
    args = launch.parse_args(["--host", "0.0.0.0", "--port", str(free_port()), "--auth", "alice:s3:cret"])
    assert args.auth == ("alice", "s3:cret")
    assert launch.parse_args(["--host", "0.0.0.0", "--port", str(free_port()), "--insecure-no-auth"]).auth is None


def test_a_port_in_use_is_refused_with_a_sentence(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert launch.main(["--port", str(busy.getsockname()[1])]) == 2
    assert "pass --port with a free port" in capsys.readouterr().err


def test_config_backend_and_history_problems_are_sentences(capsys, tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir):
    port = str(free_port())
    assert launch.main(["--port", port, "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    config = str(write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir))
    assert launch.main(["--port", port, "--config", config, "--backend", "nope"]) == 2
    assert "Unknown backend 'nope': choose one of native, hf." in capsys.readouterr().err
    assert launch.main(["--port", port, "--config", config, "--history", str(tmp_path / "no" / "log.jsonl")]) == 2
    assert "does not exist; create it or pass --history" in capsys.readouterr().err


def test_help_names_every_flag():
    out = subprocess.run([sys.executable, "launch.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--backend", "--config", "--history", "--auth", "--insecure-no-auth",
                 "--share"):
        assert flag in out.stdout


def test_importing_launch_switches_gradio_analytics_off_before_gradio_loads():
    code = "import launch, os, sys; print(os.environ['GRADIO_ANALYTICS_ENABLED'], 'gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "True"})
    assert out.stdout.split() == ["False", "False"]


def _start(args: list[str], tmp_path) -> tuple[subprocess.Popen, str, float]:
    """Run launch.py; returns the process, the URL line it printed, and the seconds until it did."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "True"}  # launch.py must switch it off itself
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "launch.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "is running at" in line:
            return proc, line, time.perf_counter() - start
    proc.wait(10)
    raise AssertionError(f"launch.py exited with {proc.returncode} before printing its URL")


def test_launch_prints_its_url_within_seconds_and_serves_the_chat(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir):
    config = write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir, default="hf")
    port = free_port()
    history = tmp_path / "history.jsonl"
    proc, line, seconds = _start(["--port", str(port), "--config", str(config), "--history", str(history),
                                  "--backend", "native"], tmp_path)
    try:
        assert f"http://127.0.0.1:{port}" in line and seconds < 30
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        assert client.predict(api_name="/chat", message="Hi")  # the default is now --backend native
        assert history.read_text().count('"backend": "native"') == 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_an_exposed_host_with_auth_refuses_clients_without_the_password(tmp_path, tiny_native_ckpt,
                                                                         tiny_gpt2_hf_dir):
    config = write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir)
    port = free_port()
    proc, _, _ = _start(["--host", "0.0.0.0", "--port", str(port), "--config", str(config),
                         "--history", str(tmp_path / "h.jsonl"), "--auth", "alice:s3cret"], tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises a plain ValueError/HTTP error here
            Client(url, verbose=False)
        client = Client(url, auth=("alice", "s3cret"), verbose=False)
        assert [b["key"] for b in client.predict(api_name="/backends")] == ["native", "hf"]
    finally:
        proc.terminate()
        proc.wait(30)
