"""A ChatBackend that talks to any OpenAI-compatible server, so the app and the model scale separately.

    backend = OpenAIBackend("http://127.0.0.1:8000/v1", api_key="secret")   # `tunelab serve m.gguf --api`, vLLM, ...
    for piece in backend.stream_chat(messages, GenerationParams(temperature=0)):
        print(piece, end="")

The server renders the prompt with its model's chat template and stops at its EOS; this client sends the
canonical messages and the sampling settings and reads the streamed `chat.completion.chunk` events (SSE).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx

from tunelab.errors import UserError

Messages = list[dict[str, str]]
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # a queued request on a busy CPU server can wait minutes for its first token


class RemoteModelError(RuntimeError):
    """The server answered with an error (HTTP status + its message); the app shows it as a failed generation."""


def api_base(url: str) -> str:
    """`http://host:8000`, `.../v1` or `.../v1/` -> `http://host:8000/v1`."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--backend-url: expected an http(s) URL such as http://127.0.0.1:8000/v1 (got {url!r})")
    return url if url.endswith("/v1") else url + "/v1"


class OpenAIBackend:
    kind = "openai-api"
    # The app sends this many requests at once (a remote server batches them: vLLM, llama.cpp with --parallel);
    # an in-process model runs one at a time. httpx.Client is thread-safe, so the app's threads share it.
    concurrency_limit = 8

    def __init__(
        self, url: str, api_key: str | None = None, model: str | None = None, timeout_s: float = READ_TIMEOUT_S
    ):
        self.base_url = api_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.model_id = model or self.first_model()

    def first_model(self) -> str:
        """The model the server lists first (llama.cpp's server and `tunelab serve --api` list exactly one)."""
        try:
            response = self.client.get("/models")
        except httpx.HTTPError as exc:
            raise UserError(f"--backend-url: cannot reach {self.base_url} ({type(exc).__name__}: {exc})") from None
        if response.status_code == 401:
            raise UserError(f"--backend-url: {self.base_url} refused the API key (HTTP 401); pass --api-key")
        if response.status_code != 200:
            raise UserError(f"--backend-url: {self.base_url}/models answered HTTP {response.status_code}")
        models = response.json().get("data") or []
        if not models:
            raise UserError(f"--backend-url: {self.base_url}/models lists no model")
        return models[0]["id"]

    def request_body(self, messages: Messages, params, grammar: str | None = None) -> dict:
        body = {
            "model": self.model_id,
            "messages": messages,
            "stream": True,
            "temperature": params.temperature,  # 0 = greedy on llama.cpp, vLLM and the thin transformers server
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.repetition_penalty != 1.0:
            # not in OpenAI's API: vLLM and the tunelab server read `repetition_penalty`, llama.cpp `repeat_penalty`
            body["repetition_penalty"] = body["repeat_penalty"] = params.repetition_penalty
        if grammar is not None:  # only sent where `takes_grammar` (llama.cpp's server reads `grammar`)
            body["grammar"] = grammar
        return body

    def stream_chat(self, messages: Messages, params=None, grammar: str | None = None) -> Iterator[str]:
        if params is None:
            from tunelab.models.inference import GenerationParams

            params = GenerationParams()
        params.validate()
        with self.client.stream(
            "POST", "/chat/completions", json=self.request_body(messages, params, grammar)
        ) as response:
            if response.status_code != 200:
                response.read()
                raise RemoteModelError(f"HTTP {response.status_code} from {self.base_url}: {response.text[:300]}")
            yield from content_pieces(response.iter_lines())

    def close(self) -> None:
        self.client.close()


def content_pieces(lines: Iterator[str]) -> Iterator[str]:
    """The `delta.content` strings of an OpenAI SSE stream, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, `: ping` comments, `event:` lines
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise RemoteModelError(f"the server reported an error: {chunk['error']}")
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield piece
