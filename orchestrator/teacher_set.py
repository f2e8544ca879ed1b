"""Several named teachers (``[teachers.NAME]``) behind the one :class:`~orchestrator.teachers.TeacherBackend`.

Each named teacher is the backend a single ``[teacher]`` with its keys would be (an in-cluster engine or an
endpoint), run on a *view* of the config in which its table stands in ``[teacher]``
(:func:`shared.config.teacher_view`), so the engine, the endpoint client and their checks are unchanged.
:class:`TeacherSet` adds what is particular to several:

- **routing** (:func:`route`): each prompt's teacher by ``orchestrator.teacher_route``: ``by = "env"`` maps the
  environment that drew the prompt (``Prompt.env``, or ``orchestrator.environment`` for the run's own) to a
  teacher; ``by = "column"`` takes a dataset row's ``"teacher"`` field; prompts no rule names, and every prompt
  with ``by = "default"``, go to ``teacher_route.default`` (else the first table). The pipeline sends each
  batch's rollouts to their teachers in one scoring call per teacher actor and merges the log-probs back in
  rollout order (``Roles.score_refs``).
- **metrics per teacher** (:func:`teacher_metrics`): ``teacher/NAME/prompts`` and ``teacher/NAME/rollouts``
  routed to it in the step's batch, ``teacher/NAME/scored`` (log-probs came back), ``teacher/NAME/kl`` (its mean
  per-token reverse-KL term ``logp_S - logp_T``, the aggregate ``teacher_kl`` restricted to its rollouts) and
  ``teacher/NAME/tokens``; an endpoint teacher's request counts as ``teacher/NAME/endpoint_*``. The aggregate
  entries (``teacher_kl``, ``teacher/score_failed``, ``teacher/endpoint_*`` summed) are unchanged.
- **one teacher for the rest**: evaluations of the teacher (``eval_baseline``) and any synchronous scoring use
  the teacher of the run's own environment (:func:`shared.config.primary_teacher`).

No module-level Ray import (the launcher imports this before Ray's environment is set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec

from orchestrator import teachers
from orchestrator.teachers import EndpointTeacher, TeacherBackend
from shared.config import Config, ConfigError, default_teacher, teacher_configs, teacher_view
from shared.placement import ActorPlan, RunPlan, teacher_actors


def route(cfg: Config, prompts: Sequence[Any]) -> list[str]:
    """The teacher of each prompt (see the module docstring); a row naming a teacher that does not exist is a
    ConfigError naming the name (preflight checks a dataset file first, :func:`check_rows`)."""
    r, default = cfg.orchestrator.teacher_route, default_teacher(cfg)
    if r.by == "env":
        main = cfg.orchestrator.environment
        return [r.env.get(p.env or main, default) for p in prompts]
    if r.by == "column":
        names = [getattr(p, "teacher", "") or default for p in prompts]
        for name in names:
            if name not in cfg.teachers:
                raise ConfigError(f"orchestrator.teacher_route.by: a prompt names teacher {name!r}, which is not one "
                                  f"of [teachers] ({', '.join(cfg.teachers)})")
        return names
    return [default] * len(prompts)


def check_rows(cfg: Config, dataset: Any) -> None:
    """``by = "column"``: every row's ``"teacher"`` is a name of ``[teachers]`` (one pass over the file); the first
    that is not is a one-line ConfigError naming the file and line."""
    if cfg.orchestrator.teacher_route.by != "column" or dataset is None:
        return
    for i, prompt in enumerate(dataset):
        if prompt.teacher and prompt.teacher not in cfg.teachers:
            raise ConfigError(f"{cfg.orchestrator.dataset.path}:{dataset.lines[i]}: teacher {prompt.teacher!r} is not "
                              f"one of [teachers] ({', '.join(cfg.teachers)})")


def check_teachers(cfg: Config, student: Any, student_tok: Any, prompts: list[str]) -> dict[str, dict[str, str]]:
    """Preflight of every named teacher as of a single ``[teacher]``: its model directory, the student's vocabulary,
    the chat template and end-of-sequence token (errors name ``teachers.NAME``); ``RunPlan.teachers``' model
    directories. Nothing without ``[teachers]``."""
    import re

    from shared import chat_templates, models

    out = {}
    for name in cfg.teachers:
        view = teacher_view(cfg, name)
        try:
            directory = models.resolve(view.teacher.name, "teacher.name")
            tok = models.load_tokenizer(directory, "teacher.name")
            models.check_same_vocab(student, directory, student_tok, tok)
            chat_templates.check(view, student_tok, tok, prompts)
        except ConfigError as e:
            raise ConfigError(re.sub(r"\bteacher\.", f"teachers.{name}.", str(e))) from None
        out[name] = {"teacher": str(directory)}
    return out


def clipped_kl_terms(student_lp: Sequence[float], teacher_lp: Sequence[float], floor: float) -> list[float]:
    """Per-token reverse-KL terms ``logp_S(t) - max(logp_T(t), floor)`` (NaN/-inf teacher values count as
    ``floor``), as the aggregate ``teacher_kl`` forms them (``shared.advantages.sanitize_logprobs``)."""
    return [s - (t if not math.isnan(t) and t >= floor else floor) for s, t in zip(student_lp, teacher_lp)]


def teacher_metrics(names: Sequence[str], prompt_index: Sequence[int], student_lp: Sequence[Sequence[float]],
                    teacher_lp: Sequence[Sequence[float] | None], teachers: Sequence[str],
                    floor: float) -> dict[str, float]:
    """Each teacher's entries of a step's row, from its batch's rollouts: ``names[i]`` is rollout ``i``'s teacher,
    ``prompt_index[i]`` its prompt, ``teacher_lp[i]`` None where it was not scored. A teacher that got nothing this
    step reports 0 counts and a NaN ``kl``."""
    row: dict[str, float] = {}
    for t in teachers:
        mine = [i for i, n in enumerate(names) if n == t]
        terms = [k for i in mine if teacher_lp[i] is not None
                 for k in clipped_kl_terms(student_lp[i], teacher_lp[i], floor)]
        row.update({
            f"teacher/{t}/prompts": float(len({prompt_index[i] for i in mine})),
            f"teacher/{t}/rollouts": float(len(mine)),
            f"teacher/{t}/scored": float(sum(1 for i in mine if teacher_lp[i] is not None)),
            f"teacher/{t}/tokens": float(len(terms)),
            f"teacher/{t}/kl": math.fsum(terms) / len(terms) if terms else float("nan"),
        })
    return row


class TeacherSet(TeacherBackend):
    """Every named teacher's backend, each on its view of the config (see the module docstring)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.names = list(teacher_configs(cfg))
        self.views = {n: teacher_view(cfg, n) for n in self.names}
        self.backends = {n: teachers.teacher_backend(v) for n, v in self.views.items()}
        # a paid endpoint among them: score only when the advantage uses the log-probs
        self.scores_for_metrics = all(b.scores_for_metrics for b in self.backends.values())
        self.members = [a.teacher for a in teacher_actors(cfg)]  # the name of each teacher actor, in plan order

    def preflight(self, cfg: Config, tokenizer: Any) -> dict[str, Any]:
        """Each teacher's own preflight (an endpoint's probe) on its view: ``RunPlan.teachers[NAME]``."""
        from shared import models

        out: dict[str, dict[str, str]] = {}
        for n, view in self.views.items():
            key = f"teachers.{n}.name"
            directory = models.resolve(view.teacher.name, key)  # built and checked by check_teachers already
            fields = self.backends[n].preflight(view, models.load_tokenizer(directory, key) if fields_needed(view)
                                                else None)
            out[n] = {"teacher": str(directory), **fields}
        return {"teachers": out}

    def actor(self, cfg: Config, run: RunPlan, a: ActorPlan, options: dict, base: dict, log: str) -> Any:
        return self.backends[a.teacher].actor(self.views[a.teacher], view_run(run, a.teacher), a, options, base, log)

    def step_metrics(self, actors: list, score_failed: int) -> dict[str, float]:
        row = {"teacher/score_failed": float(score_failed)}
        for n, backend in self.backends.items():
            if isinstance(backend, EndpointTeacher):
                mine = [x for x, m in zip(actors, self.members) if m == n]
                stats = backend.step_metrics(mine, 0)
                stats.pop("teacher/score_failed")
                for key, value in stats.items():
                    row[key] = row.get(key, 0.0) + value
                    row[key.replace("teacher/", f"teacher/{n}/", 1)] = value
        failure_rates = [k for k in row if k.startswith("teacher/") and k.endswith("failure_rate") and k.count("/") == 1]
        for key in failure_rates:  # a rate is not a sum: the aggregate is failed / requests over every endpoint
            row[key] = row.get("teacher/endpoint_failed", 0.0) / max(row.get("teacher/endpoint_requests", 0.0), 1.0)
        return row

    def route(self, prompts: Sequence[Any]) -> list[str]:
        return route(self.cfg, prompts)

    def batch_metrics(self, prompts: Sequence[Any], rollouts: Sequence[Any],
                      teacher_lp: Sequence[Sequence[float] | None]) -> dict[str, float]:
        return teacher_metrics(self.route(prompts), [r.prompt_index for r in rollouts], [r.logprobs for r in rollouts],
                               teacher_lp, self.names, self.cfg.trainer.loss.logprob_floor)


def fields_needed(view: Config) -> bool:
    """Whether a teacher's backend preflight needs its tokenizer (an endpoint's probe sends its token ids)."""
    return bool(view.teacher.endpoint)


def teacher_backend(cfg: Config) -> TeacherBackend:
    """The run's teacher backend: :class:`TeacherSet` with ``[teachers.NAME]``, else the one ``[teacher]``'s."""
    return TeacherSet(cfg) if cfg.teachers else teachers.teacher_backend(cfg)


def view_run(run: RunPlan, name: str) -> RunPlan:
    """``run`` as teacher ``name``'s actor needs it: its model directory (and an endpoint's model and prompt
    form) in the single-teacher fields."""
    return msgspec.structs.replace(run, **run.teachers.get(name, {}))
