"""Metrics sinks: ``<output_dir>/metrics.jsonl`` (one JSON object per line, flushed) and W&B.

``metrics.jsonl`` is append-only; a crash can leave a torn last line, which :func:`read_metrics`
skips (and a new logger first ends with a newline, so the next row starts on its own line).

W&B: one run per launch, grouped by the experiment's name, with the resolved config (every secret
redacted, ``shared.redact``). Its metric names are namespaced (:func:`wandb_key`: ``train/``, ``eval/``,
``time/``, ``teacher/`` ...) so the workspace groups them into sections; metrics.jsonl keeps the flat keys
that the report, the progress bar and the benchmarks read. ``util/<role>`` (the fraction of the step each
role was busy) is derived for W&B. ``shared/wandb_panels.json`` is the dashboard; :func:`read_wandb_offline`
reads an offline run back without W&B's servers.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
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


# W&B sections: a metric keeps its name when it already starts with one of these; any other is a
# training metric and goes under train/ (teacher_kl is the teacher's view of the student: teacher/kl).
WANDB_SECTIONS = ("train", "eval", "time", "teacher", "judge", "comparator", "continual", "util", "async", "heartbeat")
WANDB_RENAMES = {"teacher_kl": "teacher/kl", "teacher_kl/seq": "teacher/kl_seq", "teacher_kl/topk": "teacher/kl_topk"}
UTIL_ROLES = ("inference", "teacher", "trainer")


def wandb_key(key: str) -> str:
    """The W&B name of a metrics.jsonl key: ``teacher_kl`` -> ``teacher/kl``, ``loss/policy`` ->
    ``train/loss/policy``, ``busy/<role>`` -> ``util/<role>``, ``eval/x/avg`` and ``time/step`` unchanged."""
    if key in WANDB_RENAMES:
        return WANDB_RENAMES[key]
    head, sep, rest = key.partition("/")
    if head == "busy" and sep:  # the pipeline's measured busy fraction of a role: its utilisation
        return f"util/{rest}"
    return key if sep and head in WANDB_SECTIONS else f"train/{key}"


def wandb_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row as W&B gets it: namespaced names, no ``step`` (W&B's own), no nulls, and, for a
    role the row times but whose busy fraction it lacks, ``util/<role>`` = ``time/<role> / time/step``."""
    out = {wandb_key(k): v for k, v in row.items() if k != "step" and v is not None}
    step_s = row.get("time/step")
    if isinstance(step_s, (int, float)) and step_s > 0:
        for role in UTIL_ROLES:
            busy = row.get(f"time/{role}")
            if isinstance(busy, (int, float)) and f"util/{role}" not in out:
                out[f"util/{role}"] = busy / step_s
    return out


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
                job_type=(run_config.get("orchestrator") or {}).get("workflow") or "distill",
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
            self.run.log(wandb_row(row), step=step)

    def reopen(self) -> None:
        """Append to metrics.jsonl again after it was rewritten (a restart cut it back to a checkpoint)."""
        self.file.close()
        self.file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self.file.close()
        if self.run is not None:
            run_dir = Path(self.run.dir).parent  # <output_dir>/wandb/<mode>-run-<time>-<id>
            offline = self.run.settings.mode == "offline"
            self.run.finish()
            self.run = None
            if offline:  # the run file is complete when the run ends (finish() may return before)
                wait_wandb_written(run_dir)


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


def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (W&B's record log: a 7-byte file header, then 32 KiB blocks of
    records, each piece with a 7-byte header; every record a ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # the writer is still at it
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # 1: a whole record; 2/3/4: first/middle/last piece of one
            continue
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
        chunk = b""
    return records


def _run_file(run_dir: str | Path) -> Path:
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no run-*.wandb file")
    return files[0]


def wait_wandb_written(run_dir: str | Path, timeout: float = 15.0) -> bool:
    """Whether the run file in ``run_dir`` holds its exit record, waiting up to ``timeout`` seconds:
    ``run.finish()`` can return before W&B's service has written the file."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(_run_file(run_dir))):
                return True
        except (FileNotFoundError, ValueError):
            pass  # not created, or not even its header written yet
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def read_wandb_offline(run_dir: str | Path) -> dict[str, Any]:
    """What an offline W&B run recorded, read from its ``run-<id>.wandb`` file without W&B's servers.

    Returns ``{"project", "group", "name", "job_type", "config": {...}, "history": [{key: value}, ...]}``;
    ``history`` holds the logged rows in order, each with W&B's ``_step`` (rows of one step are merged)."""
    out: dict[str, Any] = {"config": {}, "history": []}

    def item_key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    for record in _wandb_records(_run_file(run_dir)):
        which = record.WhichOneof("record_type")
        if which == "run":
            run = record.run
            out.update(project=run.project, group=run.run_group, name=run.display_name, job_type=run.job_type)
            out["config"].update({u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"})
        elif which == "config":
            out["config"].update({item_key(u): json.loads(u.value_json) for u in record.config.update})
        elif which == "history":
            out["history"].append({item_key(i): json.loads(i.value_json) for i in record.history.item})
    return out


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
