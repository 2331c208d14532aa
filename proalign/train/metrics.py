"""Training metrics: one JSON row per logged step in `<run>/metrics.jsonl`, and TensorBoard."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLog:
    """`metrics.jsonl` (one row per logged step of each stage) and TensorBoard. A run starting at
    `start_step` (0: fresh; a resume: its checkpoint's step) first drops this stage's rows after
    that step, which it is about to log again: one row per step after any kills and resumes."""

    def __init__(self, run_dir: Path, enabled: bool, stage: str, start_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.stage = stage
        self.tb = None
        if enabled:
            from ..storage import check_folder, check_target
            check_target(self.path)
            check_folder(run_dir / "tensorboard")
            check_folder(run_dir / "tensorboard" / stage)
        if enabled and self.path.exists():
            self._drop_rows_after(start_step)
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard" / stage))
            except ImportError:  # tensorboard is optional
                log.warning("tensorboard not installed: TensorBoard events are not written")

    def _drop_rows_after(self, step: int) -> None:
        from ..storage import atomic_write_text
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)

        def replayed(line: str) -> bool:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return False  # not ours to judge: kept as it is
            return isinstance(row, dict) and row.get("stage") == self.stage and row.get("step", 0) > step
        kept = [line for line in lines if not replayed(line)]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(kept))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "time": time.time(), **metrics}
        from ..storage import append_text
        append_text(self.path, json.dumps(row) + "\n")
        if self.tb:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{self.stage}/{key}", value, step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
