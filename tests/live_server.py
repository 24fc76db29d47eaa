"""A running app on a free loopback port for the UI tests (test_ui_api.py, test_browser.py); not a test itself.

    config_path = write_tiny_config(tmp_path, native_ckpt, hf_dir)
    with LiveApp(config_path, tmp_path / "log.jsonl") as app:
        Client(app.url).predict("Hi", api_name="/chat")
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_config(directory: Path, native_ckpt, hf_dir, extra: str = "", default: str = "native",
                      max_new_tokens: int = 8) -> Path:
    """An app config whose backends are the conftest's tiny random GPT-2 (native and transformers forms)."""
    path = Path(directory) / "app.toml"
    path.write_text(f"""
[app]
default_backend = "{default}"
system_prompt = "Be brief."
ready_for_finetune = 3

[generation]
max_new_tokens = {max_new_tokens}
temperature = 0.7
top_k = 50
top_p = 0.95
repetition_penalty = 1.1
stop = []

[backends.native]
label = "Tiny native GPT-2"
kind = "native"
checkpoint = {json.dumps(str(native_ckpt))}
weights = "fp32"  # the same arithmetic as transformers' entry (the CPU default, int8, is pinned in test_cpu_int8)

[backends.hf]
label = "Tiny transformers GPT-2"
kind = "hf"
model = {json.dumps(str(hf_dir))}
{extra}
""")
    return path


class LiveApp:
    """build_app + launch in this process (a background server thread), closed on exit."""

    def __init__(self, config_path, log_path, default_backend: str | None = None):
        self.config_path, self.log_path, self.default_backend = config_path, Path(log_path), default_backend

    def __enter__(self) -> LiveApp:
        from backends.registry import load_config
        from chatapp.ui import build_app

        self.demo = build_app(load_config(self.config_path), self.log_path, self.default_backend)
        self.service = self.demo.chat_service
        self.port = free_port()
        self.demo.launch(server_name="127.0.0.1", server_port=self.port, prevent_thread_lock=True, quiet=True)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.demo.close()

    def mark_log(self) -> None:
        """From now on log_lines() returns only lines written after this call."""
        self._seen = len(self._all_lines())

    def _all_lines(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def log_lines(self) -> list[dict]:
        return self._all_lines()[getattr(self, "_seen", 0):]

    def exchanges(self) -> list[dict]:
        return [r for r in self.log_lines() if r.get("type") is None]  # not feedback, not a conversation note

    def feedback(self) -> list[dict]:
        return [r for r in self.log_lines() if r.get("type") == "feedback"]


_WORD = re.compile(r"[A-Za-z0-9]+")


class SlowStream:
    """Wraps a real backend so each streamed piece takes a while: long enough to press Stop mid-reply."""

    delay = 0.1  # seconds per piece, for every instance (a test may change it mid-way)
    active = 0  # streams running right now, over all instances
    most_at_once = 0
    _lock = threading.Lock()

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def stream(self, prompt, cfg):
        pieces = self._backend.stream(prompt, cfg)
        with SlowStream._lock:
            SlowStream.active += 1
            SlowStream.most_at_once = max(SlowStream.most_at_once, SlowStream.active)
        try:
            for piece in pieces:
                time.sleep(SlowStream.delay)
                # The tiny random model samples any of GPT-2's tokens; markdown, HTML or runs of spaces
                # among them would render differently from the logged text, so tests that compare the two
                # get plain words, one space apart.
                yield "".join(" " + word for word in _WORD.findall(piece))
        finally:
            pieces.close()
            with SlowStream._lock:
                SlowStream.active -= 1

    @classmethod
    def factory(cls, delay: float):
        """A ModelSlots factory building the configured backend, slowed down."""
        from backends import create_backend

        cls.delay, cls.most_at_once = delay, 0
        return lambda key, config: cls(create_backend(key, config))
