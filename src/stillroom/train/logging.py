"""Where a run's numbers go: one JSON line per record in metrics.jsonl, and TensorBoard if installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stillroom.io import atomic_write_text


class MetricsLog:
    """Appends records to `<run>/metrics.jsonl` and mirrors numeric fields to TensorBoard.

    Without a run folder it only keeps the records in memory.
    """

    def __init__(self, run_dir: Path | None, history: list[dict[str, Any]] | None = None) -> None:
        self.records: list[dict[str, Any]] = list(history or [])
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir else None
        self.writer = None
        if self.path is not None:
            # rewrite from the restored history: a resumed run must not repeat lost epochs' lines
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
            self.writer = _tensorboard_writer(Path(run_dir) / "tensorboard")

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("epoch", "step"):
                    self.writer.add_scalar(key, value, record.get("step", 0))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(folder: Path):  # -> SummaryWriter | None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(folder))
