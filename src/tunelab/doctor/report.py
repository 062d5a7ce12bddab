"""The doctor's result record, its one runner and its two renderings (a rich table and JSON).

A check is a small named function returning a `Check`: pass, warn or fail (or skip, where it does not apply),
one line of evidence and what to do. `run_checks` runs a list of them in order; a check that raises becomes a
failed row naming the error, so one broken check never hides the others.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.io import atomic_write

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
STATUS_STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


@dataclass
class Check:
    name: str
    status: str  # PASS | WARN | FAIL | SKIP
    evidence: str  # one line: what was measured
    advice: str = ""  # what to do (empty when nothing needs doing)
    seconds: float = 0.0


@dataclass
class Report:
    target: str
    stage: str  # "before training" | "after training"
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else 0

    def to_json(self) -> dict:
        counts = {s: sum(c.status == s for c in self.checks) for s in (PASS, WARN, FAIL, SKIP)}
        return {
            "target": self.target,
            "stage": self.stage,
            "counts": counts,
            "checks": [asdict(c) for c in self.checks],
        }


CheckFn = Callable[[], Check]


def run_checks(target: str, stage: str, checks: list[tuple[str, CheckFn]]) -> Report:
    """Run every (name, check) in order and time it; an exception is that check's failure, not the report's."""
    results = []
    for name, check in checks:
        started = time.perf_counter()
        try:
            result = check()
        except UserError as exc:
            result = Check(name, FAIL, str(exc), "fix what the message names, then run the doctor again")
        except Exception as exc:  # noqa: BLE001 - the report names it; the other checks still run
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            where = traceback.extract_tb(exc.__traceback__)[-1]
            result = Check(
                name,
                FAIL,
                f"the check could not run: {type(exc).__name__}: {first} ({Path(where.filename).name}:{where.lineno})",
                "an input this check does not handle: report it with this line",
            )
        result.name = name
        result.seconds = round(time.perf_counter() - started, 3)
        results.append(result)
    return Report(target, stage, results)


def render_report(report: Report, console=None) -> None:
    """The table: one row per check (status, name, evidence, what to do), then one summary line."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)  # a log file gets the full lines
    table = Table(title=f"tunelab doctor: {report.target} ({report.stage})", show_lines=False)
    table.add_column("status", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("evidence", overflow="fold")
    table.add_column("what to do", overflow="fold")
    for c in report.checks:
        table.add_row(f"[{STATUS_STYLE[c.status]}]{c.status.upper()}[/]", c.name, c.evidence, c.advice)
    console.print(table)
    counts = report.to_json()["counts"]
    console.print(
        f"{counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail, {counts[SKIP]} skip"
        + (f": failed {', '.join(c.name for c in report.failed)}" if report.failed else "")
    )


def write_json(report: Report, path: Path) -> None:
    atomic_write(Path(path), json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
