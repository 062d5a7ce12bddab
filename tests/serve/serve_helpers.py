"""Kept only for tests/serve/test_serve_browser.py (owned elsewhere), which imports `serve_helpers`: the
helpers themselves live in tests/helpers.py. Delete this file once that test imports from tests.helpers."""

from tests.helpers import ARTIFACTS, db_rows, embedded_gguf, serve_process  # noqa: F401
