"""ModelSlots: one loaded model per backend key shared by all sessions, background loads, release on switch."""

from __future__ import annotations

import re
import threading
import time

import pytest

from backends import BackendError
from chatapp.model_slot import ModelSlots

CONFIG = {"backends": {"a": {"kind": "native", "label": "Model A"}, "b": {"kind": "hf", "label": "Model B"}}}


class FakeBackend:
    """Records loads and releases; loading blocks until the test lets it go."""

    def __init__(self, key: str, gate: threading.Event):
        self.key, self.gate = key, gate
        self.loaded = self.released = False
        self.model_name = f"{key}-v1"

    def load(self):
        assert self.gate.wait(10)
        self.loaded = True

    def reload(self):
        self.model_name = f"{self.key}-v2"

    def release(self):
        self.released = True


class Factory:
    def __init__(self):
        self.built: list[FakeBackend] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[str] = set()

    def __call__(self, key, config):
        if key in self.fail:
            raise BackendError(f"checkpoint for {key} is missing: run make setup.")
        backend = FakeBackend(key, self.gate)
        self.built.append(backend)
        return backend


@pytest.fixture
def factory():
    return Factory()


@pytest.fixture
def slots(factory):
    return ModelSlots(CONFIG, factory=factory)


def test_choosing_loads_in_the_background_with_a_visible_status(slots, factory):
    factory.gate.clear()
    status = slots.choose("s1", "a")  # returns at once although the load is blocked
    assert status.state == "loading" and "Loading Model A" in status.message
    assert not slots.wait("a", timeout=0.05)
    factory.gate.set()
    assert slots.wait("a", timeout=5)
    assert slots.status("a").state == "ready" and "a-v1" in slots.status("a").message


def test_a_loading_status_shows_its_phase_the_seconds_so_far_and_the_last_load_time(slots, factory):
    factory.gate.clear()
    slots.choose("s1", "a")
    time.sleep(1.1)
    message = slots.status("a").message
    assert re.search(r"Loading Model A: reading the weights into memory… [1-9]\d* s\.", message), message
    factory.gate.set()
    assert slots.wait("a", timeout=5)
    slots.choose("s1", "b")  # a is released; loading it again says how long it took before
    slots.wait("b", timeout=5)
    factory.gate.clear()
    slots.choose("s1", "a")
    assert re.search(r"it took [1-9]\d* s last time", slots.status("a").message), slots.status("a").message
    factory.gate.set()
    assert slots.wait("a", timeout=5)


def test_sessions_share_one_loaded_model(slots, factory):
    slots.choose("s1", "a")
    slots.choose("s2", "a")
    with slots.use("a") as one, slots.use("a") as two:
        assert one is two
    assert len(factory.built) == 1


def test_switching_releases_the_previous_model_unless_another_session_uses_it(slots, factory):
    slots.choose("s1", "a")
    slots.choose("s2", "a")
    slots.wait("a", 5)
    slots.choose("s1", "b")
    assert not factory.built[0].released  # s2 still chats with a
    slots.choose("s2", "b")
    slots.wait("b", 5)
    assert factory.built[0].released and slots.status("a").state == "idle"
    assert slots.loaded_keys() == ["b"]


def test_a_model_in_use_is_released_only_when_its_reply_ends(slots, factory):
    slots.choose("s1", "a")
    with slots.use("a") as backend:
        slots.choose("s1", "b")
        assert not backend.released  # a reply is still streaming from it
    assert backend.released


def test_a_model_switched_away_from_while_loading_is_released_once_loaded(slots, factory):
    factory.gate.clear()
    slots.load_in_background("a")  # launch.py preloads the default backend
    slots.choose("s1", "b")  # the first visitor picks another before it finished loading
    factory.gate.set()
    assert slots.wait("a", 5) and slots.wait("b", 5)
    assert factory.built[0].key == "a" and factory.built[0].released
    assert slots.loaded_keys() == ["b"]


def test_use_after_release_loads_a_fresh_model(slots, factory):
    slots.choose("s1", "a")
    slots.wait("a", 5)
    slots.choose("s1", "b")
    with slots.use("a") as backend:  # an API call may still ask for a
        assert backend is not factory.built[0] and backend.loaded


def test_a_failed_load_reports_the_sentence_and_is_retried(slots, factory):
    factory.fail.add("a")
    slots.choose("s1", "a")
    slots.wait("a", 5)
    assert slots.status("a").state == "failed"
    assert slots.status("a").message == "Model A could not be loaded: checkpoint for a is missing: run make setup."
    with pytest.raises(BackendError, match="run make setup"):
        with slots.use("a"):
            pass
    factory.fail.clear()  # the user fixed it: the next use loads
    with slots.use("a") as backend:
        assert backend.loaded


def test_unknown_key_is_a_sentence_listing_the_choices(slots):
    with pytest.raises(BackendError, match="Unknown backend 'zzz': choose one of a, b."):
        slots.choose("s1", "zzz")


def test_reload_serves_the_newest_checkpoint_of_a_native_backend(slots, factory):
    with slots.use("a") as backend:
        assert backend.model_name == "a-v1"
    slots.reload("a")
    assert slots.wait("a", 5)
    assert "a-v2" in slots.status("a").message and len(factory.built) == 1
    with pytest.raises(BackendError, match="not a native checkpoint"):
        slots.reload("b")


def test_each_session_remembers_its_own_choice(slots):
    assert slots.chosen("s1") is None
    slots.choose("s1", "a")
    slots.choose("s2", "b")
    slots.choose("s1", "b")
    assert (slots.chosen("s1"), slots.chosen("s2")) == ("b", "b") and slots.sessions_using("b") == 2
    slots.forget("s1")
    assert slots.chosen("s1") is None and slots.sessions_using("b") == 1


def _until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_a_model_loaded_only_by_api_calls_is_released_once_idle(factory):
    slots = ModelSlots({**CONFIG, "app": {"release_unused_after_s": 0.3}}, factory=factory)
    slots.choose("s1", "a")  # a browser tab chats with a; an API caller uses b
    for _ in range(3):
        with slots.use("b"):
            time.sleep(0.15)  # busy and then idle again, each time less than the limit
    api_model = factory.built[-1]
    assert api_model.key == "b" and not api_model.released
    assert _until(lambda: slots.status("b").state == "idle") and api_model.released
    assert slots.status("a").state == "ready" and not factory.built[0].released  # a tab chose a
    with slots.use("b") as again:  # the next call loads it again
        assert again.loaded and again is not api_model


def test_a_model_in_use_or_chosen_is_not_released_by_the_idle_timer(factory):
    slots = ModelSlots({**CONFIG, "app": {"release_unused_after_s": 0.1}}, factory=factory)
    with slots.use("b") as backend:
        time.sleep(0.4)
        assert not backend.released  # a reply longer than the limit keeps it
    assert _until(lambda: backend.released)


@pytest.mark.parametrize("value", ["600", -1, True])
def test_a_bad_release_setting_is_one_sentence(factory, value):
    with pytest.raises(ValueError, match=r"\[app\] release_unused_after_s in the config must be a number of "):
        ModelSlots({**CONFIG, "app": {"release_unused_after_s": value}}, factory=factory)
