"""A tunelab Space's app.py (copied from tunelab/serve/space_app.py by `tunelab export --space`): tunelab's app
(Chat, Travel Planner, Feedback, Overview) on llama.cpp, CPU only.

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
  MODEL_REPO      where to download model-q4_k_m.gguf (named in space.json) from when it is not next to this file
"""

import json
import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the tunelab/ copied next to this file (tunelab is not on PyPI)

from tunelab.hardware import usable_cores  # noqa: E402
from tunelab.models.inference import load_backend  # noqa: E402
from tunelab.serve.app import LOOPBACK_HOSTS, build_app, launch  # noqa: E402
from tunelab.serve.fingerprint import model_fingerprint  # noqa: E402
from tunelab.serve.hub_sync import start_feedback_sync  # noqa: E402

# Written by `tunelab export --space` next to this file: {"title": ..., "gguf": ..., "model_repo": ...}.
SETTINGS = json.loads((HERE / "space.json").read_text(encoding="utf-8"))
TITLE = SETTINGS["title"]
GGUF = HERE / SETTINGS["gguf"]
MODEL_REPO = os.environ.get("MODEL_REPO", SETTINGS.get("model_repo") or "")


def model_file() -> Path:
    if GGUF.is_file():
        return GGUF
    if not MODEL_REPO:
        raise SystemExit(f"{GGUF.name} is missing and no MODEL_REPO is set")
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
    threads = int(os.environ.get("THREADS") or usable_cores())
    auth = parse_auth(os.environ.get("TUNELAB_AUTH", ""))
    db = Path(os.environ.get("FEEDBACK_DB") or default_db(on_space))

    gguf = model_file()
    backend = load_backend(gguf, threads=threads)
    exposed = host not in LOOPBACK_HOSTS
    demo = build_app(
        backend,
        db,
        share_feedback_data=auth is not None or not exposed,
        title=TITLE,
        model_hash=model_fingerprint(gguf),
    )
    print(f"model: {backend.model_id} (llama.cpp, {threads} threads); feedback database: {db}", flush=True)
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
