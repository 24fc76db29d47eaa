"""Chat rendering: the ONE place where chat turns become prompt text and training tokens.

Inference (`render`) and fine-tuning (`training_examples`) both come through here, so the model is trained
on exactly the prompts it later sees.

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
  `\\nUser:`, `\\nAssistant:` and `\\nSystem:` catch a model that keeps going.

A user cannot inject a turn: in the plain format a line of a message that starts like a role marker gets a
leading space (so it no longer matches one); with a template, special-token strings inside a message are
broken by a zero-width space so the tokenizer does not parse them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ChatFormat:
        """The format a tokenizer implies: its chat template if it has one, else the plain format."""
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            return cls()
        return cls(chat_template=template, special_tokens=tuple(getattr(tokenizer, "special_tokens", {})),
                   bos_token=getattr(tokenizer, "bos_token", None), eos_token=getattr(tokenizer, "eos_token", None))

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

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Prompt text for `messages` ([{"role", "content"}]); ends with the assistant's cue if asked."""
        messages = [{"role": _check_role(m), "content": self.escape(message_text(m["content"]))}
                    for m in messages]
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

    def training_examples(self, messages: list[dict], encode_prompt, eot_id: int) -> list[tuple[list[int], list[int]]]:
        """One (ids, mask) pair per assistant turn: the prompt exactly as at inference (mask 0), then the
        reply and its end (mask 1). `encode_prompt` is the tokenizer call the backend uses on prompts."""
        examples = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i == 0:
                continue
            context = [m for m in messages[:i]]
            prompt_ids = encode_prompt(self.render(context, add_generation_prompt=True))
            reply_ids = encode_prompt(self.reply_text(context, message_text(message["content"])))
            if not self.uses_template:
                reply_ids = reply_ids + [eot_id]
            examples.append((prompt_ids + reply_ids, [0] * len(prompt_ids) + [1] * len(reply_ids)))
        return examples


def message_text(content) -> str:
    """Message content as text; Gradio may hand a list of blocks ([{"type": "text", "text": ...}])."""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        parts = []
        for block in content:
            if isinstance(block, dict) and block.get("type", "text") == "text":
                parts.append(str(block.get("text", "")))
            elif isinstance(block, str):
                parts.append(block)
        return "".join(parts)
    return str(content)


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
