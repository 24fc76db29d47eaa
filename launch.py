"""Start the nanogpt-chat web app.

    python launch.py                                   # http://127.0.0.1:7860, the config's default backend
    python launch.py --backend native --port 8000
    python launch.py --host 0.0.0.0 --auth-file ~/.nanogpt-chat-auth   # reachable from other machines,
                                                       # behind a login (the file holds USER:PASSWORD lines)
    NANOGPT_CHAT_API_KEYS=k1 python launch.py --host 0.0.0.0 --auth-file ~/.nanogpt-chat-auth  # and /v1 keys

The page is up in a few seconds: the default backend loads in a background thread and the UI shows its
status. Gradio's analytics are off. A bad flag prints one sentence and exits with status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

# Before anything imports gradio: no usage analytics leave this machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

EXIT_BAD_FLAGS = 2
AUTH_ENV = "NANOGPT_CHAT_AUTH"  # USER:PASSWORD, for those who start the app from a script or a service


class FlagError(Exception):
    """A flag the user gave cannot work; the message says what to do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage dump becomes one sentence
        raise FlagError(f"{message[0].upper()}{message[1:]}; see python launch.py --help.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="launch.py", description="Chat with small language models in your browser.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--backend", default=None,
                   help="backend key from the config to start with (default: [app].default_backend)")
    p.add_argument("--config", default=None,
                   help="app config TOML (default: $NANOGPT_CHAT_CONFIG, else configs/app.toml)")
    p.add_argument("--history", default=None,
                   help="chat log to append to (default: [app].history, else chat_history.jsonl)")
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="require a login: FILE holds USER:PASSWORD lines (or set $NANOGPT_CHAT_AUTH to one "
                        "USER:PASSWORD); required when --host is not a loopback address")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="like --auth-file, but the password is visible to every local user (ps): avoid")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host (or --share) without a login")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="keys for the OpenAI-compatible /v1 API, one a line (also: $NANOGPT_CHAT_API_KEYS, "
                        "comma-separated); with keys, /v1 needs 'Authorization: Bearer KEY'. Loopback apps "
                        "without keys leave /v1 open; reachable ones refuse it until keys are set")
    args = p.parse_args(argv)
    check_flags(args)
    return args


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_flags(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise FlagError(f"--port must be between 1 and 65535, got {args.port}.")
    args.auth = read_logins(args)
    exposed = not is_loopback(args.host) or args.share
    if exposed and args.auth is None and not args.insecure_no_auth:
        where = "--share" if args.share else f"--host {args.host}"
        raise FlagError(f"{where} makes the chat reachable from other machines: add --auth-file FILE with a "
                        f"USER:PASSWORD line (or set {AUTH_ENV}; --insecure-no-auth if you really want it open).")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host.strip("[]"), args.port))
        except OSError as exc:
            raise FlagError(f"Cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): pass --port "
                            "with a free port or --host with an address of this machine.") from None


def _login(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.rstrip("\r\n").partition(":")
    if not (sep and user and password):
        raise FlagError(f"{where} must be USER:PASSWORD with both parts non-empty, e.g. alice:s3cret.")
    return user, password


def read_logins(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """The logins to require: from --auth-file, else --auth (with a warning), else $NANOGPT_CHAT_AUTH."""
    if args.auth_file and args.auth:
        raise FlagError("Give --auth-file or --auth, not both.")
    if args.auth_file:
        try:
            with open(os.path.expanduser(args.auth_file), encoding="utf-8") as f:
                lines = [(n, line) for n, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]
        except (OSError, UnicodeDecodeError) as exc:
            raise FlagError(f"Cannot read --auth-file {args.auth_file} ({getattr(exc, 'strerror', None) or exc}): "
                            "pass a readable file with USER:PASSWORD lines.") from None
        if not lines:
            raise FlagError(f"--auth-file {args.auth_file} has no USER:PASSWORD line: add one.")
        return [_login(line, f"Line {n} of --auth-file {args.auth_file}") for n, line in lines]
    if args.auth:
        login = _login(args.auth, "--auth")
        print("launch.py: warning: --auth puts the password on the command line, where every local user can "
              f"read it (ps); use --auth-file FILE or {AUTH_ENV} instead.", file=sys.stderr)
        return [login]
    if os.environ.get(AUTH_ENV):
        return [_login(os.environ[AUTH_ENV], AUTH_ENV)]
    return None


def build(args: argparse.Namespace):
    """The app for these flags; FlagError if the config, backend or chat log cannot work."""
    from backends import BackendError
    from backends.registry import AppSettings
    from chatapp.openai_api import ApiAccess
    from chatapp.ui import build_app
    from gpt.chatlog import ChatLog, ChatLogError

    try:
        settings = AppSettings.load(args.config)
    except (BackendError, ValueError, OSError) as exc:
        raise FlagError(f"Cannot read the config: {exc}") from None
    history = args.history or settings.history
    try:
        # Reachable from other machines behind a login: the API needs keys too (--insecure-no-auth opts out).
        access = ApiAccess.load(args.api_key_file, required=(not is_loopback(args.host) or args.share)
                                and not args.insecure_no_auth)
        ChatLog(history).check_writable()
        return build_app(settings.config, history, args.backend, api_access=access)
    except (BackendError, ValueError, ChatLogError) as exc:
        raise FlagError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        demo = build(args)
    except FlagError as exc:
        print(f"launch.py: {exc}", file=sys.stderr)
        return EXIT_BAD_FLAGS
    service = demo.chat_service
    if service.log.readable_by_others():
        print(f"launch.py: warning: the chat log {service.log_path} can be read by other accounts on this "
              f"machine: run `chmod 600 {service.log_path}` (new logs are created that way).", file=sys.stderr)
    demo.launch(server_name=args.host, server_port=args.port, auth=args.auth, share=args.share,
                show_error=False, quiet=True, footer_links=["api", "settings"], prevent_thread_lock=True)
    service.slots.load_in_background(service.default_backend)  # after the server is up: the page never waits
    print(f"nanogpt-chat is running at {demo.local_url} (backend {service.default_backend} is loading in the "
          f"background; chat log {service.log_path}); OpenAI-compatible API at {demo.local_url}v1. Press Ctrl-C "
          "to stop it.", flush=True)
    if demo.api_access.required and not demo.api_access.keys:
        print("The /v1 API refuses every request until it has keys: restart with NANOGPT_CHAT_API_KEYS=KEY or "
              "--api-key-file FILE.", flush=True)
    if demo.share_url:
        print(f"Public link: {demo.share_url}", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
