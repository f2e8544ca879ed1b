"""The Python API: what ``rl`` does, from a script or a notebook (the CLI is a thin layer over it).

    from orchestrator.api import export_student, load_config, run

    cfg = load_config("experiments/reverse_text/rl.toml", {"orchestrator": {"batch_size": 8}},
                      overrides={"trainer.lr": 1e-3}, max_steps=2, output_dir="outputs/api_demo")
    result = run(cfg, export="exported/api_demo")       # trains, writes the report, exports the merged student
    result.metrics["teacher_kl"], result.eval_end, result.adapter, result.report, result.merged_model
    export_student(result.output_dir, "exported/api_demo_adapter", merged=False)

Mistakes raise :class:`shared.config.ConfigError` (one line naming the key, before anything starts); a
role that fails raises ``RoleFailure``; too many bad steps in a row raise ``TrainingStopped``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from orchestrator.export import export_student, latest_adapter
from shared.config import Config, ConfigError, deep_merge, from_dict, load_toml

Source = str | Path | Mapping[str, Any] | Config

__all__ = ["RunResult", "export_student", "load_config", "run"]


@dataclass(frozen=True)
class RunResult:
    """What a finished run left behind."""

    config: Config
    output_dir: Path
    steps: int  # training steps run (fewer than max_steps when a continual gate stopped the run)
    metrics: dict[str, Any]  # the last training step's row of metrics.jsonl
    eval: dict[str, Any]  # the last evaluation row (eval/<env>/avg, ...)
    eval_start: float  # eval/<env>/avg before training
    eval_end: float  # ... and at the end
    adapter: Path | None  # the final LoRA adapter (broadcast/step_N); None if no step trained
    report: Path  # report.md
    merged_model: Path | None  # the exported student (``run(..., export=path)``), else None
    summary: dict[str, Any]  # the orchestrator's summary (wall time, time per role, ...)


def _nested(flat: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"trainer.lr": 1e-3, "orchestrator": {...}}`` → nested dicts (dotted keys split)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: keys must be non-empty strings, got {key!r}")
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is both a value and a table in {where}")
        value = _nested(value, where) if isinstance(value, Mapping) else value
        node[last] = deep_merge(node[last], value) if isinstance(node.get(last), dict) and isinstance(value, dict) \
            else value
    return out


def load_config(*sources: Source, overrides: Mapping[str, Any] | None = None, **keys: Any) -> Config:
    """A validated :class:`Config` from TOML paths, dicts and ``Config`` objects, deep-merged left to
    right, then ``overrides`` (dotted keys allowed: ``{"trainer.lr": 1e-3}``), then keyword arguments
    (top-level keys or whole sections: ``max_steps=2, trainer={"lr": 1e-3}``) — as ``rl @ a.toml --key v``."""
    raw: dict[str, Any] = {}
    for src in sources:
        if isinstance(src, Config):
            part = msgspec.to_builtins(src)
        elif isinstance(src, Mapping):
            part = _nested(src, "load_config")
        elif isinstance(src, (str, Path)):
            part = load_toml(src)
        else:
            raise ConfigError(f"load_config: expected a TOML path, a dict or a Config, got {type(src).__name__}")
        raw = deep_merge(raw, part)
    raw = deep_merge(raw, _nested(overrides or {}, "overrides"))
    return from_dict(deep_merge(raw, _nested(keys, "load_config")))


def run(config: Source, *, export: str | Path | None = None, merged: bool = True, progress: bool = False) -> RunResult:
    """Train ``config`` to the end (Ray starts and stops inside the call) and return a :class:`RunResult`;
    with ``export``, the final student is then written there (merged base + LoRA, or the adapter alone
    with ``merged=False``).  ``progress`` shows the console bar of ``rl``."""
    from shared.runtime import ray_env_defaults

    from orchestrator.launcher import launch, loopback_env_defaults, preflight

    ray_env_defaults()  # before anything imports ray
    loopback_env_defaults()
    cfg = config if isinstance(config, Config) else load_config(config)
    if cfg.dry_run:
        raise ConfigError("dry_run: run() trains; print the plan with shared.placement.describe(plan(cfg)) instead")
    if export is not None and Path(export).exists():  # found out now, not after training
        raise ConfigError(f"{export}: already exists; choose a new export path")
    paths = preflight(cfg)
    summary = launch(cfg, progress=progress, paths=paths)
    return _result(cfg, summary, export, merged)


def _result(cfg: Config, summary: dict[str, Any], export: str | Path | None, merged: bool) -> RunResult:
    from shared.metrics import read_metrics

    out = Path(cfg.output_dir)
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "teacher_kl" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    try:
        adapter = latest_adapter(out)
    except ConfigError:  # every step was skipped: nothing to point at (or export)
        adapter = None
    exported = export_student(out, export, merged=merged) if export is not None else None
    return RunResult(config=cfg, output_dir=out, steps=int(summary["steps"]), metrics=train[-1] if train else {},
                     eval=evals[-1] if evals else {}, eval_start=summary.get("eval_start", math.nan),
                     eval_end=summary.get("eval_end", math.nan),
                     adapter=adapter, report=Path(summary["report"]), merged_model=exported,
                     summary=summary)
