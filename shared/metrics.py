"""Metrics sinks: ``<output_dir>/metrics.jsonl`` (one JSON object per line, flushed) and W&B.

``metrics.jsonl`` is append-only; a crash can leave a torn last line, which :func:`read_metrics`
skips (and a new logger first ends with a newline, so the next row starts on its own line).
W&B gets the run config with every secret redacted (``shared.redact``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from shared.redact import redact_config


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; null marks a value that was not finite
    return v


def _ends_torn(path: Path) -> bool:
    """Whether ``path`` exists and its last line has no newline (a row cut short by a crash)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


class MetricsLogger:
    def __init__(self, output_dir: str, wandb_cfg: dict, run_config: dict, experiment: str):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = _ends_torn(self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        if torn:  # a crash mid-row: end that line, so the next row parses on its own
            self.file.write("\n")
        self.run = None
        if wandb_cfg["mode"] != "disabled":
            import wandb

            mode = wandb_cfg["mode"]
            if mode == "online" and not os.environ.get("WANDB_API_KEY"):
                mode = "offline"
            self.run = wandb.init(
                project=wandb_cfg["project"],
                name=wandb_cfg["name"] or Path(output_dir).name,
                group=wandb_cfg["group"] or experiment,
                config=redact_config(run_config),
                dir=str(Path(output_dir)),
                mode=mode,
                reinit="finish_previous",
            )

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.run is not None:
            step = row.get("step")
            self.run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line that is not a JSON object (a row torn by a crash, or being
    written right now) is skipped."""
    rows = []
    p = Path(path)
    if p.exists():
        for line in p.read_text(encoding="utf-8", errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


class TrainingStopped(RuntimeError):
    """Too many bad steps in a row: the run stops; the message is one line (survives Ray's pickling)."""


class BadSteps:
    """Counts consecutive bad training steps (skipped by the trainer, or with a non-finite loss or
    gradient norm) and raises :class:`TrainingStopped` at ``limit`` in a row (0 = never)."""

    KEYS = ("loss/policy", "grad_norm")

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.last_good = 0

    @classmethod
    def is_bad(cls, row: dict[str, Any]) -> bool:
        if row.get("skipped_step"):
            return True
        return any(isinstance(row.get(k), float) and not math.isfinite(row[k]) for k in cls.KEYS)

    def update(self, row: dict[str, Any]) -> None:
        if not self.is_bad(row):
            self.in_a_row, self.last_good = 0, row["step"]
            return
        self.in_a_row += 1
        if self.limit and self.in_a_row >= self.limit:
            good = (f"broadcast/step_{self.last_good} is the last good adapter (later steps left it unchanged)"
                    if self.last_good else "no step has updated the student yet")
            raise TrainingStopped(
                f"steps {row['step'] - self.in_a_row + 1}-{row['step']}: {self.in_a_row} training steps in a row were "
                f"skipped (non-finite loss or gradient norm, or no usable samples; trainer.max_bad_steps = "
                f"{self.limit}); {good}"
            )
