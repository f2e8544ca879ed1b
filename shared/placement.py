"""Which actor runs where: a pure plan from the config, printed by ``--dry_run`` and tested without GPUs.

Each actor sees only its own devices through ``CUDA_VISIBLE_DEVICES`` (Ray's own GPU assignment is
switched off for our actors, so no scheduling surprises). With no ids a role runs on the CPU.

The ids of ``--inference_gpu_ids`` etc. count the GPUs that ``rl`` itself sees: when ``rl`` runs with
``CUDA_VISIBLE_DEVICES`` set (Slurm without a device cgroup: ``4,5,6,7``; MIG or GPU UUIDs), id ``i`` is the
``i``-th entry of it, and that entry (not ``i``) is what the actor is given.
"""

from __future__ import annotations

from msgspec import Struct

from shared.config import Config, ConfigError


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


def visible_devices(ids: list[int], visible: str | None, key: str) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of ``ids``: the ids themselves when ``visible`` is None (rl's
    own variable unset), else the ``i``-th entries of ``visible`` (indices, or GPU/MIG UUIDs)."""
    if visible is None:
        return [str(i) for i in ids]
    names = [v.strip() for v in visible.split(",") if v.strip()]
    for i in ids:
        if i >= len(names):
            raise ConfigError(f"{key}: GPU id {i}, but rl sees {len(names)} GPU(s) (CUDA_VISIBLE_DEVICES="
                              f"{visible!r}); ids count from 0 within them")
    return [names[i] for i in ids]


def _env(devices: list[str]) -> dict[str, str]:
    return {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": ",".join(devices)}


def _engines(role: str, ids: list[int], dp: int, tp: int, visible: str | None) -> list[ActorPlan]:
    if not ids:
        return [ActorPlan(role=role, index=i, devices=[], env=_env([])) for i in range(max(dp, 1))]
    groups = [ids[i : i + tp] for i in range(0, len(ids), tp)]
    return [ActorPlan(role=role, index=i, devices=g, env=_env(visible_devices(g, visible, f"{role}.gpu_ids")), tp=tp)
            for i, g in enumerate(groups)]


def plan(cfg: Config, visible: str | None = None) -> list[ActorPlan]:
    """The actors of a run; ``visible`` is ``rl``'s own ``CUDA_VISIBLE_DEVICES`` (None: unset)."""
    actors = [ActorPlan(role="orchestrator", index=0, devices=[], env=_env([]))]
    inf, tea = cfg.inference, cfg.teacher
    actors += _engines("inference", inf.gpu_ids, inf.parallel.dp, inf.parallel.tp, visible)
    if tea.endpoint:  # one CPU actor that sends the teacher's requests to the external server
        actors.append(ActorPlan(role="teacher", index=0, devices=[], env=_env([]), endpoint=tea.endpoint))
    else:
        actors += _engines("teacher", tea.gpu_ids, tea.parallel.dp, tea.parallel.tp, visible)
    if cfg.trainer.gpu_ids:
        actors += [
            ActorPlan(role="trainer", index=r, devices=[g],
                      env=_env(visible_devices([g], visible, "trainer.gpu_ids")), backend="nccl")
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
