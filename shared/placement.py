"""Which actor runs where: a pure plan from the config, printed by ``--dry_run`` and tested without GPUs.

Each actor sees only its own devices through ``CUDA_VISIBLE_DEVICES`` (Ray's own GPU assignment is
switched off for our actors, so no scheduling surprises). With no ids a role runs on the CPU.
"""

from __future__ import annotations

from msgspec import Struct

from shared.config import Config


class ActorPlan(Struct, kw_only=True):
    role: str  # orchestrator | inference | teacher | trainer
    index: int
    devices: list[int]  # empty = CPU
    env: dict[str, str]
    tp: int = 1
    backend: str = ""  # trainer process-group backend
    endpoint: str = ""  # teacher: the external server it forwards to (teacher.endpoint)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


def _env(devices: list[int]) -> dict[str, str]:
    env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    return env


def _engines(role: str, ids: list[int], dp: int, tp: int) -> list[ActorPlan]:
    if not ids:
        return [ActorPlan(role=role, index=i, devices=[], env=_env([])) for i in range(max(dp, 1))]
    groups = [ids[i : i + tp] for i in range(0, len(ids), tp)]
    return [ActorPlan(role=role, index=i, devices=g, env=_env(g), tp=tp) for i, g in enumerate(groups)]


def plan(cfg: Config) -> list[ActorPlan]:
    actors = [ActorPlan(role="orchestrator", index=0, devices=[], env=_env([]))]
    actors += _engines("inference", cfg.inference.gpu_ids, cfg.inference.parallel.dp, cfg.inference.parallel.tp)
    if cfg.teacher.endpoint:  # one CPU actor that sends the teacher's requests to the external server
        actors.append(ActorPlan(role="teacher", index=0, devices=[], env=_env([]), endpoint=cfg.teacher.endpoint))
    else:
        actors += _engines("teacher", cfg.teacher.gpu_ids, cfg.teacher.parallel.dp, cfg.teacher.parallel.tp)
    if cfg.trainer.gpu_ids:
        actors += [
            ActorPlan(role="trainer", index=r, devices=[g], env=_env([g]), backend="nccl")
            for r, g in enumerate(cfg.trainer.gpu_ids)
        ]
    else:
        actors += [
            ActorPlan(role="trainer", index=r, devices=[], env=_env([]), backend="gloo")
            for r in range(cfg.trainer.cpu_ranks)
        ]
    return actors


def describe(actors: list[ActorPlan]) -> str:
    lines = ["# placement plan"]
    for a in actors:
        where = f"GPU {','.join(map(str, a.devices))}" if a.devices else "CPU"
        extra = f" tp={a.tp}" if a.tp > 1 else ""
        extra += f" backend={a.backend}" if a.backend else ""
        extra += f" -> {a.endpoint}" if a.endpoint else ""
        lines.append(f"#   {a.name:<14} {where}{extra}  CUDA_VISIBLE_DEVICES={a.env['CUDA_VISIBLE_DEVICES']!r}")
    return "\n".join(lines)
