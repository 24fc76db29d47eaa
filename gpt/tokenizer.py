"""Tokenizers behind one small interface: GPT-2 BPE through tiktoken, and any tokenizer.json.

    tok = load_tokenizer("gpt2")          # GPT-2 BPE from the offline ranks (see gpt/assets.py)
    tok = load_tokenizer("path/to/dir")   # a folder with tokenizer.json (Llama-family models)

`encode(text)` treats all of `text` as text: `<|endoftext|>` typed by a user stays text. Only
`encode_markup` turns special-token strings into special ids; it is for prompts rendered by a chat
template, whose message contents were escaped first (see gpt/chat_format.py).
"""

from __future__ import annotations

import json
from pathlib import Path

GPT2_EOT = "<|endoftext|>"
# End-of-turn tokens of common chat models (GPT-2, ChatML, Llama 3, Phi-3): any of them a tokenizer has ends a
# reply, besides its own eos. Both engines stop on these (backends/hf.py too).
END_OF_TURN_TOKENS = (GPT2_EOT, "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>")


class Tokenizer:
    """What the engine, the backends and training need of a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int  # the id that ends a reply
    stop_ids: frozenset[int]  # ids that end generation (eot, and end-of-turn for chat models)
    special_tokens: dict[str, int]
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_markup(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save(self, directory: Path) -> str:
        """Write what is needed to reload this tokenizer into `directory`; returns its spec for config.json."""
        raise NotImplementedError


class GPT2Tokenizer(Tokenizer):
    def __init__(self, bpe_path: Path | None = None):
        import tiktoken

        self.name = "gpt2"
        self._enc = _gpt2_encoding(bpe_path)
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token
        self.stop_ids = frozenset({self.eot_id})
        self.special_tokens = {GPT2_EOT: self.eot_id}
        self.eos_token = GPT2_EOT
        self._tiktoken = tiktoken

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_markup(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={GPT2_EOT})

    def decode(self, ids) -> str:
        return self._enc.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self._enc.decode_bytes(list(ids))

    def save(self, directory: Path) -> str:
        return "gpt2"


def _gpt2_encoding(bpe_path: Path | None):
    """GPT-2's encoding from the offline BPE ranks; tiktoken's own download where those are absent."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    from gpt.assets import GPT2_BPE, AssetMissing, asset_path

    try:
        path = bpe_path or asset_path(GPT2_BPE)
    except AssetMissing:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: tiktoken cannot download its files
            raise AssetMissing(f"The GPT-2 tokenizer is not available offline: run `make setup` to fetch "
                               f"{GPT2_BPE.filename} ({e.__class__.__name__}).") from None
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(str(path)),
                             special_tokens={GPT2_EOT: 50256})


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` (Hugging Face `tokenizers`), with the chat template from tokenizer_config.json."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as RawTokenizer

        directory = Path(directory)
        self.name = directory.name
        self._markup = RawTokenizer.from_file(str(directory / "tokenizer.json"))
        # A second copy that reads special-token strings as plain text (what `encode` needs): flipping the
        # flag on one shared object would race between threads.
        self._plain = RawTokenizer.from_str(self._markup.to_str())
        self._plain.encode_special_tokens = True
        self._config = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            self._config = json.loads(config_path.read_text())
        self.chat_template = self._config.get("chat_template")
        if not self.chat_template and (directory / "chat_template.jinja").is_file():
            self.chat_template = (directory / "chat_template.jinja").read_text()
        if not isinstance(self.chat_template, str):  # a list of named templates: not supported, use none
            self.chat_template = None
        self.bos_token = _token_text(self._config.get("bos_token"))
        self.eos_token = _token_text(self._config.get("eos_token"))
        self.vocab_size = self._markup.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in self._markup.get_added_tokens_decoder().items()
                               if t.special}
        candidates = [self.eos_token, "</s>", *END_OF_TURN_TOKENS]
        eos = next((c for c in candidates if c and c in self.special_tokens), None)
        if eos is None:
            raise ValueError(f"{directory} has no end-of-sequence token: set eos_token in tokenizer_config.json "
                             f"to one of the special tokens of tokenizer.json.")
        self.eos_token, self.eot_id = eos, self.special_tokens[eos]
        stops = {self.eot_id}
        for text in END_OF_TURN_TOKENS:
            if text in self.special_tokens:
                stops.add(self.special_tokens[text])
        self.stop_ids = frozenset(stops)
        self._directory = directory

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_markup(self, text: str) -> list[int]:
        return self._markup.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._markup.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: Path) -> str:
        import shutil

        for name in self.FILES:
            if (self._directory / name).is_file():
                shutil.copy(self._directory / name, Path(directory) / name)
        return "tokenizer.json"


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def load_tokenizer(spec: str, base_dir: Path | None = None) -> Tokenizer:
    """`"gpt2"`, a folder holding tokenizer.json, or `"tokenizer.json"` relative to `base_dir`."""
    if spec == "gpt2":
        return GPT2Tokenizer()
    path = Path(spec)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if path.is_file():
        path = path.parent
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return HFTokenizer(path)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, never emitting half a UTF-8 character.

    Each new id decodes a short window ending at it; text ending in U+FFFD (an incomplete character) is held
    back until the next id completes it, or until `max_hold` ids pile up (the bytes really are invalid).
    """

    def __init__(self, tokenizer: Tokenizer, max_hold: int = 8):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window whose text was already emitted up to `read`
        self.read = 0
        self.max_hold = max_hold

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        emitted = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") and not final and len(self.ids) - self.read < self.max_hold:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(emitted):]
