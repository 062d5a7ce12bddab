"""`tunelab serve MODEL --api`: an OpenAI-compatible HTTP server (`/v1/models`, `/v1/chat/completions`).

    app = api_app("model.gguf", api_key="secret", threads=2)   # a FastAPI app
    run_api_server("model.gguf", host="127.0.0.1", port=8000)  # blocks until Ctrl+C

- `.gguf`: llama-cpp-python's own server (`llama_cpp.server`), configured here. The prompt is rendered with the
  GGUF's `tokenizer.chat_template` (chat_format "chat_template.default": never a guessed built-in format) and
  generation stops at the GGUF's EOS token, exactly as `tunelab chat` and the app do.
- run folder or merged HF folder: a thin FastAPI app over tunelab's TransformersBackend (the training chat
  template and EOS ids). Why not an existing server: vLLM's PyPI wheels need CUDA (its CPU build is from
  source), TGI is not on PyPI, and `transformers serve` (installed here, runs on CPU) has no API-key option and
  loads models only through `from_pretrained(model_id)`, so it cannot apply a run folder's adapter to tunelab's
  base (e.g. the embedded GGUF-dequantised SmolLM2). The thin app implements only what the issue asks for:
  `/v1/models` and `/v1/chat/completions`, streaming (SSE) or not, one generation at a time. On a GPU, serve
  the same folders with vLLM (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request  # module level: FastAPI resolves annotations here
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tunelab.errors import UserError
from tunelab.hardware import usable_cores

# OpenAI's defaults where a request leaves a field out (vLLM and llama.cpp's server use the same ones).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_TOKENS = 256


def api_app(model_path: str | Path, *, api_key: str | None = None, threads: int | None = None, n_ctx: int = 2048):
    """The FastAPI app for a `.gguf` (llama.cpp's server) or a run / merged folder (thin transformers app)."""
    path = Path(model_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        return llama_cpp_app(path, api_key=api_key, threads=threads, n_ctx=n_ctx)
    from tunelab.models.inference import TransformersBackend, load_backend

    backend = load_backend(path, threads=threads)
    if not isinstance(backend, TransformersBackend):
        raise UserError(f"{path}: not a run folder or a HF model folder")
    return transformers_app(backend, api_key=api_key)


def run_api_server(
    model_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
    threads: int | None = None, n_ctx: int = 2048,
) -> None:  # fmt: skip
    import uvicorn

    app = api_app(model_path, api_key=api_key, threads=threads, n_ctx=n_ctx)
    print(f"OpenAI-compatible API on http://{host}:{port}/v1 (model: {served_model_name(model_path)})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def served_model_name(model_path: str | Path) -> str:
    """The `model` id clients see in /v1/models: the file or folder name, as the app shows it."""
    return Path(model_path).expanduser().resolve().name


# ------------------------------------------------------------------------------------ llama.cpp
def llama_cpp_app(gguf_path: Path, *, api_key: str | None, threads: int | None, n_ctx: int):
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:  # the [server] extra: fastapi, uvicorn, sse-starlette, starlette-context, ...
        raise UserError(
            f"--api needs llama-cpp-python's server extras ({exc}); pip install 'llama-cpp-python[server]'"
        ) from None
    from tunelab.models.inference import _plain_cpu_buffers, amx_build_needs_plain_buffers

    check_chat_template(gguf_path)
    thread_count = threads or usable_cores()
    model = ModelSettings(
        model=str(gguf_path),
        model_alias=served_model_name(gguf_path),
        chat_format="chat_template.default",  # the GGUF's own template and EOS, never a guessed format
        n_ctx=n_ctx,
        n_threads=thread_count,
        n_threads_batch=thread_count,
        verbose=False,
    )
    # interrupt_requests=False: a second client waits for the first instead of cutting its stream short.
    server = ServerSettings(api_key=api_key, interrupt_requests=False)
    guard = _plain_cpu_buffers() if amx_build_needs_plain_buffers() else contextlib.nullcontext()
    with guard:  # the model is loaded inside create_app
        return create_app(server_settings=server, model_settings=[model])


def check_chat_template(gguf_path: Path) -> None:
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(gguf_path)).fields
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise UserError(f"{gguf_path}: not a readable GGUF file ({exc})") from None
    if "tokenizer.chat_template" not in fields:
        raise UserError(f"{gguf_path}: the GGUF has no tokenizer.chat_template; re-export it with `tunelab export`")


# --------------------------------------------------------------------------------- transformers
def transformers_app(backend, *, api_key: str | None = None):
    """/v1/models and /v1/chat/completions over one TransformersBackend; one generation at a time."""
    app = FastAPI(title="tunelab OpenAI-compatible API")
    model_lock = threading.Lock()  # one model, one generate() at a time; other requests wait their turn

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
            raise HTTPException(status_code=401, detail="Invalid API key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def models() -> dict:
        entry = {"id": backend.model_id, "object": "model", "created": 0, "owned_by": "tunelab"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        try:
            body = await request.json()
            messages, params, stream = parse_chat_request(body)
        except (ValueError, UserError) as exc:
            return JSONResponse(
                status_code=400, content={"error": {"message": str(exc), "type": "invalid_request_error"}}
            )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if stream:
            pieces = locked_stream(model_lock, backend, messages, params)
            finish = lambda text: finish_reason(backend, text, params)  # noqa: E731
            events = sse_chunks(pieces, completion_id, backend.model_id, finish)
            return StreamingResponse(events, media_type="text/event-stream")
        text = await run_in_threadpool(lambda: "".join(locked_stream(model_lock, backend, messages, params)))
        return completion_response(text, completion_id, backend.model_id, backend, messages, params)

    return app


def parse_chat_request(body: Any):
    """(messages, GenerationParams, stream) from an OpenAI chat request; ValueError/UserError names the field."""
    from tunelab.models.inference import GenerationParams

    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: a non-empty list is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or message.get("role") not in (
            "system", "user", "assistant"
        ):  # fmt: skip
            raise ValueError(f"messages[{i}]: needs role system|user|assistant and string content")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or DEFAULT_MAX_TOKENS
    params = GenerationParams(
        temperature=float(_or_default(body.get("temperature"), DEFAULT_TEMPERATURE)),
        top_p=float(_or_default(body.get("top_p"), DEFAULT_TOP_P)),
        max_new_tokens=int(max_tokens),
        repetition_penalty=float(_or_default(body.get("repetition_penalty"), 1.0)),  # vLLM's extra field
        seed=body.get("seed"),
    ).validate()
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return clean, params, bool(body.get("stream", False))


def _or_default(value, default):
    return default if value is None else value


def locked_stream(lock: threading.Lock, backend, messages, params) -> Iterator[str]:
    with lock:
        yield from backend.stream_chat(messages, params)


def sse_chunks(pieces: Iterator[str], completion_id: str, model_id: str, finish=lambda text: "stop") -> Iterator[str]:
    """OpenAI's `chat.completion.chunk` events: the role first, then content deltas, then finish_reason."""
    created = int(time.time())

    def event(delta: dict, finish_reason: str | None = None) -> str:
        chunk = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }  # fmt: skip
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    text = ""
    for piece in pieces:
        text += piece
        yield event({"content": piece})
    yield event({}, finish(text))
    yield "data: [DONE]\n\n"


def completion_response(text: str, completion_id: str, model_id: str, backend, messages, params) -> dict:
    prompt_tokens = int(backend.prompt_ids(messages)["input_ids"].shape[-1])
    completion_tokens = len(backend.tokenizer(text, add_special_tokens=False)["input_ids"])
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(backend, text, params),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def finish_reason(backend, text: str, params) -> str:
    """ "length" when the reply used the whole token budget (cut off), else "stop" (ended at the model's EOS)."""
    completion_tokens = len(backend.tokenizer(text, add_special_tokens=False)["input_ids"])
    return "length" if completion_tokens >= params.max_new_tokens else "stop"
