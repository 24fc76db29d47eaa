"""The console chat, driven through stdin: streaming replies, every command, and one-sentence errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends import ChatBackend, GenerationConfig, create_backend, load_config
from chatapp.cli import ConsoleChat, main, parse_setting
from gpt.chatlog import ChatLog

REPO = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], stdin: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatapp.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_console_chat_through_stdin_runs_commands_and_logs_each_exchange(tiny_native_ckpt, tmp_path):
    history = tmp_path / "chat.jsonl"
    script = "\n".join([
        "/help",
        "/set temperature 0",
        "/set max_new_tokens 6",
        "/set temperature hot",
        "/set top_p 7",
        "/set colour red",
        "/frobnicate",
        "Hello there",
        "/system Be terse.",
        "/stats",
        "/reset",
        "Second question",
        "/set",
        "/backend",
        "/backend nosuch",
    ]) + "\n"  # then end of input: the chat must leave cleanly
    result = run_cli(["--backend", "native", "--checkpoint", str(tiny_native_ckpt), "--history", str(history)],
                     script, tmp_path)
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in out + result.stderr
    assert "/backend [KEY]" in out and "/system [TEXT]" in out  # the help
    assert "temperature = 0" in out and "max_new_tokens = 6" in out
    assert "error: temperature must be a number, got 'hot'" in out
    assert "error: top_p must be a number in (0, 1]" in out
    assert "Unknown setting 'colour': choose one of max_new_tokens" in out
    assert "Unknown command /frobnicate: type /help for the list." in out
    assert "1 conversations, 1 exchanges" in out  # /stats after the first exchange
    assert "Unknown backend 'nosuch'" in out
    assert "* native" in out  # the backend list marks the current one
    first, second = log_lines(history)
    assert first["user"] == "Hello there" and second["user"] == "Second question"
    assert first["config"]["temperature"] == 0 and first["config"]["max_new_tokens"] == 6
    assert first["backend"] == "native" and first["model"] == str(tiny_native_ckpt)
    assert first["system_prompt"] == load_config()["app"]["system_prompt"]
    assert second["system_prompt"] == "Be terse."
    assert first["conversation_id"] != second["conversation_id"] and second["turn"] == 0  # /reset
    # The reply was streamed to the console: what was logged is what was shown.
    assert f"assistant> {first['assistant']}\n" in out and f"assistant> {second['assistant']}\n" in out


def test_console_chat_reads_its_config_file_and_quits_on_quit(tiny_native_ckpt, tmp_path):
    config = tmp_path / "app.toml"
    config.write_text(f"""
[app]
default_backend = "tiny"
history = "{(tmp_path / 'from-config.jsonl').as_posix()}"
system_prompt = "Config says hi."

[generation]
max_new_tokens = 4
temperature = 0.0

[backends.tiny]
label = "tiny test model"
kind = "native"
checkpoint = "{Path(tiny_native_ckpt).as_posix()}"
""")
    result = run_cli(["--config", str(config)], "one\n/quit\nnever sent\n", tmp_path)
    assert result.returncode == 0, result.stderr
    [record] = log_lines(tmp_path / "from-config.jsonl")
    assert record["backend"] == "tiny" and record["system_prompt"] == "Config says hi."
    assert record["config"]["max_new_tokens"] == 4 and record["config"]["temperature"] == 0.0


@pytest.mark.parametrize("args, expected", [
    (["--backend", "nosuch"], "Unknown backend 'nosuch'"),
    (["--backend", "native", "--checkpoint", "no/such/dir"], "is not a native checkpoint"),
    (["--config", "no/such.toml"], "does not exist"),
])
def test_start_up_errors_are_one_sentence_not_a_traceback(tmp_path, capsys, args, expected):
    assert main(args + ["--history", str(tmp_path / "h.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1


def test_unwritable_chat_log_is_one_sentence_at_start_up(tiny_native_ckpt, tmp_path):
    # In a real process: the exit status and stderr are what a user sees.
    result = run_cli(["--backend", "native", "--checkpoint", str(tiny_native_ckpt), "--history", str(tmp_path)],
                     "hi\n", tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: Cannot write the chat log: {tmp_path} is a folder; pass --history with a file path.\n"


class Scripted(ChatBackend):
    """A real backend's tokenizer and format with a scripted reply; `interrupt`: the user presses Ctrl-C after
    the pieces, while the model is still working."""

    def __init__(self, real, pieces, interrupt=False):
        self.real, self.pieces, self.interrupt, self.name = real, pieces, interrupt, "scripted"

    context_length = property(lambda self: self.real.context_length)

    def encode(self, text):
        return self.real.encode(text)

    def decode(self, ids):
        return self.real.decode(ids)

    def format_chat(self, messages):
        return self.real.format_chat(messages)

    def prompt_ids(self, messages):
        return self.real.prompt_ids(messages)

    def stream(self, prompt, cfg):
        yield from self.pieces
        if self.interrupt:
            raise KeyboardInterrupt


@pytest.fixture
def console(tiny_native_ckpt, tmp_path):
    backend = create_backend("native", checkpoint=str(tiny_native_ckpt))
    return ConsoleChat(load_config(), "native", backend, ChatLog(tmp_path / "log.jsonl"),
                       GenerationConfig(max_new_tokens=5, temperature=0.0), "Be brief.", out=io.StringIO())


def test_ctrl_c_stops_the_reply_keeps_and_logs_the_partial_text(console):
    console.backend = Scripted(console.backend, [" Once upon", " a time"], interrupt=True)
    assert console.handle("Tell me a story")
    assert console.out.getvalue() == "assistant> Once upon a time [stopped]\n"
    assert console.history[-1] == {"role": "assistant", "content": "Once upon a time"}
    [record] = log_lines(console.log.path)
    assert record["assistant"] == "Once upon a time"
    assert console.handle("and then?")  # the chat goes on
    assert console.log.stats().exchanges == 2 and console.log.stats().conversations == 1


def test_a_reply_too_long_for_the_context_is_an_error_sentence(console):
    console.handle("/set max_new_tokens 500")
    console.handle("hello")
    assert "error: max_new_tokens (500) leaves no room for the prompt" in console.out.getvalue()
    assert console.history == [] and not console.log.path.exists()


def test_system_prompt_show_set_and_remove(console):
    for line in ("/system", "/system You are a pirate.", "/system", "/system none", "/system"):
        console.handle(line)
    assert console.out.getvalue().splitlines() == [
        "System prompt: 'Be brief.'", "System prompt set.", "System prompt: 'You are a pirate.'",
        "System prompt removed.", "No system prompt."]
    assert console.system_prompt is None


def test_set_parses_every_field_type():
    assert parse_setting("max_new_tokens", "32") == 32
    assert parse_setting("temperature", "0.5") == 0.5
    assert parse_setting("top_k", "none") is None and parse_setting("seed", "7") == 7
    assert parse_setting("stop", '["\\nQ:", "END"]') == ("\nQ:", "END")
    assert parse_setting("stop", "\\nQ:") == ("\nQ:",)
    assert parse_setting("stop", "none") == ()
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number"):
        parse_setting("max_new_tokens", "lots")
    with pytest.raises(ValueError, match="stop must be a JSON list"):
        parse_setting("stop", "[broken")


def test_context_note_when_older_messages_are_left_out(console):
    console.backend = Scripted(console.backend, [" Sure, " + "word " * 20])
    console.handle("/set max_new_tokens 60")
    for i in range(4):
        console.handle(f"message number {i} " + "word " * 6)
    assert "older messages left out of the prompt]" in console.out.getvalue()


def test_backend_switch_releases_the_old_model_and_keeps_the_conversation(tiny_native_ckpt, tmp_path):
    config = {"backends": {key: {"label": f"tiny {key}", "kind": "native", "checkpoint": str(tiny_native_ckpt)}
                           for key in ("first", "second")}}
    config["backends"]["second"]["generation"] = {"max_new_tokens": 4, "temperature": 0.0}
    old = create_backend("first", config)
    console = ConsoleChat(config, "first", old, ChatLog(tmp_path / "log.jsonl"),
                          GenerationConfig(max_new_tokens=3, temperature=0.0), None, out=io.StringIO())
    released = []
    old.release = lambda: released.append(True)
    console.handle("hi")
    console.handle("/backend second")
    assert console.backend_key == "second" and console.backend is not old
    assert released == [True]  # the old model's memory is freed
    assert "Now chatting with second (settings are second's defaults)" in console.out.getvalue()
    assert (console.cfg.max_new_tokens, console.cfg.temperature) == (4, 0.0)  # the new backend's own defaults
    console.handle("/set max_new_tokens 2")
    console.handle("/backend first")
    assert console.cfg.max_new_tokens == 2 and "your /set settings still apply" in console.out.getvalue()
    console.handle("/backend second")
    console.handle("again")
    first, second = log_lines(console.log.path)
    assert (first["backend"], second["backend"]) == ("first", "second")
    assert second["conversation_id"] == first["conversation_id"] and second["turn"] == 1
