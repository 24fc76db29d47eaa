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
    assert args.auth == [("alice", "s3:cret")]
    assert launch.parse_args(["--host", "0.0.0.0", "--port", str(free_port()), "--insecure-no-auth"]).auth is None


def test_the_login_comes_from_a_file_or_the_environment_and_auth_on_the_command_line_warns(
        capsys, tmp_path, monkeypatch):
    port = str(free_port())
    logins = tmp_path / "logins"
    logins.write_text("alice:s3:cret\n\n# bob is away\ncarol:pw\n")
    args = launch.parse_args(["--host", "0.0.0.0", "--port", port, "--auth-file", str(logins)])
    assert args.auth == [("alice", "s3:cret"), ("carol", "pw")] and capsys.readouterr().err == ""
    monkeypatch.setenv("NANOGPT_CHAT_AUTH", "dave:secret")
    assert launch.parse_args(["--host", "0.0.0.0", "--port", port]).auth == [("dave", "secret")]
    assert launch.parse_args(["--port", port, "--auth", "eve:pw"]).auth == [("eve", "pw")]
    warning = capsys.readouterr().err
    assert "--auth puts the password on the command line" in warning and "--auth-file" in warning


@pytest.mark.parametrize("content, argv, sentence", [
    (None, ["--auth-file", "{missing}"], "Cannot read --auth-file"),
    ("# only a comment\n", ["--auth-file", "{file}"], "has no USER:PASSWORD line: add one."),
    ("alice:pw\nbob\n", ["--auth-file", "{file}"], "Line 2 of --auth-file"),
    ("alice:pw\n", ["--auth-file", "{file}", "--auth", "a:b"], "Give --auth-file or --auth, not both."),
])
def test_auth_file_problems_are_one_sentence(capsys, tmp_path, content, argv, sentence):
    path = tmp_path / "logins"
    if content is not None:
        path.write_text(content)
    argv = [a.format(missing=tmp_path / "missing", file=path) for a in argv]
    assert launch.main(["--port", str(free_port()), *argv]) == 2
    err = capsys.readouterr().err
    assert sentence in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("toml, sentence", [
    ('app = 5\n', "app in {path} must be a [app] section (a table), got 5"),
    ('generation = [1]\n', "generation in {path} must be a [generation] section"),
    ('[app]\nhistory = 5\n', "[app] history in {path} must be a string (a file path), got 5"),
    ('[app]\nready_for_finetune = "ten"\n', "[app] ready_for_finetune in {path} must be a whole number"),
    ('[app]\nmax_message_chars = "big"\n', "[app] max_message_chars in the config must be a whole number >= 1"),
    ('[app]\nrelease_unused_after_s = -1\n', "[app] release_unused_after_s in the config must be a number"),
    ('[generation]\ntemperature = "hot"\n', "The generation defaults for the app are invalid (temperature must be 0 (greedy) or"),
    ('[generation]\nseed = -3\n', "The generation defaults for the app are invalid (seed must be None (random) or a whole number"),
    ('[backends.x]\nkind = "native"\nlabel = 5\n', "label of [backends.x] in {path} must be a string"),
])
def test_config_values_of_the_wrong_type_are_one_sentence_and_exit_2(capsys, tmp_path, toml, sentence):
    path = tmp_path / "app.toml"
    path.write_text(toml + ('\n[backends.n]\nkind = "native"\n' if "backends" not in toml else ""))
    assert launch.main(["--port", str(free_port()), "--config", str(path),
                        "--history", str(tmp_path / "h.jsonl")]) == 2
    err = capsys.readouterr().err
    assert sentence.format(path=path) in err and err.count("\n") == 1 and "Traceback" not in err


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
    for flag in ("--host", "--port", "--backend", "--config", "--history", "--auth-file", "--auth",
                 "--insecure-no-auth",
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
    logins = tmp_path / "logins"
    logins.write_text("# who may log in\nalice:s3cret\n")
    proc, _, _ = _start(["--host", "0.0.0.0", "--port", str(port), "--config", str(config),
                         "--history", str(tmp_path / "h.jsonl"), "--auth-file", str(logins)], tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises a plain ValueError/HTTP error here
            Client(url, verbose=False)
        client = Client(url, auth=("alice", "s3cret"), verbose=False)
        assert [b["key"] for b in client.predict(api_name="/backends")] == ["native", "hf"]
    finally:
        proc.terminate()
        proc.wait(30)
