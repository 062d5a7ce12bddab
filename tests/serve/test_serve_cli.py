"""`tunelab serve` option handling (model loading and the server itself are replaced by fakes: fast)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import tunelab.models.inference as inference_module
import tunelab.serve.app as app_module
from tests.helpers import ScriptedBackend
from tunelab.cli import app as cli_app
from tunelab.errors import UserError


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """Calls `tunelab serve` with fakes; returns what launch() and build_app() were given."""
    seen: dict = {}
    real_build = app_module.build_app

    def fake_build(backend, feedback_db, **kwargs):
        seen["build"] = kwargs
        seen["db"] = feedback_db
        return real_build(backend, feedback_db, **kwargs)

    monkeypatch.setattr(
        inference_module, "load_backend", lambda path, threads=None: ScriptedBackend(model_id=path.name)
    )
    monkeypatch.setattr(app_module, "build_app", fake_build)
    monkeypatch.setattr(app_module, "launch", lambda demo, **kw: seen.update(launch=kw))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")

    def run(*args: str, env: dict | None = None):
        # --engine llama-cpp-python: the in-process backend these fakes replace (no llama-server child)
        cmd = ["serve", str(model), "--feedback-db", str(tmp_path / "fb.db"), "--engine", "llama-cpp-python", *args]
        result = CliRunner().invoke(cli_app, cmd, env=env)
        return result, seen

    return run


def test_defaults_are_loopback_no_auth_no_share(launched):
    result, seen = launched()
    assert result.exit_code == 0, result.output
    assert seen["launch"] == {"host": "127.0.0.1", "port": 7860, "auth": None, "share": False}
    assert seen["build"]["share_feedback_data"] is True  # only this machine can reach it


def test_exposed_without_auth_hides_other_peoples_feedback(launched):
    result, seen = launched("--host", "0.0.0.0")
    assert result.exit_code == 0
    assert seen["build"]["share_feedback_data"] is False
    assert "without --auth" in result.output


def test_auth_from_option_or_environment(launched):
    result, seen = launched("--host", "0.0.0.0", "--auth", "ann:pw:with:colons")
    assert seen["launch"]["auth"] == ("ann", "pw:with:colons") and seen["build"]["share_feedback_data"] is True
    result, seen = launched(env={"TUNELAB_AUTH": "bob:secret"})
    assert seen["launch"]["auth"] == ("bob", "secret")


@pytest.mark.parametrize("args, message", [(["--auth", "nopassword"], "USER:PASS"), (["--port", "0"], "--port")])
def test_bad_options_are_user_errors(launched, args, message):
    result, _ = launched(*args)
    assert isinstance(result.exception, UserError) and message in str(result.exception)


def test_missing_model_is_a_user_error(tmp_path):
    result = CliRunner().invoke(cli_app, ["serve", str(tmp_path / "nope.gguf")])
    assert isinstance(result.exception, UserError) and "model not found" in str(result.exception)
