"""The loaded models, shared by every browser session and API call of one app.

    slots = ModelSlots(config)                 # config: backends.registry.load_config()
    slots.choose(session_id, "native")        # a session picks a backend: it loads in a background thread
    slots.status("native")                     # SlotStatus(state="loading" | "ready" | "failed" | "idle", ...)
    with slots.use("native") as backend:       # waits for the load; the model stays loaded while in use
        ...
    slots.reload("native")                     # a native backend serves its newest checkpoint, no restart
    slots.serve("native", "models/native/x")   # ... or a given one ("latest" again: the newest)

There is one slot per configured backend key and at most one loaded model per slot, whatever the number of
sessions. A model nobody has chosen and nobody is using is released when a session switches away from it,
so switching backends frees the previous model's memory; one that no session has chosen (loaded by API
calls only, or preloaded for a page nobody opened) is released after `[app] release_unused_after_s` idle
seconds (default 600; 0 keeps it). Backends are thread-safe (the ChatBackend
contract), so concurrent sessions stream from the same loaded model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from backends import AppSettings, BackendError, ChatBackend, create_backend, list_backends

log = logging.getLogger(__name__)

IDLE, LOADING, READY, FAILED = "idle", "loading", "ready", "failed"


@dataclass(frozen=True)
class SlotStatus:
    key: str
    label: str
    state: str  # idle | loading | ready | failed
    message: str  # one sentence for the UI


class _Slot:
    def __init__(self, key: str, label: str, kind: str):
        self.key, self.label, self.kind = key, label, kind
        self.backend: ChatBackend | None = None
        self.state = IDLE
        self.error = ""
        self.in_use = 0
        self.note = ""  # why the last reload did not take effect
        self.release_when_idle = False  # switched away from while loading or while a reply streamed
        self.checkpoint: str | None = None  # a native slot's checkpoint chosen in the app (None: the config's)
        self.loaded = threading.Event()  # set whenever the slot is not loading
        self.loaded.set()
        self.last_used = 0.0  # time.monotonic() when it was last loaded or a reply ended
        self.idle_timer: threading.Timer | None = None
        self.phase = ""  # what the load is doing now, for the status line
        self.load_started = 0.0  # time.monotonic() when the current load began
        self.last_load_s: float | None = None  # how long the last successful load took


class ModelSlots:
    def __init__(self, config: dict, factory: Callable[..., ChatBackend] = create_backend):
        self._config = config
        self.factory = factory
        self._lock = threading.Lock()
        self._slots = {b["key"]: _Slot(b["key"], b.get("label") or b["key"], b.get("kind", ""))
                       for b in list_backends(config)}
        self._chosen: dict[str, str] = {}  # session id -> backend key
        self.release_unused_after_s = AppSettings(config).release_unused_after_s

    # --- what is configured ------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._slots)

    def kind(self, key: str) -> str:
        return self._slot(key).kind

    def label(self, key: str) -> str:
        return self._slot(key).label

    def _slot(self, key: str) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            choices = ", ".join(self._slots) or "none configured"
            raise BackendError(f"Unknown backend {key!r}: choose one of {choices}.")
        return slot

    # --- state -------------------------------------------------------------------------------------------
    def status(self, key: str) -> SlotStatus:
        slot = self._slot(key)
        with self._lock:
            state, error, backend, note = slot.state, slot.error, slot.backend, slot.note
        if state == LOADING:
            elapsed = time.monotonic() - slot.load_started
            took = f"; it took {slot.last_load_s:.0f} s last time" if slot.last_load_s else ""
            message = (f"Loading {slot.label}: {slot.phase or 'starting'}… {elapsed:.0f} s{took}. You can keep "
                       "typing; the reply starts once it is ready.")
        elif state == READY:
            model = getattr(backend, "model_name", "") or slot.label
            message = f"Ready: {slot.label} ({model}). {note}".strip()
        elif state == FAILED:
            message = error
        else:
            message = f"{slot.label} loads on first use."
        return SlotStatus(key, slot.label, state, message)

    def wait(self, key: str, timeout: float | None = None) -> bool:
        """True once `key` is not loading (ready, failed or idle); False if `timeout` passed first."""
        return self._slot(key).loaded.wait(timeout)

    # --- loading and releasing ---------------------------------------------------------------------------
    def load_in_background(self, key: str) -> None:
        """Start loading `key` unless it is loaded or loading already (a failed load is retried)."""
        slot = self._slot(key)
        with self._lock:
            if slot.state in (LOADING, READY):
                return
            slot.state, slot.error = LOADING, ""
            slot.load_started, slot.phase = time.monotonic(), ""
            slot.loaded.clear()
        threading.Thread(target=self._load, args=(slot,), name=f"load-{key}", daemon=True).start()

    def _load(self, slot: _Slot) -> None:
        slot.phase = "checking the model files"
        try:
            options = {"checkpoint": slot.checkpoint} if slot.checkpoint else {}
            backend = self.factory(slot.key, self._config, **options)
            slot.phase = "reading the weights into memory"
            backend.load()  # off the request path: a lazy backend loads its weights now
        except (BackendError, ValueError, OSError) as exc:
            self._finish(slot, None, f"{slot.label} could not be loaded: {exc}")
        except Exception as exc:  # a bug, not a user error: keep the traceback in the server log
            log.exception("loading backend %s failed", slot.key)
            self._finish(slot, None, f"{slot.label} could not be loaded ({type(exc).__name__}: {exc}); "
                                     "see the server log.")
        else:
            self._finish(slot, backend, "")

    def _finish(self, slot: _Slot, backend: ChatBackend | None, error: str) -> None:
        with self._lock:
            slot.backend, slot.error, slot.note = backend, error, ""
            slot.state = READY if backend is not None else FAILED
            slot.last_used = time.monotonic()
            self._watch_idle(slot)
            if backend is not None:
                slot.last_load_s = time.monotonic() - slot.load_started
        if slot.release_when_idle:  # every session switched away while it loaded
            self._release_unused(only=slot)
        slot.loaded.set()  # after any release, so a waiter never sees a model that is going away

    def choose(self, session: str, key: str) -> SlotStatus:
        """Session `session` now chats with `key`: load it, and release models that nobody uses any more."""
        self._slot(key)
        with self._lock:
            self._chosen[session] = key
        self.load_in_background(key)
        self._release_unused()
        return self.status(key)

    def forget(self, session: str) -> None:
        """A browser session ended; its choice no longer keeps a model loaded."""
        with self._lock:
            self._chosen.pop(session, None)

    def _release_unused(self, only: _Slot | None = None) -> None:
        freed = []
        with self._lock:
            keep = set(self._chosen.values())
            for slot in [only] if only else self._slots.values():
                if slot.key in keep or slot.state in (IDLE, FAILED):
                    slot.release_when_idle = False
                elif slot.state == LOADING or slot.in_use:
                    slot.release_when_idle = True  # released once loaded, or when its last reply ends
                else:
                    freed.append(slot.backend)
                    slot.backend, slot.state, slot.release_when_idle = None, IDLE, False
        for backend in freed:  # outside the lock: a new load of the same key builds a fresh backend object
            backend.release()

    def chosen(self, session: str) -> str | None:
        """The key session `session` chose last (None before it chose one)."""
        with self._lock:
            return self._chosen.get(session)

    def sessions_using(self, key: str) -> int:
        """How many browser sessions have `key` chosen right now."""
        with self._lock:
            return sum(1 for chosen in self._chosen.values() if chosen == key)

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return [k for k, s in self._slots.items() if s.state == READY]

    @contextmanager
    def use(self, key: str) -> Iterator[ChatBackend]:
        """The loaded backend for `key`, kept loaded until the block ends; raises BackendError if it fails."""
        slot = self._slot(key)
        while True:
            self.load_in_background(key)
            slot.loaded.wait()
            with self._lock:
                if slot.state == FAILED:
                    raise BackendError(slot.error)
                if slot.state == READY:  # else it was released between the wait and now: load again
                    slot.in_use += 1
                    backend = slot.backend
                    break
        try:
            yield backend
        finally:
            with self._lock:
                slot.in_use -= 1
                slot.last_used = time.monotonic()
                release = slot.release_when_idle and slot.in_use == 0
                self._watch_idle(slot)
            if release:
                self._release_unused(only=slot)

    def _watch_idle(self, slot: _Slot, delay: float | None = None) -> None:
        """Under self._lock: make sure one timer will release `slot` once it has sat unchosen and idle."""
        if self.release_unused_after_s <= 0 or (slot.idle_timer is not None and slot.idle_timer.is_alive()):
            return
        slot.idle_timer = threading.Timer(self.release_unused_after_s if delay is None else delay,
                                          self._release_if_idle, (slot,))
        slot.idle_timer.daemon = True
        slot.idle_timer.start()

    def _release_if_idle(self, slot: _Slot) -> None:
        with self._lock:
            slot.idle_timer = None
            if slot.state != READY or slot.in_use or slot.key in self._chosen.values():
                return  # a session keeps it, or the end of the reply under way looks again
            remaining = slot.last_used + self.release_unused_after_s - time.monotonic()
            if remaining > 0:
                self._watch_idle(slot, remaining)
                return
            backend, slot.backend, slot.state = slot.backend, None, IDLE
        log.info("released %s: no session chose it and it was idle for %.0f s", slot.key,
                 self.release_unused_after_s)
        backend.release()

    # --- fine-tuned checkpoints ------------------------------------------------------------------------
    def reload(self, key: str) -> SlotStatus:
        """Serve the newest checkpoint of native backend `key` (in the background); others are refused."""
        slot = self._slot(key)
        if slot.kind != "native":
            raise BackendError(f"{slot.label} is not a native checkpoint: choose a native backend in the "
                               "dropdown to reload its newest checkpoint.")
        with self._lock:
            already_loading = slot.state == LOADING
            if not already_loading:
                backend = slot.backend if slot.state == READY else None
                slot.state, slot.error = LOADING, ""
                slot.load_started, slot.phase = time.monotonic(), "reading the newest checkpoint"
                slot.loaded.clear()
        if already_loading:
            return self.status(key)
        if backend is None:  # not loaded yet: a fresh load resolves the newest checkpoint anyway
            threading.Thread(target=self._load, args=(slot,), name=f"load-{key}", daemon=True).start()
        else:
            threading.Thread(target=self._reload, args=(slot, backend), name=f"reload-{key}",
                             daemon=True).start()
        return self.status(key)

    def serve(self, key: str, checkpoint: str) -> SlotStatus:
        """Make native backend `key` serve `checkpoint` (a directory, or "latest") from now on, reloading it
        in the background if it is loaded; requests already streaming finish on the previous model."""
        slot = self._slot(key)
        if slot.kind != "native":
            raise BackendError(f"{slot.label} is not a native backend; only native backends serve checkpoints.")
        with self._lock:
            slot.checkpoint = str(checkpoint)
            if slot.backend is not None:
                slot.backend.checkpoint = str(checkpoint)  # NativeBackend.reload resolves this spec again
        return self.reload(key)

    def _reload(self, slot: _Slot, backend: ChatBackend) -> None:
        note = ""
        try:
            backend.reload()
        except (BackendError, ValueError, OSError) as exc:
            note = f"The reload failed, so the previous checkpoint is still served: {exc}"
        except Exception as exc:  # a bug: keep the traceback in the server log, keep serving the old model
            log.exception("reloading backend %s failed", slot.key)
            note = f"The reload failed ({type(exc).__name__}: {exc}); see the server log."
        with self._lock:
            slot.state, slot.note = READY, note
        if slot.release_when_idle:
            self._release_unused(only=slot)
        slot.loaded.set()
