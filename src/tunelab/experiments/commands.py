"""Placeholder: the owning stage replaces these with real commands."""

from tunelab.errors import UserError


def bench_train_cmd() -> None:
    """Not built yet."""
    raise UserError("this command is not built yet")


def sweep_cmd() -> None:
    """Not built yet."""
    raise UserError("this command is not built yet")
