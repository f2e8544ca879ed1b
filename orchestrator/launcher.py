"""``rl``: parse the config, check inputs, plan placement, start the orchestrator actor and wait.

All checks that can fail on a user's mistake run here, before Ray or any engine starts.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from shared.config import Config, ConfigError, to_toml
from shared.metrics import read_metrics


def preflight(cfg: Config) -> dict[str, str]:
    """Validate what the config points at; returns the resolved model directories."""
    from shared import models

    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir: {out} is not writable ({e.strerror or e})") from None
    wanted = cfg.inference.gpu_ids + cfg.teacher.gpu_ids + cfg.trainer.gpu_ids
    if wanted:
        import torch

        have = torch.cuda.device_count()
        if max(wanted) >= have:
            raise ConfigError(f"gpu ids {sorted(wanted)} requested but this machine has {have} CUDA device(s)")
    if cfg.orchestrator.dataset.path:
        from orchestrator.data import load_jsonl

        load_jsonl(cfg.orchestrator.dataset.path, cfg.orchestrator.dataset.on_bad_row)
    from orchestrator import environments

    if cfg.orchestrator.environment not in environments.REGISTRY:
        environments.make(cfg)  # raises the ConfigError naming the key
    student = models.resolve(cfg.model.name, "model.name")
    teacher = models.resolve(cfg.teacher.name, "teacher.name")
    models.check_same_vocab(student, teacher)
    return {"student": str(student), "teacher": str(teacher)}


def launch(cfg: Config, progress: bool = True) -> dict[str, Any]:
    paths = preflight(cfg)
    out = Path(cfg.output_dir)
    (out / "config.toml").write_text(to_toml(cfg))
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()  # a fresh run (resume keeps its own history)

    from shared.runtime import first_line, ray_env_defaults

    ray_env_defaults()
    import ray

    from orchestrator.orchestrator import Orchestrator, RoleFailure

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", configure_logging=True)
    try:
        orch = ray.remote(Orchestrator).options(num_cpus=0, max_concurrency=1).remote(
            msgspec.json.encode(cfg), paths
        )
        ref = orch.run.remote()
        bar = _Progress(cfg.max_steps, metrics_path) if progress else None
        while True:
            done, _ = ray.wait([ref], timeout=0.5)
            if bar:
                bar.update()
            if done:
                break
        try:
            summary = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, RoleFailure):
                raise cause from None
            if isinstance(cause, ConfigError):
                raise cause from None
            raise RoleFailure("orchestrator", first_line(e)) from None
        except Exception as e:  # actor death, or an error Ray could not carry back intact
            raise RoleFailure("orchestrator", first_line(e)) from None
        finally:
            if bar:
                bar.close()
        from orchestrator.report import write_report

        summary["report"] = str(write_report(out, summary, to_toml(cfg)))
        return summary
    finally:
        ray.shutdown()


class _Progress:
    """A console bar fed from metrics.jsonl: step, teacher_kl, step time."""

    def __init__(self, total: int, path: Path):
        from tqdm import tqdm

        self.path = path
        self.bar = tqdm(total=total, desc="starting roles", unit="step", file=sys.stderr, dynamic_ncols=True)
        self.seen = 0

    def update(self) -> None:
        rows = [r for r in read_metrics(self.path) if "teacher_kl" in r] if self.path.exists() else []
        if len(rows) > self.seen:
            last = rows[-1]
            self.bar.set_description("training")
            kl = last.get("teacher_kl")
            self.bar.set_postfix(teacher_kl="-" if kl is None else f"{kl:.3f}", step_s=f"{last['time/step']:.1f}")
            self.bar.update(len(rows) - self.seen)
            self.seen = len(rows)

    def close(self) -> None:
        self.bar.close()
