"""Fine-tuning from the app: one run at a time, in a child process, watched through its status file.

    job = FinetuneJob(log_path, slots, native_key="native")
    job.describe(exclude_disliked=True)      # what the log holds and what a run would learn (one paragraph)
    job.start(exclude_disliked=True)         # FinetuneRefused(sentence) for bad input; else the status dict
    job.status()                             # {"state": idle|running|done|failed|cancelled, "step", "total", ...}
    job.cancel()                             # stops after the current step; the model in use does not change
    job.use_base() / job.use_finetuned()     # which checkpoint the native backend serves

The child is `python -m training.finetune --history LOG --status FILE` (the CLI's own code path, default
settings), so a crash or an out-of-memory kill ends only the child: the app reports it and keeps serving.
When the run ends well, the native backend serves the new checkpoint (it is the newest, and the slot
reloads it); the base stays one call away.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpt.assets import REPO_ROOT
from gpt.chatlog import conversations
from gpt.checkpoint import CheckpointError, resolve_checkpoint
from training.data import DataError, read_history, select_exchanges
from training.status import RunStatus

MIN_EXCHANGES = 10  # as training.finetune's --min-exchanges default
CANCEL_GRACE_S = 60  # a step and a save finish after the interrupt; then the child is killed
STATUS_KEYS = ("state", "phase", "step", "total", "train_loss", "val_loss", "checkpoint", "message", "losses",
               "evals", "report", "base")


class FinetuneRefused(ValueError):
    """A run cannot start (bad log, no base, one already running); the message says what to do."""


class FinetuneJob:
    def __init__(self, log_path, slots, native_key: str | None, config: str | None = None,
                 python: str = sys.executable):
        self.log_path = Path(log_path)
        self.config = config  # a training config file instead of configs/finetune.toml (app.toml: finetune_config)
        self.slots, self.native_key, self.python = slots, native_key, python
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._status_path: Path | None = None
        self._final: dict | None = None  # the last run's status once it ended
        self._base: str | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="nanogpt-finetune-"))

    # --- what would be learned ----------------------------------------------------------------------------
    def _selection(self, only_liked: bool, exclude_disliked: bool) -> tuple[int, dict, int, int]:
        try:
            contents = read_history(self.log_path)
        except DataError:
            return 0, {}, 0, 0
        convs = conversations(contents)
        selections, counts = select_exchanges(convs, only_liked, exclude_disliked)
        return sum(len(s.turns) for s in selections), counts, sum(len(c.exchanges) for c in convs), len(convs)

    def describe(self, only_liked: bool = False, exclude_disliked: bool = True) -> str:
        usable, counts, exchanges, convs = self._selection(only_liked, exclude_disliked)
        if not exchanges:
            return "The chat log is empty: chat first, then like or edit replies to teach the model."
        filters = [name for name, on in (("only liked or edited", only_liked),
                                         ("disliked left out", exclude_disliked)) if on]
        return (f"The log holds {exchanges} exchanges in {convs} conversations: {counts['edited']} edited, "
                f"{counts['liked']} liked, {counts['disliked']} disliked. A run would learn {usable} replies"
                f"{' (' + ', '.join(filters) + ')' if filters else ''}; edited replies count as liked, and "
                f"conversations with an edit are always trained on.")

    def _check(self, only_liked: bool, exclude_disliked: bool) -> str:
        """The base checkpoint to start from, or FinetuneRefused with one sentence."""
        usable, counts, exchanges, _ = self._selection(only_liked, exclude_disliked)
        if not exchanges:
            raise FinetuneRefused("The chat log is empty: chat with the model first, then like or edit the "
                                  "replies you want it to learn.")
        if exchanges and counts.get("disliked") == exchanges - counts.get("empty", 0) and not counts.get("edited"):
            raise FinetuneRefused("Every reply in the chat log is disliked, so there is nothing good to learn: "
                                  "like or edit some replies first.")
        if usable < MIN_EXCHANGES:
            raise FinetuneRefused(f"The chat log has {usable} replies to learn from with these filters; "
                                  f"fine-tuning needs at least {MIN_EXCHANGES}: chat more, or relax the filters.")
        try:
            return str(resolve_checkpoint("latest"))
        except CheckpointError:
            raise FinetuneRefused("There is no native checkpoint to start from: run `make setup` (it converts "
                                  "the bundled SmolLM2) or convert a model with `python -m gpt.convert`.") from None

    # --- running -------------------------------------------------------------------------------------------
    def start(self, only_liked: bool = False, exclude_disliked: bool = True) -> dict:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                s = self._read()
                raise FinetuneRefused(f"A fine-tune is already running (step {s.get('step', 0)} of "
                                      f"{s.get('total') or '?'}): wait for it to finish or cancel it.")
            base = self._check(only_liked, exclude_disliked)
            self._status_path = self._workdir / f"run-{time.strftime('%Y%m%d-%H%M%S')}.status.json"
            command = [self.python, "-m", "training.finetune", "--history", str(self.log_path), "--base", base,
                       "--status", str(self._status_path), "--no-progress"]
            command += ["--config", str(self.config)] if self.config else []
            command += ["--only-liked"] if only_liked else []
            command += ["--exclude-disliked"] if exclude_disliked else []
            output = open(self._status_path.with_suffix(".log"), "w")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                              os.environ.get("PYTHONPATH")]))}
            self._proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)  # a Ctrl-C of the app is not its
            output.close()
            self._final, self._base = None, base
            threading.Thread(target=self._watch, args=(self._proc,), name="finetune-watch", daemon=True).start()
        return self.status()

    def _read(self) -> dict:
        return (RunStatus.read(self._status_path) if self._status_path else None) or {}

    def _watch(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        record = self._read()
        if record.get("state") in (None, "running"):  # killed before it could say so (e.g. out of memory)
            why = "it was killed, perhaps for lack of memory" if code < 0 else f"exit status {code}"
            record.update(state="failed", message=f"The training process ended unexpectedly ({why}); the model "
                                                  f"in use did not change. Its output is in "
                                                  f"{self._status_path.with_suffix('.log')}.")
        if record.get("state") == "done" and record.get("checkpoint") and self.native_key:
            try:
                self.slots.serve(self.native_key, "latest")  # the new checkpoint is the newest
                record["message"] = (f"Finished: the native backend now serves {record['checkpoint']}.")
            except Exception as exc:  # the run succeeded; only the hand-off failed
                record["message"] = f"Finished, but the native backend could not switch to it: {exc}"
        with self._lock:
            self._final = {**record, "base": self._base}

    def status(self) -> dict:
        idle = {"state": "idle", "phase": "", "step": 0, "total": 0, "train_loss": None, "val_loss": None,
                "checkpoint": None, "message": "No fine-tune has run in this app yet.", "losses": [], "evals": [],
                "report": None, "base": None}
        with self._lock:
            if self._proc is None:
                return idle
            # Until the child writes its first record, it is starting: the idle fields, state running.
            record = {**idle, "state": "running", "message": "", **(
                self._final if self._final is not None else {**self._read(), "base": self._base})}
            if self._final is None and record.get("state") != "running":
                # The child has said how it ended; it counts once the app has acted on it (the swap).
                record.update(state="running", phase="handing the new checkpoint to the native backend",
                              message="")
        record.setdefault("state", "running")
        record.setdefault("message", "")
        if record["state"] == "running" and not record["message"]:
            record["message"] = f"Running: {record.get('phase') or 'starting'}."
        return {k: record.get(k) for k in STATUS_KEYS}

    def cancel(self) -> dict:
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return {**self.status(), "message": "No fine-tune is running."}
        proc.send_signal(signal.SIGINT)  # the trainer stops after the current step

        def kill_if_stuck():
            try:
                proc.wait(CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()

        threading.Thread(target=kill_if_stuck, daemon=True).start()
        return {**self.status(), "message": "Cancelling after the current step…"}

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the running job (if any) has ended and been handled (tests, shutdown)."""
        deadline = None if timeout is None else time.time() + timeout
        while self.status()["state"] == "running":
            if deadline is not None and time.time() > deadline:
                break
            time.sleep(0.1)
        return self.status()

    # --- which checkpoint the native backend serves ---------------------------------------------------------
    def use_base(self) -> str:
        base = self._base
        if not base or not self.native_key:
            raise FinetuneRefused("No fine-tune has run in this app yet, so the native backend already serves "
                                  "its base.")
        self.slots.serve(self.native_key, base)
        return f"The native backend now serves the base {base}."

    def use_finetuned(self) -> str:
        if not self.native_key:
            raise FinetuneRefused("No native backend is configured.")
        self.slots.serve(self.native_key, "latest")
        return "The native backend now serves the newest checkpoint."

    def shutdown(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
