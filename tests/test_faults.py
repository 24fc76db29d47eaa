"""Faults: the app killed with SIGKILL while 8 clients stream loses no finished exchange and leaves a log that
reads cleanly after a restart (tiny model from conftest, short replies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gradio_client import Client
from live_server import LiveApp, free_port, write_tiny_config

from gpt.chatlog import ChatLog

REPO = Path(__file__).resolve().parent.parent


def _launch(config: Path, history: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "launch.py", "--port", str(port), "--config", str(config),
                             "--history", str(history)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "is running at" in line:
            return proc
    proc.wait(10)
    raise AssertionError(f"launch.py exited with {proc.returncode} before printing its URL")


@pytest.mark.slow
def test_kill_9_while_eight_clients_stream_keeps_every_finished_exchange_once(tmp_path, tiny_native_ckpt,
                                                                              tiny_gpt2_hf_dir):
    config = write_tiny_config(tmp_path, tiny_native_ckpt, tiny_gpt2_hf_dir, max_new_tokens=16)
    history = tmp_path / "chat_history.jsonl"
    port = free_port()
    proc = _launch(config, history, port)
    finished: dict[str, str] = {}  # user message -> the reply its client received in full
    in_flight: set[str] = set()
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int) -> None:
        chat = Client(f"http://127.0.0.1:{port}", verbose=False)
        for n in range(1000):
            if stop.is_set():
                return
            message = f"client {i} message {n}"
            with lock:
                in_flight.add(message)
            try:
                reply = chat.predict(message, seed=n, temperature=1.0, api_name="/chat")
            except Exception:  # the server died under this request
                return
            with lock:
                in_flight.discard(message)
                finished[message] = reply

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(finished) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        with lock:
            proc.send_signal(signal.SIGKILL)  # mid-stream: no handler, no flush, no goodbye
            proc.wait(10)
            stop.set()
            killed_in_flight, done = set(in_flight), dict(finished)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    for t in threads:
        t.join(10)
    assert len(done) >= 4 and killed_in_flight  # replies were streaming when it died

    with open(history, "ab") as f:  # a crash mid-write on a full disk leaves half a line
        f.write(b'{"timestamp": "2026-11-22T05:00:00.000+00:00", "user": "half wri')
    with LiveApp(config, history) as app:  # the restart
        again = Client(app.url, verbose=False)
        after = [again.predict("after restart", api_name="/chat")]
        contents = ChatLog(history).read()

    assert contents.malformed == 1  # the torn line only: every other line parses
    logged: dict[str, list[str]] = {}
    for exchange in contents.exchanges:
        logged.setdefault(exchange.user, []).append(exchange.assistant)
    assert all(len(replies) == 1 for replies in logged.values())  # nothing logged twice
    for message, reply in done.items():
        assert logged.get(message) == [reply], message  # every finished exchange, as its client saw it
    assert set(logged) <= set(done) | killed_in_flight | {"after restart"}
    assert logged["after restart"] == after  # the restarted app appends cleanly after the torn line
    assert (os.stat(history).st_mode & 0o777) == 0o600
