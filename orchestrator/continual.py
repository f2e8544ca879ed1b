"""Continual learning without forgetting (``[orchestrator.continual]``; composes with every workflow).

A run trains a new skill (``orchestrator.environment``) while holding on to core behaviours
(``core_environments``, each an environment name):

- **replay**: ``replay_ratio`` of each batch's prompts come from the core environments (round robin),
  the rest from the new skill (:class:`ReplayMix`); each prompt is scored by its own environment;
- **KL to the reference**: ``trainer.loss.ref_kl_coef`` (the trainer's term, set in the TOML);
- **a capability suite** (:class:`CoreSuite`): at the start, every ``eval.interval`` steps and at the end,
  each core environment's held-out score is logged as ``eval/core/<name>/avg`` with
  ``eval/core/<name>/delta_from_start`` (negative = forgetting), next to the new skill's
  ``eval/<env>/avg``;
- **the gate** (``gate``, ``max_regression``): when a core score falls more than ``max_regression`` below
  its start value, the run stops; the inference engines load the last adapter that passed
  (``broadcast/step_0`` is the untouched student, saved at the start), the adapters written after it are
  renamed ``broadcast/rejected_step_N`` (so ``rl export`` takes the restored one), and
  ``final_adapter.json`` records ``{"step", "path", "gate_failed", "failed_step", "regressions"}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from orchestrator.data import Prompt
from shared.config import Config, ConfigError
from shared.fsutil import atomic_write_text

KEY = "orchestrator.continual.core_environments"


def enabled(cfg: Config) -> bool:
    return bool(cfg.orchestrator.continual.core_environments)


def make_core_envs(cfg: Config) -> dict[str, Any]:
    """The core environments by name, built like the main one (a ConfigError naming the key if unknown)."""
    from orchestrator import environments

    out = {}
    for name in cfg.orchestrator.continual.core_environments:
        if name not in environments.REGISTRY:
            raise ConfigError(f"{KEY}: unknown environment {name!r} (known: {', '.join(environments.REGISTRY)})")
        oc = msgspec.structs.replace(cfg.orchestrator, environment=name,
                                     dataset=msgspec.structs.replace(cfg.orchestrator.dataset, path=""))
        try:
            out[name] = environments.make(msgspec.structs.replace(cfg, orchestrator=oc))
        except ConfigError as e:
            raise ConfigError(f"{KEY}: {name}: {e}") from None
    return out


class ReplayMix:
    """Prompts of the new skill mixed with ``round(n * ratio)`` replayed core prompts per batch.

    ``next_prompts(n)``: the new skill's prompts first, then the replayed ones (cores in turn);
    ``score(i, prompt, text)`` scores the batch's ``i``-th prompt with the environment it came from.
    """

    def __init__(self, main: Any, cores: dict[str, Any], ratio: float):
        self.main, self.cores, self.ratio = main, list(cores.values()), ratio
        self.position = 0
        self.turn = 0
        self.batch_envs: list[Any] = []
        self.replayed = 0  # prompts of the last batch that came from a core environment

    @property
    def bad_rows(self) -> int:
        return getattr(self.main, "bad_rows", 0)

    def next_prompts(self, n: int) -> list[Prompt]:
        k = min(n - 1, round(n * self.ratio)) if self.cores else 0
        prompts = list(self.main.next_prompts(n - k))
        envs = [self.main] * len(prompts)
        for _ in range(k):
            env = self.cores[self.turn % len(self.cores)]
            self.turn += 1
            prompts += env.next_prompts(1)
            envs.append(env)
        self.batch_envs, self.replayed = envs, k
        self.position += n
        return prompts

    def score(self, i: int, prompt: Prompt, text: str) -> float:
        return self.batch_envs[i].score(prompt, text)


class CoreSuite:
    """The before/after capability suite over the core environments, and the regression gate."""

    def __init__(self, cfg: Config, cores: dict[str, Any], out: Path):
        self.cc = cfg.orchestrator.continual
        self.cores = cores
        self.out = out
        self.start: dict[str, float] = {}
        self.last_pass_step = 0
        self.regressions: dict[str, float] = {}

    def evaluate(self, evaluate: Callable[[Any], float], step: int, gate: bool = True) -> tuple[dict[str, float], bool]:
        """``(metrics, passed)``: every core score (``evaluate(env)``), its delta from the start, and the gate
        (``gate=False``: scores only, e.g. of the restored adapter)."""
        row: dict[str, float] = {}
        regressions = {}
        for name, env in self.cores.items():
            avg = evaluate(env)
            self.start.setdefault(name, avg)
            delta = avg - self.start[name]
            row[f"eval/core/{name}/avg"] = avg
            row[f"eval/core/{name}/delta_from_start"] = delta
            if -delta > self.cc.max_regression:
                regressions[name] = delta
        if not gate:
            return row, True
        passed = not (self.cc.gate and regressions)
        if passed:
            self.last_pass_step = step
        else:
            self.regressions = regressions
        row["continual/gate_failed"] = float(not passed)
        return row, passed

    def summary(self) -> dict[str, Any]:
        return {"gate_failed": bool(self.regressions), "final_step": self.last_pass_step,
                "regressions": self.regressions, "start": self.start}

    def restore(self, failed_step: int) -> Path:
        """Set the last passing adapter as the run's final one (see the module docstring); its path."""
        broadcast = self.out / "broadcast"
        keep = broadcast / f"step_{self.last_pass_step}"
        for d in sorted(broadcast.glob("step_*")):
            tail = d.name.removeprefix("step_")
            if tail.isdigit() and int(tail) > self.last_pass_step:
                os.replace(d, d.with_name(f"rejected_step_{tail}"))
        self.write_final(keep, gate_failed=True, failed_step=failed_step)
        return keep

    def write_final(self, path: Path, gate_failed: bool, failed_step: int | None = None) -> None:
        step = int(path.name.removeprefix("step_"))
        atomic_write_text(self.out / "final_adapter.json", json.dumps({
            "step": step, "path": str(path), "gate_failed": gate_failed, "failed_step": failed_step,
            "regressions": self.regressions, "start": self.start,
        }, indent=1) + "\n")
