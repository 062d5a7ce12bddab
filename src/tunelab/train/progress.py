"""What a run reports while it trains: metrics.jsonl (+ TensorBoard) and the terminal progress bar."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.io import atomic_write


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
        info = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tok_per_s']:.0f} tok/s MFU {100 * record['mfu']:.0f}%"
        self.bar.update(self.task, completed=step, info=info)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
