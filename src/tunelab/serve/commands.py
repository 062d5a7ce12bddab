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
    model: Annotated[Path, typer.Argument(help="A .gguf file (llama.cpp, best on CPU), a run folder or a merged folder.")],
    host: Annotated[str, typer.Option(help="Interface to bind. Keep 127.0.0.1 unless you add --auth.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 7860,
    feedback_db: Annotated[Path, typer.Option(help="SQLite file that stores feedback.")] = Path("feedback.db"),
    auth: Annotated[
        Optional[str],
        typer.Option(envvar="TUNELAB_AUTH", help="USER:PASS required to open the app (or env TUNELAB_AUTH)."),
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="llama.cpp / torch threads (default: all cores).")] = None,
    share: Annotated[bool, typer.Option(help="Also create a public gradio.live link.")] = False,
) -> None:
    """Serve the Chat + Travel Planner app with feedback collection."""
    from tunelab.serve.app import LOOPBACK_HOSTS, build_app, launch
    from tunelab.models.inference import load_backend

    credentials = parse_auth(auth)
    if not model.exists():
        raise UserError(f"{model}: model not found (give a .gguf file, a run folder or a merged folder)")
    if not 1 <= port <= 65535:
        raise UserError(f"--port: must be 1..65535 (got {port})")
    exposed = host not in LOOPBACK_HOSTS or share
    if exposed and credentials is None:
        typer.echo(
            f"warning: the app is reachable beyond this machine ({'share link' if share else host}) without --auth; "
            "other users' feedback (recent items, downloads) is hidden.",
            err=True,
        )
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

