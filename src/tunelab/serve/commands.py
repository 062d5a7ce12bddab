"""`tunelab serve` and `tunelab feedback export` (registered by tunelab.cli)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

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
        Path | None,
        typer.Argument(
            help="A .gguf file (llama.cpp, best on CPU), a run folder, a merged folder, or a serve folder whose "
            "current.json (written by `tunelab promote`) names the model. "
            "With --backend-url: the remote model's name (default: the first it lists)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind. Keep 127.0.0.1 unless you add --auth.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="TCP port (default 7860; 8000 with --api).")] = None,
    feedback_db: Annotated[Path, typer.Option(help="SQLite file that stores feedback.")] = Path("feedback.db"),
    auth: Annotated[
        str | None,
        typer.Option(envvar="TUNELAB_AUTH", help="USER:PASS required to open the app (or env TUNELAB_AUTH)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="llama.cpp / torch threads (default: all cores).")] = None,
    share: Annotated[bool, typer.Option(help="Also create a public gradio.live link.")] = False,
    candidate: Annotated[
        Path | None,
        typer.Option(
            help="A second model (same kinds as MODEL) for side-by-side picks against MODEL. Two run folders "
            "exported with --adapter-gguf from one base share one llama-server: the base once, adapters per request."
        ),
    ] = None,
    side_by_side: Annotated[
        bool, typer.Option("--side-by-side", help="Start the chat in side-by-side mode (two answers, pick the better).")
    ] = False,
    api: Annotated[
        bool, typer.Option(help="Serve an OpenAI-compatible API (/v1/chat/completions) instead of the app.")
    ] = False,
    backend_url: Annotated[
        str | None,
        typer.Option(help="Let the app use a remote OpenAI-compatible server (e.g. http://host:8000/v1)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TUNELAB_API_KEY",
            help="With --api: the key clients must send; with --backend-url: the key "
            "sent to the server (or env TUNELAB_API_KEY).",
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="For a .gguf: llama-server (llama.cpp's batching server, built by `make install`), "
            "llama-cpp-python (one request at a time), or auto (llama-server when built)."
        ),
    ] = "auto",
    parallel: Annotated[
        int | None,
        typer.Option(help="llama-server slots: requests decoded together (default: 4 per core, at most 16)."),
    ] = None,
) -> None:
    """Serve the Chat + Travel Planner app with feedback collection (or, with --api, an OpenAI-compatible API)."""
    from tunelab.models.inference import load_backend
    from tunelab.serve.app import LOOPBACK_HOSTS, build_app, launch
    from tunelab.serve.fingerprint import model_fingerprint
    from tunelab.serve.llama_server import LlamaServer, LlamaServerBackend, adapter_backends, server_for
    from tunelab.serve.pointer import resolve_model

    credentials = parse_auth(auth)
    port = port if port is not None else (8000 if api else 7860)
    if not 1 <= port <= 65535:
        raise UserError(f"--port: must be 1..65535 (got {port})")
    if api and backend_url:
        raise UserError("--api and --backend-url: pick one (serve a model's API, or run the app on a remote one)")
    if backend_url is None and (model is None or not model.exists()):
        raise UserError(f"{model}: model not found (give a .gguf file, a run folder or a merged folder)")
    if backend_url is None:
        model = resolve_model(model)  # a serve folder -> the model its current.json names
    if parallel is not None and parallel < 1:
        raise UserError(f"--parallel: must be >= 1 (got {parallel})")
    binary = server_for(engine) if backend_url is None and model.suffix == ".gguf" else None
    if api and binary is not None:
        if credentials or share:
            raise UserError("--api: protect the API with --api-key (--auth and --share are for the app)")
        if host not in LOOPBACK_HOSTS and api_key is None:
            typer.echo(f"warning: the API is reachable beyond this machine ({host}) without --api-key.", err=True)
        server = LlamaServer(binary, model, parallel=parallel, threads=threads, host=host, port=port, api_key=api_key)
        with server:
            typer.echo(
                f"OpenAI-compatible API on {server.url} (llama-server, {server.parallel} slots; model: {model.name})"
            )
            raise typer.Exit(server.wait())
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
    if candidate is not None and not candidate.exists():
        raise UserError(f"--candidate {candidate}: model not found")
    with contextlib.ExitStack() as servers:  # llama-server children stop with the app, or on any error

        def gguf_backend(path: Path):
            """A .gguf behind a llama-server child (stopped when the app stops), or in-process otherwise."""
            if binary is None or path.suffix != ".gguf":
                return load_backend(path, threads=threads)
            server = servers.enter_context(LlamaServer(binary, path, parallel=parallel, threads=threads))
            return LlamaServerBackend(server.url, slots=server.parallel, model=path.resolve().name)

        second_path = resolve_model(candidate) if candidate is not None else None
        # Two run folders exported from one base: one llama-server holds the base once, adapters chosen per request
        pair = None
        if backend_url is None and second_path is not None:
            pair = adapter_backends(servers, [model, second_path], engine, parallel=parallel, threads=threads)
        if backend_url:
            from tunelab.models.openai_backend import OpenAIBackend

            backend, model_hash = OpenAIBackend(backend_url, api_key=api_key, model=str(model) if model else None), None
        else:
            backend, model_hash = (pair[0] if pair else gguf_backend(model)), model_fingerprint(model)
        second = None if second_path is None else pair[1] if pair else gguf_backend(second_path)
        demo = build_app(
            backend, feedback_db, share_feedback_data=credentials is not None or not exposed,
            model_hash=model_hash, side_by_side=side_by_side,
            candidate=second, candidate_hash=model_fingerprint(second_path) if second_path is not None else None,
        )  # fmt: skip
        typer.echo(f"model: {backend.model_id} ({backend.kind}); feedback database: {feedback_db.resolve()}")
        if second is not None:
            typer.echo(f"candidate: {second.model_id} ({second.kind}) for side-by-side picks")
        launch(demo, host=host, port=port, auth=credentials, share=share)


def feedback_export_cmd(
    db: Annotated[Path, typer.Argument(help="The feedback SQLite file written by `tunelab serve`.")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="sft | dpo (corrections + side-by-side picks) | kto (thumbs) | jsonl (raw rows) | "
            "evalset (freeze a held-out regression set of prompts next to the DB)",
        ),
    ] = "sft",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output .jsonl (default: <db>.<format>.jsonl); for evalset: a folder (default: the DB's).",
        ),
    ] = None,
    max_prompts: Annotated[int, typer.Option(help="evalset: at most this many prompts.")] = 100,
    min_rating: Annotated[
        int | None, typer.Option(help="Keep rows rated at least this (1 = thumbs-up only, -1 = all).")
    ] = None,
    push_to_hub: Annotated[
        str | None, typer.Option(help="Also upload the file to this Hugging Face dataset repo (user/name).")
    ] = None,
    private: Annotated[bool, typer.Option(help="With --push-to-hub: create the dataset repo as private.")] = True,
) -> None:
    """Turn feedback into a dataset: SFT conversations, DPO pairs, KTO thumbs, raw JSONL, or a frozen regression set.

    Training formats (sft/dpo/kto) leave out every prompt of a regression set (evalset-*.jsonl) next to the DB."""
    from tunelab.hub import check_repo_id, push_feedback_to_hub
    from tunelab.serve.evalset import export_evalset
    from tunelab.serve.feedback_export import EXPORT_FORMATS, export_feedback

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format: choose one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")
    if push_to_hub is not None:
        check_repo_id(push_to_hub, "dataset repo")
    if min_rating is not None and min_rating not in (-1, 1):
        raise UserError(f"--min-rating: ratings are -1 (👎) or 1 (👍) (got {min_rating})")
    if fmt == "evalset":
        if min_rating is not None:
            raise UserError("--min-rating: not used with --format evalset (it takes 👎 and corrected prompts first)")
        if output is not None and output.suffix:
            raise UserError(
                f"--output {output}: with --format evalset give a folder (the file is named by its version)"
            )
        output = export_evalset(db, output, max_prompts=max_prompts)
        count = sum(1 for line in output.read_text(encoding="utf-8").splitlines() if line.strip()) - 1
        typer.echo(f"froze {count} prompt(s) into {output} (held out from sft/dpo/kto exports of {db.name})")
    else:
        output = output or db.with_name(f"{db.stem}.{fmt}.jsonl")
        count = export_feedback(
            db, output, fmt, min_rating=min_rating, log=lambda text: typer.echo(f"note: {text}", err=True)
        )
        typer.echo(f"wrote {count} {fmt} record(s) to {output}")
    if count == 0:
        typer.echo(
            "note: nothing to export yet (SFT needs 👍 or a better answer; DPO needs 👎 with a better answer or a "
            "side-by-side pick; KTO needs 👍/👎)",
            err=True,
        )
    if push_to_hub:
        url = push_feedback_to_hub(output, push_to_hub, private=private)
        typer.echo(f"pushed to {url}")
