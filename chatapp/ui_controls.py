"""The generation settings panel of the web UI, and the short texts the UI shows (context meter, log stats).

`build_generation_controls(defaults)` lays out one control per GenerationConfig field, starting at the
default backend's defaults; `follow_backend_defaults(...)` makes them show the chosen backend's defaults
until the user changes one (a line under them says which apply); `generation_config(...)` turns the values
they send (or the /chat API's arguments) back into a validated GenerationConfig. Used by chatapp/ui.py;
nothing here touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from backends import GenerationConfig
from backends.base import shown
from chatapp.budget import Prompt

_ESCAPES = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


def stop_text(stop: tuple[str, ...]) -> str:
    """Stop strings as the textbox shows them: one per line; backslash, newline, tab, CR written as escapes."""
    return "\n".join(s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
                     for s in stop)


def parse_stop_text(text: str) -> tuple[str, ...]:
    """The inverse of `stop_text`; blank lines are ignored, an unknown escape is kept as typed."""
    out = []
    for line in (text or "").replace("\r\n", "\n").split("\n"):
        value, i = [], 0
        while i < len(line):
            if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in _ESCAPES:
                value.append(_ESCAPES[line[i + 1]])
                i += 2
            else:
                value.append(line[i])
                i += 1
        if value:
            out.append("".join(value))
    return tuple(out)


def _whole(name: str, value) -> int | None:
    """Sliders send floats (5.0) and the seed box text; the config wants integers."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {shown(value)}") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or float(value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {shown(value)}")
    return int(value)


def generation_config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
                      defaults: GenerationConfig | None = None) -> GenerationConfig:
    """A GenerationConfig from UI or API values; raises ValueError with a sentence naming the field.

    None for a setting means "the default": the field of `defaults` (the config file's [generation], or a
    backend's own defaults), else GenerationConfig's; a seed of None is a fresh random sample unless the
    defaults fix one.
    """
    if isinstance(stop, str):
        stop = parse_stop_text(stop)
    elif stop is not None and not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a list of strings, got {shown(stop)}")
    values = {"max_new_tokens": _whole("max_new_tokens", max_new_tokens), "temperature": temperature,
              "top_k": _whole("top_k", top_k), "top_p": top_p, "repetition_penalty": repetition_penalty,
              "stop": None if stop is None else tuple(stop), "seed": _whole("seed", seed)}
    return GenerationConfig.parse({k: v for k, v in values.items() if v is not None}, defaults=defaults)


@dataclass
class GenerationControls:
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_k: gr.Slider
    top_p: gr.Slider
    repetition_penalty: gr.Slider
    stop: gr.Textbox
    seed: gr.Textbox

    @property
    def inputs(self) -> list:
        """In generation_config's argument order."""
        return [self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                self.stop, self.seed]


def build_generation_controls(defaults: GenerationConfig, max_tokens: int = 2048) -> GenerationControls:
    """The controls, stacked in the current Blocks context (call inside an Accordion)."""
    max_new_tokens = gr.Slider(1, max(max_tokens, defaults.max_new_tokens), value=defaults.max_new_tokens,
                               step=1, label="Max new tokens", info="the longest reply, in tokens")
    temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                            info="0 = greedy: always the likeliest token", elem_id="temperature")
    top_k = gr.Slider(0, 200, value=defaults.top_k or 0, step=1, label="Top-k", info="0 = off")
    top_p = gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label="Top-p",
                      info="keep the likeliest tokens up to this total probability")
    repetition_penalty = gr.Slider(0.5, 2.0, value=defaults.repetition_penalty, step=0.05,
                                   label="Repetition penalty", info="1 = off; above 1 repeats less")
    stop = gr.Textbox(value=stop_text(defaults.stop), lines=2, label="Stop strings",
                      info="one per line; the reply ends before the first one (write \\n for a newline)")
    # A textbox, not gr.Number: an empty Number shows "0" although it sends null (random).
    seed = gr.Textbox(value="" if defaults.seed is None else str(defaults.seed), label="Seed",
                      placeholder="random", info="empty = random; the same seed gives the same reply")
    return GenerationControls(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)


def control_values(cfg: GenerationConfig) -> tuple:
    """What the controls show for `cfg`, in GenerationControls.inputs order."""
    return (cfg.max_new_tokens, cfg.temperature, cfg.top_k or 0, cfg.top_p, cfg.repetition_penalty,
            stop_text(cfg.stop), "" if cfg.seed is None else str(cfg.seed))


def follow_backend_defaults(controls: GenerationControls, backend: gr.Dropdown, service) -> Callable:
    """A line under the controls and the events that keep them at the chosen backend's defaults.

    Call inside the settings Accordion, after the controls. Until the user changes a control in this
    session, choosing a backend shows its defaults (service.generation_defaults); after that the user's
    values are kept and the line says so, with a button back to the backend's defaults. Returns a function
    that chains the same update after another event that changes the backend (reopening a conversation).
    """
    customised = gr.State(False)  # per browser session
    line = gr.Markdown(f"Using the defaults of {service.slots.label(service.default_backend)}.",
                       elem_id="defaults-note")
    reset = gr.Button("Use this backend's defaults", size="sm", elem_id="reset-defaults")
    outputs = [*controls.inputs, customised, line]

    def follow(key, changed):
        label = service.slots.label(key)
        if changed:
            return (*[gr.skip()] * len(controls.inputs), True,
                    f"Your settings apply (changed in this session); {label} has its own defaults.")
        return (*control_values(service.generation_defaults(key)), False, f"Using the defaults of {label}.")

    def mark(key):
        return True, (f"Your settings apply (changed in this session); {service.slots.label(key)} has its own "
                      "defaults.")

    for control in controls.inputs:
        control.input(mark, backend, [customised, line], api_visibility="private", show_progress="hidden")
    quiet = dict(api_visibility="private", show_progress="hidden")
    backend.input(follow, [backend, customised], outputs, **quiet)
    reset.click(lambda key: follow(key, False), backend, outputs, **quiet)
    return lambda event: event.then(follow, [backend, customised], outputs, **quiet)


def speed_text(update) -> str:
    """After a reply: how many tokens, how fast, and how long the first one took (a chat.ChatUpdate)."""
    text = f"{_count(update.tokens, 'token')} in {update.seconds:.1f} s"
    if update.tokens_per_s is not None:
        text += f" · **{update.tokens_per_s:.1f} tokens/s**"
    if update.first_token_s is not None:
        text += f" · first token after {update.first_token_s:.2f} s"
    return text


def context_meter(prompt: Prompt, context_length: int, max_new_tokens: int, update=None) -> str:
    """One line: how much of the model's context this exchange used, and what was left out to fit; once the
    reply is done (`update.done`), its speed too."""
    text = (f"Context: **{prompt.n_tokens}** of {context_length} tokens used by the prompt, "
            f"up to {max_new_tokens} kept for the reply")
    if prompt.dropped:
        text += f" · {prompt.dropped} earlier message{'s' if prompt.dropped != 1 else ''} dropped to fit"
    if prompt.truncated:
        text += " · your message was too long: only its end was kept"
    if update is not None and update.done:
        text += ". Reply: " + speed_text(update)
    return text + "."


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
