"""User-facing errors: the CLI prints them as one line and exits with code 2 (traceback only with --debug)."""


class UserError(Exception):
    """Something the user can fix: a bad config key, a missing file, unusable data, no CUDA for 4-bit."""
