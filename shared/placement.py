"""Which actor runs where: a pure plan from the config, printed by ``--dry_run`` and tested without GPUs.

Each actor sees only its own devices through ``CUDA_VISIBLE_DEVICES`` (Ray's own GPU assignment is
switched off for our actors, so no scheduling surprises). With no ids a role runs on the CPU.

The ids of ``--inference_gpu_ids`` etc. count the GPUs that ``rl`` itself sees: when ``rl`` runs with
``CUDA_VISIBLE_DEVICES`` set (Slurm without a device cgroup: ``4,5,6,7``; MIG or GPU UUIDs), id ``i`` is the
``i``-th entry of it, and that entry (not ``i``) is what the actor is given.

Several nodes (a Ray cluster that ``rl`` joins with ``ray_address``, as ``slurm/multi_node.sbatch`` starts):
an id ``"N:G"`` is GPU ``G`` of node ``N``, a plain ``G`` is GPU ``G`` of node 0 (so every single-node card
keeps its meaning). Node 0 is the node ``rl`` runs on (the Ray head under ``multi_node.sbatch``, the first
node of ``SLURM_JOB_NODELIST``); the other alive nodes follow by hostname in natural order (``gpu9`` before
``gpu10``), then address: for Slurm's usual names (a prefix and a number) that is the order of
``scontrol show hostnames $SLURM_JOB_NODELIST``. ``rl``'s ``CUDA_VISIBLE_DEVICES`` describes node 0 alone:
on another node ``G`` is given to the actor as it is. Orchestrator and CPU roles stay on node 0; one engine
(its tensor-parallel group) and the trainer (all its ranks) each run on one node.

Colocation (``placement.colocate = true``): roles may name the same GPUs (one GPU for everything:
``--inference_gpu_ids 0 --teacher_gpu_ids 0 --trainer_gpu_ids 0``). Each GPU actor then carries its memory
share (``ActorPlan.memory``, a fraction of the GPU): the engines' ``gpu_memory_utilization`` (what vLLM may use
of each of its GPUs) and ``trainer.gpu_memory_fraction`` (the cap torch's allocator gets in each trainer rank).
With ``placement.sleep`` an engine that shares a GPU with a trainer rank sleeps while the trainer steps
(``ActorPlan.sleeps``; ``orchestrator/colocation.py``), and the trainer keeps only
``trainer.gpu_memory_idle_fraction`` between steps (``ActorPlan.held``). A step then has two phases on a GPU:

- *serve* (sampling, scoring, evaluation; the trainer idle): every engine awake + what the trainer holds,
- *train* (the trainer steps): the trainer's share + the engines that do not sleep (sleeping ones free theirs),

so a GPU's need is ``max(sum(serve shares), sum(train shares))`` and more than 1 is over-commit
(:func:`gpu_loads`, :func:`check_memory`). Without sleep both phases are the plain sum of the shares. Not
counted (each process's CUDA context, NCCL buffers and a sleeping engine's residue, a few hundred MiB each):
leave that much below 1.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import Struct

from shared.config import Config, ConfigError, gpu_slots, slot_name, teacher_configs


class ActorPlan(Struct, kw_only=True):
    role: str  # orchestrator | inference | teacher | trainer
    index: int
    devices: list[int]  # empty = CPU
    env: dict[str, str]
    tp: int = 1
    backend: str = ""  # trainer process-group backend
    endpoint: str = ""  # teacher: the external server it forwards to (teacher.endpoint)
    node: int = 0  # the node it runs on: 0 = the node rl runs on (see node_order)
    memory: float = 0.0  # placement.colocate: its share of each of its GPUs while it works; 0 = not planned
    held: float = 0.0  # a trainer rank beside sleeping engines: its share between steps (else = memory)
    sleeps: bool = False  # an engine that sleeps while the trainer steps on one of its GPUs
    teacher: str = ""  # a teacher of [teachers.NAME]: its NAME (empty: the run's one [teacher])

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def key(self) -> str:
        """The config section of its GPU ids: its role, or ``teachers.NAME`` for a named teacher."""
        return f"teachers.{self.teacher}" if self.teacher else self.role


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


def _one_node(slots: list[tuple[int, int]], key: str, what: str) -> int:
    """The node of ``slots``, which must all be on one (an actor runs on one node)."""
    nodes = sorted({n for n, _ in slots})
    if len(nodes) > 1:
        raise ConfigError(f"{key}: {what} spans nodes {', '.join(map(str, nodes))} "
                          f"({','.join(map(slot_name, slots))}); give it GPUs of one node")
    return nodes[0]


def _gpu_actor(role: str, index: int, slots: list[tuple[int, int]], visible: str | None, **kw: Any) -> ActorPlan:
    """The actor of ``slots`` (all on one node): rl's own ``CUDA_VISIBLE_DEVICES`` maps node 0's ids only."""
    node, gpus = slots[0][0], [g for _, g in slots]
    names = visible_devices(gpus, visible, f"{role}.gpu_ids") if node == 0 else [str(g) for g in gpus]
    return ActorPlan(role=role, index=index, devices=gpus, env=_env(names), node=node, **kw)


def _engines(role: str, ids: list[int | str], dp: int, tp: int, visible: str | None) -> list[ActorPlan]:
    if not ids:
        return [ActorPlan(role=role, index=i, devices=[], env=_env([])) for i in range(max(dp, 1))]
    key = f"{role}.gpu_ids"
    slots = gpu_slots(ids, key)
    groups = [slots[i : i + tp] for i in range(0, len(slots), tp)]
    for i, g in enumerate(groups):  # one engine is one actor, on one node
        _one_node(g, key, f"the tensor-parallel group of {role}-{i} ({role}.parallel.tp = {tp})")
    return [_gpu_actor(role, i, g, visible, tp=tp) for i, g in enumerate(groups)]


def _one_teacher(tea: Any, visible: str | None) -> list[ActorPlan]:
    if tea.endpoint:  # one CPU actor that sends the teacher's requests to the external server
        return [ActorPlan(role="teacher", index=0, devices=[], env=_env([]), endpoint=tea.endpoint)]
    return _engines("teacher", tea.gpu_ids, tea.parallel.dp, tea.parallel.tp, visible)


def teacher_actors(cfg: Config, visible: str | None = None) -> list[ActorPlan]:
    """The teacher's actors; with ``[teachers.NAME]`` each named teacher's, in table order, numbered on
    (``teacher-0``, ``teacher-1``, ...) and marked with its name (``ActorPlan.teacher``)."""
    if not cfg.teachers:
        return _one_teacher(cfg.teacher, visible)
    out: list[ActorPlan] = []
    for name, tea in teacher_configs(cfg).items():
        try:
            mine = _one_teacher(tea, visible)
        except ConfigError as e:  # name the table: "teachers.a.gpu_ids: ..."
            raise ConfigError(re.sub(r"\bteacher\.", f"teachers.{name}.", str(e))) from None
        out += [msgspec.structs.replace(a, index=len(out) + i, teacher=name) for i, a in enumerate(mine)]
    return out


def plan(cfg: Config, visible: str | None = None) -> list[ActorPlan]:
    """The actors of a run; ``visible`` is ``rl``'s own ``CUDA_VISIBLE_DEVICES`` (None: unset)."""
    actors = [ActorPlan(role="orchestrator", index=0, devices=[], env=_env([]))]
    inf = cfg.inference
    actors += _engines("inference", inf.gpu_ids, inf.parallel.dp, inf.parallel.tp, visible)
    actors += teacher_actors(cfg, visible)
    if cfg.trainer.gpu_ids:  # all ranks on one node: FSDP2's collectives of every step stay within it
        slots = gpu_slots(cfg.trainer.gpu_ids, "trainer.gpu_ids")
        _one_node(slots, "trainer.gpu_ids", "the trainer (all its ranks)")
        actors += [_gpu_actor("trainer", r, [s], visible, backend="nccl") for r, s in enumerate(slots)]
    else:
        actors += [
            ActorPlan(role="trainer", index=r, devices=[], env=_env([]), backend="gloo")
            for r in range(cfg.trainer.cpu_ranks)
        ]
    return colocate(cfg, actors) if cfg.placement.colocate else actors


def colocate(cfg: Config, actors: list[ActorPlan]) -> list[ActorPlan]:
    """``actors`` with their memory shares (and, with ``placement.sleep``, which engines sleep), checked by
    :func:`check_memory`: a one-line ConfigError before anything starts."""
    share = {"inference": cfg.inference.gpu_memory_utilization, "teacher": cfg.teacher.gpu_memory_utilization,
             "trainer": cfg.trainer.gpu_memory_fraction}
    trained = {(a.node, g) for a in actors if a.role == "trainer" for g in a.devices}
    out = []
    for a in actors:
        if not a.devices:
            out.append(a)
            continue
        sleeps = cfg.placement.sleep and a.role != "trainer" and any((a.node, g) in trained for g in a.devices)
        mine = teacher_configs(cfg)[a.teacher].gpu_memory_utilization if a.teacher else share[a.role]
        out.append(msgspec.structs.replace(a, memory=mine, held=mine, sleeps=sleeps))
    if any(a.sleeps for a in out):
        if cfg.orchestrator.max_async_level:
            raise ConfigError(f"placement.sleep: engines sleep while the trainer steps, but orchestrator."
                              f"max_async_level = {cfg.orchestrator.max_async_level} samples during its step; set "
                              "max_async_level = 0, or placement.sleep = false (the shares must then fit together)")
        idle = cfg.trainer.gpu_memory_idle_fraction
        if idle > cfg.trainer.gpu_memory_fraction:
            raise ConfigError(f"trainer.gpu_memory_idle_fraction: {idle:g} is above trainer.gpu_memory_fraction = "
                              f"{cfg.trainer.gpu_memory_fraction:g} (what a rank keeps between steps is part of its share)")
        sleepy = {(a.node, g) for a in out if a.sleeps for g in a.devices}
        out = [msgspec.structs.replace(a, held=idle) if a.role == "trainer" and (a.node, a.devices[0]) in sleepy
               else a for a in out]
    check_memory(out)
    return out


class GpuLoad(Struct, kw_only=True):
    """Who is on one GPU and how much of it each phase of a step needs (fractions of the GPU's memory)."""

    node: int
    gpu: int
    actors: list[str]  # names, in plan order
    serve: float  # engines sampling/scoring: every engine's share + what the trainer holds between steps
    train: float  # the trainer stepping: its share + the engines that do not sleep

    @property
    def need(self) -> float:
        return max(self.serve, self.train)


def gpu_loads(actors: list[ActorPlan]) -> list[GpuLoad]:
    """Per (node, GPU) with a planned share, in order: who is on it and the two phases' totals (module
    docstring): ``serve = sum(engines' memory) + trainer's held``, ``train = trainer's memory + sum(memory of
    engines that do not sleep)``."""
    loads: dict[tuple[int, int], GpuLoad] = {}
    for a in actors:
        if not a.memory:
            continue
        serve = a.held if a.role == "trainer" else a.memory
        train = 0.0 if a.sleeps else a.memory
        for g in a.devices:
            load = loads.setdefault((a.node, g), GpuLoad(node=a.node, gpu=g, actors=[], serve=0.0, train=0.0))
            load.actors.append(a.name)
            load.serve += serve
            load.train += train
    return sorted(loads.values(), key=lambda x: (x.node, x.gpu))


OVERCOMMIT_EPS = 1e-9  # 0.3 + 0.3 + 0.4 is 1.0000000000000002 in floats: not over-commit


def _shares(a: ActorPlan) -> str:
    key = {"inference": "inference.gpu_memory_utilization", "teacher": "teacher.gpu_memory_utilization",
           "trainer": "trainer.gpu_memory_fraction"}[a.role]
    key = f"teachers.{a.teacher}.gpu_memory_utilization" if a.teacher else key
    return f"{a.name} {a.memory:g} ({key}{', asleep while the trainer steps' if a.sleeps else ''})"


def check_memory(actors: list[ActorPlan]) -> None:
    """A one-line ConfigError naming the first over-committed GPU, its phase and every share on it."""
    by_name = {a.name: a for a in actors}
    for load in gpu_loads(actors):
        if load.need <= 1 + OVERCOMMIT_EPS:
            continue
        gpu = slot_name((load.node, load.gpu))
        phase = (f": {load.need:.2f}" if load.serve == load.train  # no sleep: the same sum all the time
                 else f" while the engines run: {load.serve:.2f}" if load.serve > load.train
                 else f" while the trainer steps: {load.train:.2f}")
        held = [f"{a.name} holds {a.held:g} between steps (trainer.gpu_memory_idle_fraction)"
                for a in map(by_name.get, load.actors) if a.role == "trainer" and a.held != a.memory]
        raise ConfigError(f"placement.colocate: GPU {gpu} is over-committed{phase} > 1 "
                          f"({'; '.join([*map(_shares, map(by_name.get, load.actors)), *held])}); lower the shares")


def _natural(text: str) -> list[tuple[int, int, str]]:
    """A sort key in which digit runs compare as numbers (``gpu9`` before ``gpu10``), as Slurm sorts a hostlist."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"([0-9]+)", text) if t]


def node_order(nodes: list[dict[str, Any]], here: str) -> list[dict[str, Any]]:
    """The run's node numbering over ``ray.nodes()``: the alive nodes, ``here`` (the Ray node id of the node rl
    runs on) first, the others by hostname in natural order, then address, then node id (ties only among
    nodes on one host, as in a test cluster). A pure function of what Ray reports, so a Slurm user predicts
    it from the node list alone and the launcher and the tests agree on it."""

    def key(n: dict[str, Any]) -> tuple:
        return (n["NodeID"] != here, _natural(n.get("NodeManagerHostname", "")),
                _natural(n.get("NodeManagerAddress", "")), n["NodeID"])

    return sorted((n for n in nodes if n.get("Alive")), key=key)


class RunPlan(Struct, kw_only=True):
    """Everything a run's roles are started from, resolved once before Ray starts (``launcher.preflight``) and
    passed on as it is: the model directories, each actor's placement (:func:`plan`, computed once here) and,
    after joining a cluster of several nodes, the Ray node id of each of the run's nodes."""

    student: str  # the student's model directory
    teacher: str  # the teacher's (its tokenizer, for an endpoint teacher)
    actors: list[ActorPlan]
    nodes: list[str] = []  # Ray node ids of nodes 0, 1, ...; empty on one node (no affinity needed)
    endpoint_model: str = ""  # an endpoint teacher: the served model's name
    endpoint_prompts: str = ""  # an endpoint teacher: how prompts are sent (ids or text)
    dataset: str = ""  # the dataset file of the rows kept after preflight's length check; empty = as configured
    skipped: dict[str, int] = {}  # dataset rows skipped before the run, by kind (orchestrator/skips.py)
    # several named teachers: each one's single-teacher fields above (teacher, endpoint_model, endpoint_prompts)
    teachers: dict[str, dict[str, str]] = {}


def node_list(nodes: list[dict[str, Any]]) -> str:
    """``0 = host (address), 1 = ...``: the run's node numbering as rl prints it."""
    return ", ".join(f"{i} = {n.get('NodeManagerHostname', '?')} ({n.get('NodeManagerAddress', '?')})"
                     for i, n in enumerate(nodes))


def node_ids(actors: list[ActorPlan], nodes: list[dict[str, Any]]) -> list[str]:
    """The Ray node ids of ``nodes`` (in the run's order, :func:`node_order`); an actor planned on a
    node past them is a one-line ConfigError naming its role's key, before any engine starts."""
    for a in actors:
        if a.node >= len(nodes):
            raise ConfigError(f"{a.key}.gpu_ids: {a.name} is on node {a.node}, but the Ray cluster has "
                              f"{len(nodes)} alive node(s): {node_list(nodes)} (0 = the node rl runs on)")
    return [n["NodeID"] for n in nodes]


def node_affinity(a: ActorPlan, nodes: list[str]) -> dict[str, Any]:
    """``.options()`` that keep actor ``a`` on its plan's node (``nodes``: ``RunPlan.nodes``; hard affinity: a lost
    node fails the actor rather than moving it to a node where its GPU ids mean other GPUs); none on a single
    node, where nothing changes."""
    if not nodes:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=nodes[a.node], soft=False)}


def describe(actors: list[ActorPlan]) -> str:
    """One TOML comment line per actor; ``node N`` leads each line when the plan spans nodes (a single-node
    plan reads as it always did)."""
    lines = ["# placement plan"]
    several = any(a.node for a in actors)
    for a in actors:
        where = f"GPU {','.join(map(str, a.devices))}" if a.devices else "CPU"
        where = f"node {a.node} {where}" if several else where
        extra = f" teacher={a.teacher}" if a.teacher else ""
        extra += f" tp={a.tp}" if a.tp > 1 else ""
        extra += f" backend={a.backend}" if a.backend else ""
        extra += f" -> {a.endpoint}" if a.endpoint else ""
        extra += f" mem={a.memory:g}" if a.memory else ""
        extra += " (asleep while the trainer steps)" if a.sleeps else ""
        extra += f" (holds {a.held:g} between steps)" if a.held != a.memory else ""
        lines.append(f"#   {a.name:<14} {where}{extra}  CUDA_VISIBLE_DEVICES={a.env['CUDA_VISIBLE_DEVICES']!r}")
    for load in gpu_loads(actors):
        if len(load.actors) > 1:  # a shared GPU: its two phases' totals (module docstring)
            lines.append(f"#   shared GPU {slot_name((load.node, load.gpu))}: {' + '.join(load.actors)}; "
                         f"engines running {load.serve:.2f}, trainer stepping {load.train:.2f} of its memory")
    return "\n".join(lines)
