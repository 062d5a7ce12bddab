"""tunelab.hub: the one repo-id check, used by `tunelab export --push-to-hub` and `tunelab feedback export`."""

from __future__ import annotations

import pytest

from tunelab.errors import UserError
from tunelab.hub import check_repo_id, push_feedback_to_hub


def test_repo_id_is_user_slash_name():
    assert check_repo_id("someone/tiny-chat") == "someone/tiny-chat"
    for bad in ("tiny-chat", "a/b/c", ""):
        with pytest.raises(UserError, match="--push-to-hub: expected a repo id like user/name"):
            check_repo_id(bad)


def test_feedback_push_checks_the_id_before_any_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a network attempt would fail with another message
    with pytest.raises(UserError, match="expected a dataset repo id like user/name"):
        push_feedback_to_hub(tmp_path / "feedback.sft.jsonl", "no-slash")
