"""Placeholder: the owning stage replaces these with real commands."""

from tunelab.errors import UserError


def bench_infer_cmd() -> None:
    """Not built yet."""
    raise UserError("this command is not built yet")


def chat_cmd() -> None:
    """Not built yet."""
    raise UserError("this command is not built yet")


def export_cmd() -> None:
    """Not built yet."""
    raise UserError("this command is not built yet")
