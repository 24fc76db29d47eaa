"""A backend that chats through any OpenAI-compatible server: vLLM, TGI, llama.cpp's server, Ollama, this app.

    backend = create_backend("openai", base_url="http://gpu-box:8000/v1", model="Qwen/Qwen2.5-7B-Instruct",
                             api_key_env="VLLM_API_KEY")
    for piece in backend.stream_messages([{"role": "user", "content": "Hi"}], GenerationConfig(seed=1)):
        print(piece, end="")

The server applies its own chat template, so this backend takes messages (`takes_messages`): the chat loop
sends it the messages its budget kept, through `stream_messages`. `format_chat` renders them in a ChatML
shape only so the budget can count them (`prompt_ids`), and `stream(prompt)` turns such a rendering (as text
or as those ids) back into messages (any other text goes as one user message), so the plain `ChatBackend`
contract holds too.

Context length: the `context_length` option, else what the server's /v1/models reports for the model
(vLLM's and this app's `max_model_len`, llama.cpp's `meta.n_ctx_train`, or `context_length`), else
DEFAULT_CONTEXT (also for a server with no /v1/models, such as older TGI). Token counts are an estimate, not the server's tokenizer: GPT-2's BPE over the ChatML
rendering (whose markers count ~15 tokens a message where real templates spend ~5), and the budget keeps
BUDGET_SHARE of the context, leaving the rest as slack for tokenizers that split text finer than GPT-2's.
Sampling: max_tokens, temperature, top_p, seed and stop are sent; top_k and repetition_penalty are not
part of OpenAI's API, so the server's own settings apply. Stop strings are also enforced here, by the
reply's one matcher (the server's template ends turns with its own tokens, so there are no markers to add).
The reply's token count is the server's `usage.completion_tokens`, else the number of streamed deltas (a
server sends one a token).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator

from backends.base import BackendError, ChatBackend, GenerationConfig
from backends.reply import ReplyStream, emit_until_stop

DEFAULT_CONTEXT = 4096  # when neither the config nor the server says
BUDGET_SHARE = 0.9  # of the context, for the estimated token counts
_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n", re.DOTALL)
_CUE = "<|im_start|>assistant\n"


class RemoteReply(ReplyStream):
    """A ReplyStream whose token count is the server's (`usage.completion_tokens`), else its deltas counted."""

    completion_tokens: int | None = None
    deltas: int = 0

    @property
    def n_tokens(self) -> int:
        return self.deltas if self.completion_tokens is None else self.completion_tokens


class OpenAIBackend(ChatBackend):
    takes_messages = True

    def __init__(self, name: str = "openai", base_url: str = "", model: str = "", api_key_env: str | None = None,
                 context_length: int | None = None, timeout: float = 600.0):
        if not base_url or not model:
            raise BackendError(f"Backend {name!r} (kind openai) needs base_url (e.g. http://127.0.0.1:8000/v1) "
                               "and model (a name the server lists at /v1/models): set both in configs/app.toml.")
        if context_length is not None and not (isinstance(context_length, int) and context_length > 1):
            raise BackendError(f"context_length of backend {name!r} must be an integer > 1, got "
                               f"{context_length!r}: fix it in configs/app.toml or leave it out.")
        self.name, self.base_url, self.model_name = name, base_url.rstrip("/"), model
        self.api_key_env, self._context, self.timeout = api_key_env, context_length, float(timeout)
        self._client = None
        self._tokenizer = None
        self._lock = threading.Lock()

    # --- the server ---------------------------------------------------------------------------------
    def _http(self):
        with self._lock:
            if self._client is None:
                import httpx  # only when used: the in-process backends never need it

                headers = {}
                if self.api_key_env:
                    key = os.environ.get(self.api_key_env)
                    if not key:
                        raise BackendError(f"Backend {self.name!r} reads its API key from ${self.api_key_env}, "
                                           f"which is not set: export {self.api_key_env}=KEY before starting.")
                    headers["Authorization"] = f"Bearer {key}"
                self._client = httpx.Client(base_url=self.base_url, headers=headers,
                                            timeout=httpx.Timeout(self.timeout, connect=10.0))
            return self._client

    def _request(self, method: str, path: str, stream: bool = False, missing_ok: bool = False, **kwargs):
        """A response from the server (None for a 404 if `missing_ok`), or BackendError saying what to do."""
        import httpx

        client = self._http()
        try:
            request = client.build_request(method, path, **kwargs)
            response = client.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise BackendError(f"Cannot reach the OpenAI-compatible server at {self.base_url} "
                               f"({type(exc).__name__}: {exc}): start it, or fix base_url of backend "
                               f"{self.name!r} in configs/app.toml.") from None
        if response.status_code == 404 and missing_ok:
            response.close()
            return None
        if response.status_code >= 400:
            response.read()
            response.close()
            raise BackendError(self._refusal(response))
        return response

    def _refusal(self, response) -> str:
        try:
            detail = response.json()["error"]
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except Exception:  # not OpenAI's error shape: show the start of what came back
            detail = response.text[:200]
        where = f"The server at {self.base_url}"
        if response.status_code in (401, 403):
            fix = (f"set a valid key in ${self.api_key_env}" if self.api_key_env
                   else f"set api_key_env of backend {self.name!r} to a variable holding the key")
            return f"{where} refused the API key ({response.status_code}: {detail}): {fix}."
        if response.status_code == 404:
            return (f"{where} answered 404 ({detail}): check base_url (it usually ends in /v1) and model "
                    f"{self.model_name!r} of backend {self.name!r}.")
        return f"{where} refused the request ({response.status_code}: {detail}): see its log, or change the request."

    @property
    def context_length(self) -> int:
        if self._context is None:
            self.load()
        return int(self._context * BUDGET_SHARE)

    def load(self) -> None:
        """Check now that the server answers and serves the model (the app calls this when it is chosen)."""
        reported = self._reported_context()
        if self._context is None:
            self._context = reported or DEFAULT_CONTEXT

    def _reported_context(self) -> int | None:
        response = self._request("GET", "/models", missing_ok=True)
        if response is None:  # a server without a model list (older TGI): nothing to check or read
            return None
        try:
            models = response.json().get("data", [])
        except (ValueError, AttributeError):
            raise BackendError(f"{self.base_url}/models did not answer with a model list: check that base_url "
                               "points at an OpenAI-compatible API (it usually ends in /v1).") from None
        entry = next((m for m in models if isinstance(m, dict) and m.get("id") == self.model_name), None)
        if entry is None:
            names = ", ".join(str(m.get("id")) for m in models if isinstance(m, dict)) or "none"
            raise BackendError(f"The server at {self.base_url} does not serve model {self.model_name!r} (it "
                               f"serves: {names}): set model of backend {self.name!r} to one of those.")
        for value in (entry.get("max_model_len"), (entry.get("meta") or {}).get("n_ctx_train"),
                      entry.get("context_length")):
            if isinstance(value, int) and value > 1:
                return value
        return None

    def release(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # --- counting (an estimate: see the module docstring) ------------------------------------------
    def _bpe(self):
        if self._tokenizer is None:
            from gpt.tokenizer import GPT2Tokenizer

            self._tokenizer = GPT2Tokenizer()
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self._bpe().encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._bpe().decode(ids)

    def format_chat(self, messages: list[dict]) -> str:
        # A message's own "<|im_" gets a zero-width space so the rendering parses back unambiguously.
        return "".join(f"<|im_start|>{m['role']}\n{_escape(m['content'])}<|im_end|>\n" for m in messages) + _CUE

    # --- generation -----------------------------------------------------------------------------------
    def stream(self, prompt, cfg: GenerationConfig) -> RemoteReply:
        if not isinstance(prompt, str):  # prompt_ids: GPT-2 BPE decodes them back to the exact rendering
            prompt = self.decode(list(prompt))
        return self.stream_messages(_parse(prompt), cfg)

    def stream_messages(self, messages: list[dict], cfg: GenerationConfig) -> RemoteReply:
        """Stream the server's reply to `messages` ([{"role", "content": str}]); stops never leak."""
        cfg = GenerationConfig.parse(cfg)
        body = {"model": self.model_name, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        if cfg.stop:
            body["stop"] = list(cfg.stop)

        def pieces(reply: RemoteReply) -> Iterator[str]:
            yield from emit_until_stop(reply, self._deltas(body, reply), cfg.stop)

        return RemoteReply(pieces)

    def _deltas(self, body: dict, reply: RemoteReply) -> Iterator[str]:
        response = self._request("POST", "/chat/completions", json=body, stream=True)
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise BackendError(f"The server at {self.base_url} sent a malformed event ({data[:80]!r}): "
                                       "check that it speaks the OpenAI chat API.") from None
                if "error" in chunk:
                    error = chunk["error"]
                    raise BackendError(f"The server at {self.base_url} failed mid-reply: "
                                       f"{error.get('message', error) if isinstance(error, dict) else error}")
                usage = chunk.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    reply.completion_tokens = usage["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason"):
                        reply.finish_reason = "length" if choice["finish_reason"] == "length" else "eot"
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        reply.deltas += 1
                        yield text
        except BackendError:
            raise
        except Exception as exc:  # the connection broke mid-reply
            import httpx

            if isinstance(exc, httpx.HTTPError):
                raise BackendError(f"The connection to {self.base_url} broke mid-reply ({type(exc).__name__}): "
                                   "check the server, then send the message again.") from None
            raise
        finally:
            response.close()


def _escape(text: str) -> str:
    return text.replace("<|im_", "<|\u200bim_")


def _parse(prompt: str) -> list[dict]:
    """format_chat's rendering back as messages; any other text is one user message."""
    turns, end = [], 0
    for match in _TURN.finditer(prompt):
        if match.start() != end:
            break
        turns.append({"role": match.group(1), "content": match.group(2).replace("<|\u200bim_", "<|im_")})
        end = match.end()
    if turns and prompt[end:] == _CUE:
        return turns
    return [{"role": "user", "content": prompt}]
