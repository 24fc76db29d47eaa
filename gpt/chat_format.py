"""Chat rendering: the ONE place where chat turns become prompt ids and training examples.

    fmt = ChatFormat.for_tokenizer(tokenizer)         # bound to its tokenizer: it alone decides how to encode
    ids = fmt.prompt_ids([{"role": "user", "content": "Hi"}])       # what the engine is asked to continue
    examples = fmt.training_examples(messages)        # [(ids, loss mask)], one per assistant turn
    fmt.render(messages)                              # the same prompt as text (for people and tests)

Inference (`prompt_ids`) and fine-tuning (`training_examples`) both come through here, and the format carries
the encoder its prompts need (`encode_prompt`: special tokens parsed for a chat template, never for the plain
format), so the model is trained on exactly the ids it later sees and no caller picks an encoder.

Two formats:
- the model's own chat template (Jinja, as in tokenizer_config.json), for chat models such as SmolLM2;
- for models without one (GPT-2), a plain-text turn format:

      System: You are helpful.
      User: Hi there
      Assistant: Hello! How can I help?
      User: What is 2+2?
      Assistant:

  Each turn is one `Role: text` line group; the prompt ends with the assistant's cue `Assistant:`. A reply
  is the text after the cue (it starts with a space) and ends with end-of-text; the stop strings
  `\\nUser:`, `\\nAssistant:` and `\\nSystem:` (`stop_strings`, which the backends add to every reply's
  stops) catch a model that keeps going.

A user cannot inject a turn: in the plain format a line of a message that starts like a role marker gets a
leading space (so it no longer matches one), and its text is encoded without special tokens; with a template,
special-token strings inside a message are broken by a zero-width space before the rendering is encoded with
special tokens (whole, as transformers tokenizes `apply_chat_template`'s text, so the ids match it exactly).

Messages are plain `{"role", "content": str}` here: the edges (web UI, API, console) normalise them once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP_STRINGS = tuple(f"\n{name}:" for name in ("User", "Assistant", "System"))
# Only a marker after a newline can start a turn: a message's first line follows its own "Role: " already.
_ROLE_LINE = re.compile(r"(\n)((?:User|Assistant|System)\s*:)")
ZWSP = "\u200b"


@dataclass(frozen=True)
class ChatFormat:
    chat_template: str | None = None
    special_tokens: tuple[str, ...] = field(default_factory=tuple)
    bos_token: str | None = None
    eos_token: str | None = None
    # The tokenizer calls a format is bound to: `encode_text` reads special-token strings as text,
    # `encode_special` parses them (only a template's own markers reach it unescaped); `eot_id` ends a reply.
    encode_text: Callable[[str], list[int]] | None = field(default=None, compare=False, repr=False)
    encode_special: Callable[[str], list[int]] | None = field(default=None, compare=False, repr=False)
    eot_id: int | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ChatFormat:
        """The format a native tokenizer (gpt/tokenizer.py) implies, bound to it: its chat template if it has
        one, else the plain format."""
        bound = dict(encode_text=tokenizer.encode, encode_special=tokenizer.encode_markup,
                     eot_id=getattr(tokenizer, "eot_id", None))
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            return cls(**bound)
        return cls(chat_template=template, special_tokens=tuple(getattr(tokenizer, "special_tokens", {})),
                   bos_token=getattr(tokenizer, "bos_token", None),
                   eos_token=getattr(tokenizer, "eos_token", None), **bound)

    @property
    def uses_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings that mean the model started a turn of its own (the chat loop cuts there)."""
        return () if self.uses_template else PLAIN_STOP_STRINGS

    def escape(self, content: str) -> str:
        if self.uses_template:
            for token in sorted(self.special_tokens, key=len, reverse=True):
                if len(token) > 1 and token in content:
                    content = content.replace(token, token[0] + ZWSP + token[1:])
            return content
        return _ROLE_LINE.sub(lambda m: m.group(1) + " " + m.group(2), content)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of text this format rendered: the one decision of which encoder a prompt needs."""
        encode = self.encode_special if self.uses_template else self.encode_text
        if encode is None:
            raise TypeError("this ChatFormat is not bound to a tokenizer: build it with ChatFormat.for_tokenizer")
        return encode(text)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids a model continues to answer `messages`: the rendering with the assistant's cue, encoded."""
        return self.encode_prompt(self.render(messages))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Prompt text for `messages` ([{"role", "content": str}]); ends with the assistant's cue if asked."""
        messages = [{"role": _check_role(m), "content": self.escape(m["content"])} for m in messages]
        if self.uses_template:
            return _template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        lines = [f"{ROLES[m['role']]}: {m['content']}" for m in messages]
        if add_generation_prompt:
            lines.append(f"{ROLES['assistant']}:")
        return "\n".join(lines)

    def reply_text(self, messages: list[dict], reply: str) -> str:
        """What follows `render(messages)` when the assistant answers `reply`, up to its end marker.

        For the plain format the end marker is the end-of-text token, which `training_examples` appends as an
        id (it is never text in a prompt).
        """
        if not self.uses_template:
            return " " + self.escape(reply)
        prefix = self.render(messages, add_generation_prompt=True)
        full = self.render(messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
        if not full.startswith(prefix):
            raise ValueError("this chat template does not render a conversation as a prefix of its extension")
        return full[len(prefix):]

    def reply_ids(self, messages: list[dict], reply: str) -> list[int]:
        """The ids that follow `prompt_ids(messages)` when the assistant answers `reply`, its end included."""
        ids = self.encode_prompt(self.reply_text(messages, reply))
        return ids if self.uses_template else ids + [self.eot_id]

    def training_examples(self, messages: list[dict]) -> list[tuple[list[int], list[int]]]:
        """One (ids, mask) pair per assistant turn: the prompt ids exactly as at inference (mask 0), then the
        reply and its end (mask 1)."""
        examples = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i == 0:
                continue
            context = messages[:i]
            prompt_ids = self.prompt_ids(context)
            reply_ids = self.reply_ids(context, message["content"])
            examples.append((prompt_ids + reply_ids, [0] * len(prompt_ids) + [1] * len(reply_ids)))
        return examples


def _check_role(message: dict) -> str:
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"message role must be one of {sorted(ROLES)}, got {role!r}")
    return role


def _raise(message):
    raise ValueError(f"chat template error: {message}")


_TEMPLATES: dict[str, object] = {}


def _template(source: str):
    """Compile a chat template in the environment transformers' apply_chat_template uses (so both render
    the same text): a sandbox, trim/lstrip blocks, loop controls, a non-HTML-escaping tojson, strftime_now,
    and the `{% generation %}` tag (rendered as its body)."""
    if source not in _TEMPLATES:
        import json
        from datetime import datetime

        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class GenerationTag(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[GenerationTag, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
