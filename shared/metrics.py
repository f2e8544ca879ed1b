"""Metrics sinks: ``<output_dir>/metrics.jsonl`` (one JSON object per line, flushed) and W&B."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; null marks a value that was not finite
    return v


class MetricsLogger:
    def __init__(self, output_dir: str, wandb_cfg: dict, run_config: dict, experiment: str):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
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
                config=run_config,
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
    rows = []
    p = Path(path)
    if p.exists():
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows
