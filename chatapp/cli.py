"""Console chat: talk to any configured backend in a terminal, with the reply streamed as it is generated.

    python -m chatapp.cli                                  # the default backend of configs/app.toml
    python -m chatapp.cli --backend native --checkpoint models/native/my-run --history chat.jsonl

Type a message and press Enter. Commands: /help, /backend [KEY], /set [FIELD VALUE], /system [TEXT],
/reset, /stats, /quit. Ctrl-C stops a reply half-way (the partial reply is kept and logged); Ctrl-D or end of
input leaves. Every exchange is appended to the chat log, which fine-tuning reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TextIO

from backends import (
    AppSettings,
    BackendError,
    GenerationConfig,
    create_backend,
    generation_defaults,
    list_backends,
)
from chatapp.chat import new_conversation_id, respond
from gpt.chatlog import ChatLog, ChatLogError
from gpt.scheduler import stop_all

HELP = """Commands:
  /help                 this list
  /backend [KEY]        switch to backend KEY (alone: list the configured backends)
  /set [FIELD VALUE]    change a generation setting, e.g. /set temperature 0.5 (alone: show them all)
                        fields: {fields}; `none` clears top_k, seed or stop;
                        stop takes a JSON list (/set stop ["\\nQ:", "END"]) or one string with \\n escapes
  /system [TEXT]        set the system prompt (alone: show it; /system none removes it)
  /reset                start a new conversation
  /stats                what the chat log holds
  /quit                 leave (so do Ctrl-D and /exit)"""

INT_FIELDS = {"max_new_tokens", "top_k", "seed"}
FLOAT_FIELDS = {"temperature", "top_p", "repetition_penalty"}
NULLABLE = {"top_k", "seed"}


class ConsoleChat:
    """The state of one console session; `handle(line)` runs a message or a command, False means leave."""

    def __init__(self, config: dict, backend_key: str, backend, log: ChatLog, cfg: GenerationConfig,
                 system_prompt: str | None, ready_threshold: int = 10, out: TextIO = sys.stdout):
        self.config, self.backend_key, self.backend, self.log = config, backend_key, backend, log
        self.cfg, self.system_prompt, self.ready_threshold, self.out = cfg, system_prompt, ready_threshold, out
        self.history: list[dict] = []
        self.conversation_id = new_conversation_id()
        self.customised = False  # the user /set a field: their settings outlive a backend switch

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.chat(line)
            return True
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command in ("/quit", "/exit"):
            return False
        actions = {"/help": self.show_help, "/backend": self.switch_backend, "/set": self.set_field,
                   "/system": self.set_system, "/reset": self.reset, "/stats": self.show_stats}
        if command not in actions:
            self.say(f"Unknown command {command}: type /help for the list.")
            return True
        actions[command](arg)
        return True

    def chat(self, message: str) -> None:
        self.out.write("assistant> ")
        self.out.flush()
        shown = ""
        final = None
        stream = respond(self.backend, self.history, message, self.cfg, system_prompt=self.system_prompt,
                         log=self.log, backend_key=self.backend_key, conversation_id=self.conversation_id)
        try:
            for update in stream:
                self.out.write(update.text[len(shown):])  # shown text only ever grows (see chatapp.chat)
                self.out.flush()
                shown, final = update.text, update
        except KeyboardInterrupt:
            stream.close()
            self.say(" [stopped]")
        except (BackendError, ValueError, ChatLogError) as e:
            self.say()
            self.say(f"error: {e}")
            return
        else:
            self.say()
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": shown}]
        if final is not None and (final.prompt.dropped or final.prompt.truncated):
            cut = " and the start of your message" if final.prompt.truncated else ""
            self.say(f"[context full: {final.prompt.dropped} older messages{cut} left out of the prompt]")

    def show_help(self, arg: str) -> None:
        self.say(HELP.format(fields=", ".join(GenerationConfig.field_names())))

    def switch_backend(self, key: str) -> None:
        if not key:
            for entry in list_backends(self.config):
                mark = "*" if entry["key"] == self.backend_key else " "
                self.say(f"{mark} {entry['key']:<10} {entry['label']} ({entry['kind']})")
            return
        try:
            backend = create_backend(key, self.config)
        except (BackendError, ValueError) as e:
            self.say(f"error: {e}")
            return
        self.backend.release()  # free the old model's memory before the new one loads
        self.backend, self.backend_key = backend, key
        if self.customised:
            settings = "your /set settings still apply"
        else:
            self.cfg, settings = generation_defaults(self.config, key), f"settings are {key}'s defaults"
        self.say(f"Now chatting with {key} ({settings}); the conversation so far is kept (/reset starts over).")

    def set_field(self, arg: str) -> None:
        if not arg:
            for name, value in dataclasses.asdict(self.cfg).items():
                self.say(f"  {name} = {value!r}")
            return
        name, _, raw = arg.partition(" ")
        raw = raw.strip()
        if name not in GenerationConfig.field_names():
            self.say(f"Unknown setting {name!r}: choose one of {', '.join(GenerationConfig.field_names())}.")
            return
        if not raw:
            self.say(f"Give a value: /set {name} VALUE.")
            return
        try:
            self.cfg = GenerationConfig.parse({name: parse_setting(name, raw)}, defaults=self.cfg)
            self.customised = True
        except ValueError as e:
            self.say(f"error: {e}")
            return
        self.say(f"{name} = {getattr(self.cfg, name)!r}")

    def set_system(self, text: str) -> None:
        if not text:
            self.say(f"System prompt: {self.system_prompt!r}" if self.system_prompt else "No system prompt.")
            return
        self.system_prompt = None if text.lower() == "none" else text
        self.say("System prompt removed." if self.system_prompt is None else "System prompt set.")

    def reset(self, arg: str) -> None:
        self.history = []
        self.conversation_id = new_conversation_id()
        self.say("New conversation.")

    def show_stats(self, arg: str) -> None:
        try:
            stats = self.log.stats(self.ready_threshold)
        except ChatLogError as e:
            self.say(f"error: {e}")
            return
        self.say(stats.line(self.log.path))


def parse_setting(name: str, raw: str):
    """A typed value for GenerationConfig field `name` from what the user typed; ValueError says what is wrong."""
    if raw.lower() in ("none", "off") and (name in NULLABLE or name == "stop"):
        return () if name == "stop" else None
    if name in INT_FIELDS:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if name in FLOAT_FIELDS:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if raw.startswith("["):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"stop must be a JSON list of strings like [\"\\nQ:\", \"END\"], got {raw!r}") from None
        if not isinstance(value, list):
            raise ValueError(f"stop must be a JSON list of strings, got {raw!r}")
        return tuple(value)
    return (raw.replace("\\n", "\n").replace("\\t", "\t"),)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chatapp.cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", help="backend key of the config (default: [app] default_backend)")
    parser.add_argument("--config", help="app config TOML (default: $NANOGPT_CHAT_CONFIG or configs/app.toml)")
    parser.add_argument("--history", help="chat log to append to (default: [app] history)")
    parser.add_argument("--checkpoint", help="native checkpoint directory (or `latest`) for a native backend")
    parser.add_argument("--weights", choices=("auto", "int8", "bf16", "fp32"),
                        help="a native backend's weight format (default: the config's; auto = int8 on CPU)")
    parser.add_argument("--system", help="system prompt (default: [app] system_prompt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = AppSettings.load(args.config)
        config = settings.config
        key = args.backend or settings.default_backend
        options = {"checkpoint": args.checkpoint} if args.checkpoint else {}
        if args.weights:
            options["weights"] = args.weights
        backend = create_backend(key, config, **options)
        cfg = settings.generation(key)
        log = ChatLog(args.history or settings.history)
        log.check_writable()
    except (BackendError, ValueError, ChatLogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    system_prompt = args.system if args.system is not None else settings.system_prompt
    console = ConsoleChat(config, key, backend, log, cfg, system_prompt or None,
                          ready_threshold=settings.ready_for_finetune)
    console.say(f"Chatting with {key}; replies are logged to {log.path}. Type /help for commands, /quit to leave.")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            console.say()
            break
        if not console.handle(line):
            break
    console.backend.release()
    stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
