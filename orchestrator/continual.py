"""Continual learning without forgetting (``[orchestrator.continual]``; composes with every workflow).

The loop holds a :class:`Continual` (or, when the section is off, the no-op :class:`Off`): a prompt source
around the workflow's (:class:`ReplayMix`), a row of core scores at each evaluation and a gate
(:class:`CoreSuite`). It never asks which one it has.

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
    """The prompt source of a continual run: the main source's prompts with ``round(n * ratio)`` replayed core
    prompts per batch (cores in turn). Each replayed prompt carries its environment's name (``Prompt.env``), so
    whoever scores it finds that environment (:meth:`score`) without any per-batch state."""

    def __init__(self, main: Any, env: Any, cores: dict[str, Any], ratio: float):
        self.main, self.env, self.ratio = main, env, ratio  # main: the prompt source; env: the run's environment
        self.names, self.cores = list(cores), list(cores.values())
        self.position = 0
        self.turn = 0

    @property
    def bad_rows(self) -> int:
        return getattr(self.main, "bad_rows", 0)

    def next_prompts(self, n: int) -> list[Prompt]:
        k = min(n - 1, round(n * self.ratio)) if self.cores else 0
        prompts = list(self.main.next_prompts(n - k))
        for _ in range(k):
            i = self.turn % len(self.cores)
            self.turn += 1
            prompts += [msgspec.structs.replace(p, env=self.names[i]) for p in self.cores[i].next_prompts(1)]
        self.position += n
        return prompts

    def score(self, prompt: Prompt, text: str) -> float:
        return (self.cores[self.names.index(prompt.env)] if prompt.env else self.env).score(prompt, text)

    def metrics(self, prompts: list[Prompt]) -> dict[str, float]:
        return {"continual/replay_prompts": float(sum(1 for p in prompts if p.env))}


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


class Off:
    """No continual learning: the workflow's prompt source as is, no core scores, a gate that always passes."""

    keeps_step_0 = False  # whether broadcast/step_0 (the untouched student) must be saved as a fallback

    def source(self, source: Any, env: Any) -> Any:
        return source

    def scorer(self, env: Any) -> Any:
        """Who scores a training prompt's completion (``score(prompt, text)``)."""
        return env

    def evaluate(self, evaluate: Callable[[Any], float], step: int, gate: bool = True) -> tuple[dict[str, float], bool]:
        return {}, True

    def metrics(self, prompts: list[Prompt]) -> dict[str, float]:
        return {}

    def baseline(self, teacher_score: Callable[[Any], float]) -> dict[str, float]:
        """The teacher's scores on the core behaviours (``orchestrator.eval_baseline``), none here."""
        return {}

    def finish(self, final: Path) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}

    def state(self) -> Any:
        return None

    def restore_state(self, state: Any) -> None:
        pass


class Continual(Off):
    """``[orchestrator.continual]``: replay (:class:`ReplayMix`), the capability suite and its gate (:class:`CoreSuite`)."""

    keeps_step_0 = True

    def __init__(self, cfg: Config, out: Path):
        self.cfg = cfg
        self.cores = make_core_envs(cfg)
        self.suite = CoreSuite(cfg, self.cores, out)
        self.mix: ReplayMix | None = None

    def source(self, source: Any, env: Any) -> Any:
        ratio = self.cfg.orchestrator.continual.replay_ratio
        if ratio:
            self.mix = ReplayMix(source, env, self.cores, ratio)
        return self.mix or source

    def scorer(self, env: Any) -> Any:
        return self.mix or env  # a replayed prompt is scored by the core environment it came from

    def evaluate(self, evaluate: Callable[[Any], float], step: int, gate: bool = True) -> tuple[dict[str, float], bool]:
        return self.suite.evaluate(evaluate, step, gate)

    def metrics(self, prompts: list[Prompt]) -> dict[str, float]:
        return self.mix.metrics(prompts) if self.mix else {}

    def baseline(self, teacher_score: Callable[[Any], float]) -> dict[str, float]:
        """``eval/core/<env>/baseline_teacher/avg``: the teacher, with its context, on each core behaviour. What
        the student would score there if it became the teacher: the part of a core's drop that is the new
        behaviour itself (a teacher told to answer in French does sums in French) rather than forgetting."""
        return {f"eval/core/{name}/baseline_teacher/avg": teacher_score(env) for name, env in self.cores.items()}

    def restore(self, failed_step: int) -> tuple[Path, int]:
        """The gate failed at ``failed_step``: (the last passing adapter, its step), now the run's final one."""
        return self.suite.restore(failed_step), self.suite.last_pass_step

    def finish(self, final: Path) -> None:
        """The run ended without a failed gate: ``final`` is the run's final adapter."""
        if not self.suite.regressions:
            self.suite.write_final(final, gate_failed=False)

    def summary(self) -> dict[str, Any]:
        return {"continual": self.suite.summary()}

    def state(self) -> Any:
        from orchestrator import checkpoint

        return checkpoint.state_of(self.suite)

    def restore_state(self, state: Any) -> None:
        from orchestrator import checkpoint

        if state is not None:
            checkpoint.restore(self.suite, state)


def make(cfg: Config, out: Path) -> Off:
    return Continual(cfg, out) if enabled(cfg) else Off()
