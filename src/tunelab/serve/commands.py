"""Placeholder: the owning stage replaces these with real commands."""

from tunelab.errors import UserError


def feedback_export_cmd() -> None:
    """Not built yet."""
    raise UserError("this command is not built yet")


def serve_cmd() -> None:
    """Not built yet."""
    raise UserError("this command is not built yet")
