"""The Hugging Face Hub, for export and serve: push an export (one commit) or list it with --dry-run, upload a
feedback file to a dataset repo, and the one repo-id check.

The token comes only from huggingface_hub itself (HF_TOKEN, or the user's `hf auth login`); tunelab never
reads it into anything it writes.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tunelab.errors import UserError


def check_repo_id(repo_id: str, kind: str = "repo") -> str:
    """`user/name` or a one-line UserError naming the option; the one repo-id check for export and serve."""
    if repo_id.count("/") != 1:
        raise UserError(f"--push-to-hub: expected a {kind} id like user/name (got {repo_id!r})")
    return repo_id


def upload_plan(run_dir: Path, export_dir: Path) -> list[tuple[Path, str]]:
    """(local file, path in repo): merged model + card at the root, adapter/ and the GGUF files."""
    plan: list[tuple[Path, str]] = []
    merged = export_dir / "merged"
    for f in sorted(merged.rglob("*")):
        if f.is_file():
            plan.append((f, f.relative_to(merged).as_posix()))
    for f in sorted((run_dir / "adapter").rglob("*")):
        if f.is_file():
            plan.append((f, "adapter/" + f.relative_to(run_dir / "adapter").as_posix()))
    for f in sorted(export_dir.glob("model-*.gguf")):
        plan.append((f, f.name))
    if (export_dir / "parity.json").is_file():
        plan.append((export_dir / "parity.json", "parity.json"))
    return plan


def format_plan(repo_id: str, plan: list[tuple[Path, str]], private: bool) -> str:
    total = sum(local.stat().st_size for local, _ in plan)
    lines = [
        f"would upload to https://huggingface.co/{repo_id} ({'private' if private else 'public'} model repo), "
        f"{len(plan)} files, {total / 2**20:.1f} MiB:"
    ]
    lines += [f"  {remote:<40} {local.stat().st_size / 2**20:9.2f} MiB  <- {local}" for local, remote in plan]
    return "\n".join(lines)


def check_hub_reachable(timeout: float = 3.0) -> None:
    """One quick connection attempt, so an offline push fails with one line instead of stacked retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError("--push-to-hub: HF_HUB_OFFLINE=1 is set; unset it to upload")
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
    except OSError:
        raise UserError(f"--push-to-hub: cannot reach {host} (no network?); nothing was uploaded") from None


def push_to_hub(
    repo_id: str, plan: list[tuple[Path, str]], private: bool, repo_type: str = "model", message: str = "tunelab export"
) -> str:
    """Create the repo if needed and upload `plan` ((local file, path in repo) pairs) as one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if get_token() is None:
        raise UserError("--push-to-hub: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    check_hub_reachable()
    api = HfApi()  # picks the token up itself; we never hold it
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=remote, path_or_fileobj=str(local)) for local, remote in plan]
        api.create_commit(repo_id, operations=operations, repo_type=repo_type, commit_message=message)
    except HfHubHTTPError as exc:
        raise UserError(f"--push-to-hub {repo_id}: {str(exc).splitlines()[0]}") from None
    except (OSError, ConnectionError) as exc:
        raise UserError(
            f"--push-to-hub {repo_id}: network error ({type(exc).__name__}); nothing was uploaded"
        ) from None
    return str(url)


def push_feedback_to_hub(path: Path, repo_id: str, private: bool = True) -> str:
    """Upload an exported feedback file to a Hub *dataset* repo (a Space's disk is not durable; the Hub is).

    Same token rules as an export push (HF_TOKEN or `hf auth login`, never stored by us), same offline check
    and one-line errors.
    """
    check_repo_id(repo_id, "dataset repo")
    plan = [(Path(path), Path(path).name)]
    return push_to_hub(repo_id, plan, private, repo_type="dataset", message="tunelab feedback export")
