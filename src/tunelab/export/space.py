"""A Hugging Face Space folder (Gradio, CPU) that serves tunelab's app (Chat, Travel Planner, Feedback, Overview)
with the exported q4_k_m GGUF.

tunelab is not on PyPI, so the part of the package the app needs is copied into the bundle (`DIR/tunelab/`,
exactly the import closure of `tunelab.serve.app`, see VENDORED); `app.py` imports it from there, on a Space
and locally (`python DIR/app.py`). The GGUF is hard-linked (or copied) next to app.py; if it is missing there,
the app downloads it from MODEL_REPO (the --push-to-hub repo, when given).

Feedback: SQLite next to app.py (env FEEDBACK_DB). A Space's disk is wiped on restart, so with env
FEEDBACK_REPO (a Hub dataset id) and the HF_TOKEN secret the app copies it to that dataset every 5 minutes
(`tunelab.serve.hub_sync`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tunelab.errors import UserError

GGUF_NAME = "model-q4_k_m.gguf"

# The module-level import closure of tunelab.serve.app (+ hub_sync), relative to the tunelab package.
# backends.load_backend imports tunelab.models only for folders, after the .gguf case the Space uses.
VENDORED = (
    "__init__.py",
    "errors.py",
    "serve/__init__.py",
    "serve/app.py",
    "serve/backends.py",
    "serve/feedback.py",
    "serve/hub_sync.py",
    "serve/prompts/travel_planner.jinja",
    "serve/prompts/travel_planner_system.txt",
)

APP_PY = '''"""{title}: tunelab's app (Chat, Travel Planner, Feedback, Overview) on llama.cpp, CPU only.

Locally: `pip install -r requirements.txt && python app.py` (http://127.0.0.1:7860). On a Hugging Face Space
(env SPACE_ID is set) it listens on 0.0.0.0. Settings, all optional (env vars / Space secrets):
  PORT            port (default 7860)
  THREADS         llama.cpp threads (default: all cores)
  TUNELAB_AUTH    USER:PASS login in front of the page and the API; without it a Space hides other
                  visitors' feedback (overview items and the download)
  FEEDBACK_DB     SQLite file for feedback (default: /data/feedback.db on a Space with persistent
                  storage, else feedback.db next to this file)
  FEEDBACK_REPO   a Hub dataset (user/name) that receives the feedback as JSONL every 5 minutes
                  (FEEDBACK_SYNC_MINUTES); needs the HF_TOKEN secret (write access). A Space's disk is
                  wiped on restart: without FEEDBACK_REPO the feedback is lost then.
  MODEL_REPO      where to download {gguf_name} from when it is not next to this file
"""

import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the tunelab/ copied next to this file (tunelab is not on PyPI)

from tunelab.serve.app import LOOPBACK_HOSTS, build_app, launch  # noqa: E402
from tunelab.serve.backends import load_backend  # noqa: E402
from tunelab.serve.hub_sync import start_feedback_sync  # noqa: E402

TITLE = {title!r}
GGUF = HERE / "{gguf_name}"
MODEL_REPO = os.environ.get("MODEL_REPO", {model_repo!r})


def model_file() -> Path:
    if GGUF.is_file():
        return GGUF
    if not MODEL_REPO:
        raise SystemExit(f"{{GGUF.name}} is missing and no MODEL_REPO is set")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(MODEL_REPO, GGUF.name))


def parse_auth(value: str) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise SystemExit("TUNELAB_AUTH must look like USER:PASS")
    return user, password


def default_db(on_space: bool) -> Path:
    """A Space's persistent storage (/data) when it has one, else next to this file."""
    if on_space and os.path.isdir("/data") and os.access("/data", os.W_OK):
        return Path("/data/feedback.db")
    return HERE / "feedback.db"


def main() -> None:
    on_space = bool(os.environ.get("SPACE_ID"))
    host = "0.0.0.0" if on_space else "127.0.0.1"
    port = int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    threads = int(os.environ.get("THREADS") or os.cpu_count() or 2)
    auth = parse_auth(os.environ.get("TUNELAB_AUTH", ""))
    db = Path(os.environ.get("FEEDBACK_DB") or default_db(on_space))

    backend = load_backend(model_file(), threads=threads)
    exposed = host not in LOOPBACK_HOSTS
    demo = build_app(backend, db, share_feedback_data=auth is not None or not exposed, title=TITLE)
    print(f"model: {{backend.model_id}} (llama.cpp, {{threads}} threads); feedback database: {{db}}", flush=True)
    if exposed and auth is None:
        print("no TUNELAB_AUTH: visitors do not see each other's feedback", flush=True)
    sync = start_feedback_sync(db, say=lambda line: print(line, flush=True))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a Space stopping: upload the last feedback first
    try:
        launch(demo, host=host, port=port, auth=auth)
    finally:
        if sync is not None:
            sync.stop(final_sync=True)


if __name__ == "__main__":
    main()
'''

GITIGNORE = """# written by app.py at run time: feedback (people's prompts) must not be uploaded with the Space
feedback.db*
*.sync/
__pycache__/
"""


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

A tunelab LoRA fine-tune (`{GGUF_NAME}`, llama.cpp on CPU) in tunelab's app: Chat, Travel Planner,
👍/👎 feedback on every answer, and a feedback overview. `tunelab/` is the part of tunelab the app needs.

Run it locally: `pip install -r requirements.txt && python app.py` (listens on 127.0.0.1:7860; env `PORT`).
Local feedback goes to `feedback.db` here: keep it out of an upload (`hf upload ... --exclude "feedback.db*"`).

On a Space the disk is wiped on restart. To keep the feedback, set the variable `FEEDBACK_REPO` to a Hub
dataset id (e.g. `you/{_slug(title)}-feedback`, created private if missing) and the secret `HF_TOKEN` (write
access): the app uploads it there as JSONL every 5 minutes. Optional secret `TUNELAB_AUTH=USER:PASS` adds a
login; without it visitors do not see each other's feedback. All settings: the docstring of `app.py`.
"""


def _slug(title: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split()) or "space"


def requirements(gradio_version: str) -> str:
    return (
        f"gradio=={gradio_version}\n"  # tunelab's app uses this Gradio's API (the README's sdk_version too)
        "llama-cpp-python>=0.3\n"
        "huggingface_hub\n"
        "jinja2\n"
    )


def vendor_tunelab(space_dir: Path) -> Path:
    """Copy tunelab's app (VENDORED) into space_dir/tunelab, replacing an older copy."""
    import tunelab

    source = Path(tunelab.__file__).resolve().parent
    target = space_dir / "tunelab"
    tmp = space_dir / ".tunelab.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in VENDORED:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, tmp / rel)
    old = space_dir / ".tunelab.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def build_space(space_dir: Path, export_dir: Path, title: str, license_: str, model_repo: str | None) -> list[Path]:
    """Write README.md, app.py, requirements.txt, .gitignore, tunelab/ and the q4_k_m GGUF into `space_dir`."""
    import importlib.metadata

    gguf = export_dir / GGUF_NAME
    if not gguf.is_file() and not model_repo:
        raise UserError(f"--space: needs {GGUF_NAME} (add q4_k_m to --gguf) or --push-to-hub to reference it")
    space_dir.mkdir(parents=True, exist_ok=True)
    gradio_version = importlib.metadata.version("gradio")
    files = {
        "README.md": space_readme(title, license_, gradio_version),
        "app.py": APP_PY.format(gguf_name=GGUF_NAME, model_repo=model_repo or "", title=title),
        "requirements.txt": requirements(gradio_version),
        ".gitignore": GITIGNORE,
    }
    written = []
    for name, text in files.items():
        tmp = space_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, space_dir / name)
        written.append(space_dir / name)
    vendored = vendor_tunelab(space_dir)
    written += sorted(p for p in vendored.rglob("*") if p.is_file())
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
