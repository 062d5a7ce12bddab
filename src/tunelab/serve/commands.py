"""`tunelab serve` and `tunelab feedback export` (registered by tunelab.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.errors import UserError


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth: expected USER:PASS (both non-empty)")
    return user, password


def serve_cmd(
    model: Annotated[
        Optional[Path],
        typer.Argument(help="A .gguf file (llama.cpp, best on CPU), a run folder or a merged folder. "
                            "With --backend-url: the remote model's name (default: the first it lists)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind. Keep 127.0.0.1 unless you add --auth.")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option(help="TCP port (default 7860; 8000 with --api).")] = None,
    feedback_db: Annotated[Path, typer.Option(help="SQLite file that stores feedback.")] = Path("feedback.db"),
    auth: Annotated[
        Optional[str],
        typer.Option(envvar="TUNELAB_AUTH", help="USER:PASS required to open the app (or env TUNELAB_AUTH)."),
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="llama.cpp / torch threads (default: all cores).")] = None,
    share: Annotated[bool, typer.Option(help="Also create a public gradio.live link.")] = False,
    api: Annotated[bool, typer.Option(help="Serve an OpenAI-compatible API (/v1/chat/completions) instead of the app.")] = False,
    backend_url: Annotated[
        Optional[str], typer.Option(help="Let the app use a remote OpenAI-compatible server (e.g. http://host:8000/v1).")
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="TUNELAB_API_KEY", help="With --api: the key clients must send; with --backend-url: the key "
                                                    "sent to the server (or env TUNELAB_API_KEY)."),
    ] = None,
) -> None:
    """Serve the Chat + Travel Planner app with feedback collection (or, with --api, an OpenAI-compatible API)."""
    from tunelab.serve.app import LOOPBACK_HOSTS, build_app, launch
    from tunelab.models.inference import load_backend

    credentials = parse_auth(auth)
    port = port if port is not None else (8000 if api else 7860)
    if not 1 <= port <= 65535:
        raise UserError(f"--port: must be 1..65535 (got {port})")
    if api and backend_url:
        raise UserError("--api and --backend-url: pick one (serve a model's API, or run the app on a remote one)")
    if backend_url is None and (model is None or not model.exists()):
        raise UserError(f"{model}: model not found (give a .gguf file, a run folder or a merged folder)")
    if api:
        from tunelab.serve.api import run_api_server

        if credentials or share:
            raise UserError("--api: protect the API with --api-key (--auth and --share are for the app)")

        if host not in LOOPBACK_HOSTS and api_key is None:
            typer.echo(f"warning: the API is reachable beyond this machine ({host}) without --api-key.", err=True)
        return run_api_server(model, host=host, port=port, api_key=api_key, threads=threads)
    exposed = host not in LOOPBACK_HOSTS or share
    if exposed and credentials is None:
        typer.echo(
            f"warning: the app is reachable beyond this machine ({'share link' if share else host}) without --auth; "
            "other users' feedback (recent items, downloads) is hidden.",
            err=True,
        )
    if backend_url:
        from tunelab.models.openai_backend import OpenAIBackend

        backend = OpenAIBackend(backend_url, api_key=api_key, model=str(model) if model else None)
    else:
        backend = load_backend(model, threads=threads)
    demo = build_app(backend, feedback_db, share_feedback_data=credentials is not None or not exposed)
    typer.echo(f"model: {backend.model_id} ({backend.kind}); feedback database: {feedback_db.resolve()}")
    launch(demo, host=host, port=port, auth=credentials, share=share)


def feedback_export_cmd(
    db: Annotated[Path, typer.Argument(help="The feedback SQLite file written by `tunelab serve`.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="sft | dpo | jsonl")] = "sft",
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output .jsonl (default: <db>.<format>.jsonl).")
    ] = None,
    min_rating: Annotated[
        Optional[int], typer.Option(help="Keep rows rated at least this (1 = thumbs-up only, -1 = all).")
    ] = None,
    push_to_hub: Annotated[
        Optional[str], typer.Option(help="Also upload the file to this Hugging Face dataset repo (user/name).")
    ] = None,
    private: Annotated[bool, typer.Option(help="With --push-to-hub: create the dataset repo as private.")] = True,
) -> None:
    """Turn feedback into a dataset: SFT conversations, DPO preference pairs, or raw JSONL."""
    from tunelab.hub import check_repo_id, push_feedback_to_hub
    from tunelab.serve.feedback import EXPORT_FORMATS, export_feedback

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format: choose one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")
    if push_to_hub is not None:
        check_repo_id(push_to_hub, "dataset repo")
    if min_rating is not None and min_rating not in (-1, 1):
        raise UserError(f"--min-rating: ratings are -1 (👎) or 1 (👍) (got {min_rating})")
    output = output or db.with_name(f"{db.stem}.{fmt}.jsonl")
    count = export_feedback(db, output, fmt, min_rating=min_rating)
    typer.echo(f"wrote {count} {fmt} record(s) to {output}")
    if count == 0:
        typer.echo("note: nothing to export yet (SFT needs 👍 or a better answer; DPO needs 👎 with a better answer)", err=True)
    if push_to_hub:
        url = push_feedback_to_hub(output, push_to_hub, private=private)
        typer.echo(f"pushed to {url}")

