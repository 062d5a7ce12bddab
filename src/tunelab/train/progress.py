"""What a run reports while it trains: metrics.jsonl (+ TensorBoard), throughput and MFU, the terminal progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tunelab.io import atomic_write
from tunelab.train.flops import ModelShape, mfu, shape_of


class MetricsLog:
    """metrics.jsonl (one line per event, flushed) + TensorBoard. On resume, lines past the checkpoint go."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self._truncate_after(resume_step)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
            self.file = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by a crash
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


class ThroughputMeter:
    """Tokens per second and model FLOP utilisation (MFU: the objective's FLOP count of each step, see flops.py,
    against the measured matmul peak of all processes) per logging window and for this session's steps."""

    def __init__(self, shape: ModelShape, matmul_peak_gflops: float, processes: int = 1) -> None:
        self.shape = shape
        self.matmul_peak_gflops = matmul_peak_gflops  # per process
        self.peak_flops = matmul_peak_gflops * 1e9 * processes
        self.session_flops, self.session_seconds, self.step_seconds = 0.0, 0.0, 0.0
        self._window_tokens, self._window_flops, self._window_start = 0, 0.0, None
        self._step_start = 0.0

    @classmethod
    def for_model(cls, model, precision, device: torch.device, processes: int) -> ThroughputMeter:
        """The meter of `model`'s shape against this machine's matmul peak in the training precision (measured once
        per machine, dtype and threads, then cached: see matmul_peak.py)."""
        from tunelab.train.matmul_peak import matmul_peak

        peak = matmul_peak(precision.dtype, torch.get_num_threads(), device=device)["gflops"]
        return cls(shape_of(model), peak, processes)

    def start_step(self) -> None:
        self._step_start = time.perf_counter()
        if self._window_start is None:
            self._window_start = self._step_start

    def end_step(self, tokens: int, flops: float) -> float:
        """Count a finished step; returns its seconds."""
        self.step_seconds = time.perf_counter() - self._step_start
        self._window_tokens += tokens
        self._window_flops += flops
        self.session_flops += flops
        self.session_seconds += self.step_seconds
        return self.step_seconds

    def window(self) -> dict[str, float]:
        """tok_per_s and mfu since the last window (or the first step), step_s of the last step; opens the next
        window."""
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        figures = {
            "tok_per_s": self._window_tokens / seconds,
            "step_s": self.step_seconds,
            "mfu": mfu(self._window_flops, seconds, self.peak_flops),
        }
        self._window_tokens, self._window_flops, self._window_start = 0, 0.0, time.perf_counter()
        return figures

    def session_mfu(self) -> float | None:
        return mfu(self.session_flops, self.session_seconds, self.peak_flops) if self.session_seconds else None


class ProgressBar:
    """A rich progress bar with loss, lr, tokens/s and ETA; `progress(step, record)` updates it."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=self.total, info="")
        return self.update

    def update(self, step: int, record: dict) -> None:
        info = (
            f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tok_per_s']:.0f} tok/s "
            f"MFU {100 * record['mfu']:.0f}%"
        )
        self.bar.update(self.task, completed=step, info=info)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
