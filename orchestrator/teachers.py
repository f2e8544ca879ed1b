"""The teacher role's backends, behind one interface (:class:`TeacherBackend`).

The in-cluster vLLM engine (teacher/engine.py) and an external OpenAI-compatible server (teacher/endpoint.py)
answer the same actor calls (``ready``, ``generate``, ``score``); what differs is checked and created here:
what preflight verifies before anything starts, how the actor is made, whether rollouts are scored when only
the ``teacher_kl`` metric would use the log-probs, and what each step's row adds. :func:`teacher_backend` is
the one place that reads which backend a config asks for. (No module-level Ray import: the launcher imports
this before Ray's environment is set.)
"""

from __future__ import annotations

from typing import Any

import msgspec

from orchestrator.failures import get
from shared.config import Config
from shared.placement import ActorPlan, RunPlan


class TeacherBackend:
    """How the teacher role runs (see the module docstring)."""

    scores_for_metrics = True  # score the student's rollouts even when only teacher_kl uses them (cheap here)

    def preflight(self, cfg: Config, tokenizer: Any) -> dict[str, str]:
        """Checks before Ray starts (one-line ConfigErrors); what the actor needs to know (``RunPlan`` fields)."""
        return {}

    def actor(self, cfg: Config, run: RunPlan, a: ActorPlan, options: dict, base: dict, log: str) -> Any:
        raise NotImplementedError

    def step_metrics(self, actors: list, score_failed: int) -> dict[str, float]:
        """The step's row entries: rollouts dropped unscored (too long to score, or an endpoint's failures)."""
        return {"teacher/score_failed": float(score_failed)}

    def route(self, prompts: list) -> list[str] | None:
        """The name of each prompt's teacher (several named teachers, orchestrator/teacher_set.py); None: the
        one teacher scores every prompt."""
        return None

    def batch_metrics(self, prompts: list, rollouts: list, teacher_lp: list) -> dict[str, float]:
        """Row entries from a scored batch beyond the aggregate ones (per-teacher counts and KL); none here."""
        return {}


class EngineTeacher(TeacherBackend):
    """The in-cluster vLLM engine without LoRA (teacher/engine.py)."""

    def actor(self, cfg: Config, run: RunPlan, a: ActorPlan, options: dict, base: dict, log: str) -> Any:
        import ray

        from shared.engines import engine_env
        from teacher.engine import TeacherEngine

        spec = dict(base, dtype=cfg.teacher.dtype, tp=a.tp, gpu_memory_utilization=cfg.teacher.gpu_memory_utilization,
                    sleep=a.sleeps)
        if cfg.trainer.loss.teacher_topk > 20:  # vLLM's default max_logprobs
            spec["max_logprobs"] = cfg.trainer.loss.teacher_topk
        options["runtime_env"]["env_vars"].update(engine_env(cfg.teacher.kv_cache_gib, cpu=not a.devices))
        return ray.remote(TeacherEngine).options(**options).remote(run.teacher, spec, log)


class EndpointTeacher(TeacherBackend):
    """An external OpenAI-compatible server (teacher/endpoint.py): probed before the run (reachable, the model
    served, the same tokenizer, log-probs where the run needs them); every request costs, so rollouts are scored
    only when the advantage uses the log-probs; its request counts join each step's row."""

    scores_for_metrics = False

    def preflight(self, cfg: Config, tokenizer: Any) -> dict[str, str]:
        from teacher.endpoint import probe

        return probe(cfg, tokenizer)

    def actor(self, cfg: Config, run: RunPlan, a: ActorPlan, options: dict, base: dict, log: str) -> Any:
        import ray

        from teacher.endpoint import EndpointTeacher as Actor

        options["runtime_env"]["env_vars"]["TOKENIZERS_PARALLELISM"] = "false"
        return ray.remote(Actor).options(**options).remote(
            msgspec.json.encode(cfg), run.endpoint_model, run.endpoint_prompts, run.teacher, log)

    def step_metrics(self, actors: list, score_failed: int) -> dict[str, float]:
        return {**get("teacher", actors[0].stats.remote()), "teacher/score_failed": float(score_failed)}


def teacher_backend(cfg: Config) -> TeacherBackend:
    """The one place that reads which backend runs the (one) teacher; several named teachers are
    :func:`orchestrator.teacher_set.teacher_backend`, which builds each of them with this."""
    return EndpointTeacher() if cfg.teacher.endpoint else EngineTeacher()
