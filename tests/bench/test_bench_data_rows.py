"""`tunelab bench data --rows`: its process measurement (wall seconds, the measured command's own peak RSS) and its
options. The whole command runs in tests/bench/test_bench_cli.py."""

from __future__ import annotations

import sys

import pytest

from tunelab.bench.commands import bench_data_cmd
from tunelab.bench.data import measured
from tunelab.errors import UserError

MIB = 2**20


def test_peak_rss_is_the_commands_own_not_the_bench_process(tmp_path):
    """A child's ru_maxrss starts at its parent's peak RSS; the bench process is large, its commands may be smaller."""
    ballast = b"\x01" * (384 * MIB)  # this process's peak RSS is now above 384 MiB
    small = measured([sys.executable, "-S", "-c", "pass"], tmp_path / "small.log", rows=10)
    big = measured([sys.executable, "-S", "-c", f"x = b'1' * {192 * MIB}"], tmp_path / "big.log")
    assert len(ballast) == 384 * MIB
    assert small["peak_rss_mib"] < 64  # a bare interpreter
    assert 192 < big["peak_rss_mib"] < 320  # the interpreter and its 192 MiB string
    assert small["wall_s"] > 0 and small["rows_per_s"] > 0


def test_a_failing_command_names_its_log(tmp_path):
    log = tmp_path / "fails.log"
    with pytest.raises(RuntimeError, match="fails.log"):
        measured([sys.executable, "-S", "-c", "import sys; print('why'); sys.exit(3)"], log)
    assert log.read_text().strip() == "why"


@pytest.mark.parametrize("formats", ["csv", "jsonl,csv", ","])
def test_unknown_formats_are_a_user_error_before_any_work(tmp_path, formats):
    with pytest.raises(UserError, match=f"--formats {formats}: expected one or both of jsonl, parquet"):
        bench_data_cmd(rows="100", out=tmp_path / "work", formats=formats)
    assert not (tmp_path / "work").exists()
