"""bench/machine.py: every benchmark result says how it was run, where and when."""

from __future__ import annotations

import datetime
import os
import sys

from tunelab.bench.machine import command_line, machine_info, machine_line, run_header
from tunelab.hardware import cpu_model


def test_run_header_names_the_command_the_cpu_and_the_date(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tunelab", "bench", "infer", "model file.gguf"])
    assert command_line() == "tunelab bench infer 'model file.gguf'"
    header = run_header(threads=3)
    assert header["command"] == "tunelab bench infer 'model file.gguf'"
    assert header["machine"].startswith(cpu_model()) and ", 3 threads," in header["machine"]
    assert header["machine_info"]["cpu"] == cpu_model() and header["machine_info"]["torch"]
    assert datetime.datetime.fromisoformat(header["date"]).tzinfo is not None  # a local time that names its zone
    assert run_header("tunelab bench data --scales 1")["command"] == "tunelab bench data --scales 1"


def test_the_machine_line_says_when_the_run_could_use_fewer_cores_than_the_machine_has():
    info = machine_info()
    assert info["usable_cores"] == len(os.sched_getaffinity(0))
    pinned = {**info, "cores": 4, "usable_cores": 1}  # `taskset -c 0` on a 4-core machine
    assert "4 logical CPUs, 1 usable (" in machine_line(pinned)
    whole = {**info, "cores": 4, "usable_cores": 4}
    assert "4 logical CPUs (" in machine_line(whole) and "usable" not in machine_line(whole)
