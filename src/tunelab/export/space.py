"""A Hugging Face Space folder (Gradio, CPU) that chats with the exported q4_k_m GGUF.

`python DIR/app.py` runs it locally too. Where tunelab is installed (locally) app.py uses tunelab's backend;
on a Space it falls back to plain llama-cpp-python. The GGUF is copied next to app.py; if it is missing there,
the app downloads it from MODEL_REPO (the --push-to-hub repo, when given).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tunelab.errors import UserError

GGUF_NAME = "model-q4_k_m.gguf"

APP_PY = '''"""Chat with a tunelab fine-tune (llama.cpp, CPU). Run locally with `python app.py`."""

import os
from pathlib import Path

import gradio as gr

HERE = Path(__file__).resolve().parent
GGUF = HERE / "{gguf_name}"
MODEL_REPO = os.environ.get("MODEL_REPO", {model_repo!r})  # used when the GGUF is not bundled
THREADS = int(os.environ.get("THREADS", os.cpu_count() or 2))


def model_file() -> Path:
    if GGUF.is_file():
        return GGUF
    if not MODEL_REPO:
        raise SystemExit(f"{{GGUF.name}} is missing and no MODEL_REPO is set")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(MODEL_REPO, GGUF.name))


def load_chat():
    """A function messages -> iterator of text pieces, using the GGUF's own chat template and EOS."""
    try:  # tunelab installed (local run): its backend also handles llama.cpp builds with unusable AMX kernels
        from tunelab.serve.backends import GenerationParams, LlamaCppBackend

        backend = LlamaCppBackend(model_file(), threads=THREADS)
        return lambda messages, temperature, top_p, max_tokens: backend.stream_chat(
            messages, GenerationParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens))
    except ImportError:
        from llama_cpp import Llama

        llm = Llama(model_path=str(model_file()), n_ctx=2048, n_threads=THREADS, chat_format=None, verbose=False)

        def chat(messages, temperature, top_p, max_tokens):
            for chunk in llm.create_chat_completion(messages=messages, stream=True, temperature=temperature,
                                                    top_p=top_p, max_tokens=max_tokens, repeat_penalty=1.1):
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece

        return chat


CHAT = load_chat()


def respond(message, history, temperature=0.7, top_p=0.9, max_tokens=256):
    messages = [{{"role": m["role"], "content": m["content"]}} for m in history] + [{{"role": "user", "content": message}}]
    reply = ""
    for piece in CHAT(messages, temperature, top_p, int(max_tokens)):
        reply += piece
        yield reply


demo = gr.ChatInterface(
    respond,
    title={title!r},
    additional_inputs=[
        gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="temperature"),
        gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="top-p"),
        gr.Slider(16, 1024, value=256, step=16, label="max new tokens"),
    ],
)

if __name__ == "__main__":
    demo.launch(server_name=os.environ.get("HOST", "127.0.0.1"), server_port=int(os.environ.get("PORT", 7860)))
'''


def space_readme(title: str, license_: str, gradio_version: str) -> str:
    return f"""---
title: {title}
emoji: 💬
colorFrom: blue
colorTo: green
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: {license_}
---
# {title}

A tunelab LoRA fine-tune served with llama.cpp on CPU (`{GGUF_NAME}`).
Run it locally: `pip install -r requirements.txt && python app.py`.
"""


def build_space(space_dir: Path, export_dir: Path, title: str, license_: str, model_repo: str | None) -> list[Path]:
    """Write README.md, app.py, requirements.txt and the q4_k_m GGUF into `space_dir`."""
    import importlib.metadata

    gguf = export_dir / GGUF_NAME
    if not gguf.is_file() and not model_repo:
        raise UserError(f"--space: needs {GGUF_NAME} (add q4_k_m to --gguf) or --push-to-hub to reference it")
    space_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "README.md": space_readme(title, license_, importlib.metadata.version("gradio")),
        "app.py": APP_PY.format(gguf_name=GGUF_NAME, model_repo=model_repo or "", title=title),
        "requirements.txt": "llama-cpp-python>=0.3\ngradio>=5\nhuggingface_hub\n",
    }
    written = []
    for name, text in files.items():
        tmp = space_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, space_dir / name)
        written.append(space_dir / name)
    if gguf.is_file():
        target = space_dir / GGUF_NAME
        tmp = space_dir / f".{GGUF_NAME}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(gguf, tmp)  # same filesystem: no second 100 MB copy
        except OSError:
            shutil.copyfile(gguf, tmp)
        os.replace(tmp, target)
        written.append(target)
    return written
