"""The runner and the two renderings: a check that raises is that check's failure; the JSON is the table's report."""

from __future__ import annotations

import json

from tunelab.doctor.report import FAIL, PASS, WARN, Check, render_report, run_checks, write_json
from tunelab.errors import UserError


def broken_check():
    raise KeyError("tokenizer.chat_template")


def user_error_check():
    raise UserError("model.name: folder not found: /x")


def test_a_raising_check_fails_alone_and_the_others_still_run(tmp_path):
    from rich.console import Console

    report = run_checks(
        "cfg.yaml",
        "before training",
        [
            ("good", lambda: Check("ignored", PASS, "fine")),
            ("crashes", broken_check),
            ("user error", user_error_check),
            ("warns", lambda: Check("warns", WARN, "hmm", "look")),
        ],
    )
    statuses = [(c.name, c.status) for c in report.checks]
    assert statuses == [("good", PASS), ("crashes", FAIL), ("user error", FAIL), ("warns", WARN)]
    assert "KeyError: 'tokenizer.chat_template' (test_doctor_report.py:" in report.checks[1].evidence
    assert report.checks[2].evidence == "model.name: folder not found: /x"
    assert report.exit_code == 2 and [c.name for c in report.failed] == ["crashes", "user error"]

    write_json(report, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == report.to_json()
    assert report.to_json()["counts"] == {"pass": 1, "warn": 1, "fail": 2, "skip": 0}
    console = Console(width=200, record=True)
    render_report(report, console)
    text = console.export_text()
    assert "FAIL" in text and "crashes" in text and "failed crashes, user error" in text


def test_exit_code_is_0_without_a_failure():
    report = run_checks("run", "after training", [("w", lambda: Check("w", WARN, "e"))])
    assert report.exit_code == 0
