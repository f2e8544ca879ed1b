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
"""

from __future__ import annotations

import re
from typing import Any

from msgspec import Struct

from shared.config import Config, ConfigError, gpu_slots, slot_name


class ActorPlan(Struct, kw_only=True):
    role: str  # orchestrator | inference | teacher | trainer
    index: int
    devices: list[int]  # empty = CPU
    env: dict[str, str]
    tp: int = 1
    backend: str = ""  # trainer process-group backend
    endpoint: str = ""  # teacher: the external server it forwards to (teacher.endpoint)
    node: int = 0  # the node it runs on: 0 = the node rl runs on (see node_order)

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


def plan(cfg: Config, visible: str | None = None) -> list[ActorPlan]:
    """The actors of a run; ``visible`` is ``rl``'s own ``CUDA_VISIBLE_DEVICES`` (None: unset)."""
    actors = [ActorPlan(role="orchestrator", index=0, devices=[], env=_env([]))]
    inf, tea = cfg.inference, cfg.teacher
    actors += _engines("inference", inf.gpu_ids, inf.parallel.dp, inf.parallel.tp, visible)
    if tea.endpoint:  # one CPU actor that sends the teacher's requests to the external server
        actors.append(ActorPlan(role="teacher", index=0, devices=[], env=_env([]), endpoint=tea.endpoint))
    else:
        actors += _engines("teacher", tea.gpu_ids, tea.parallel.dp, tea.parallel.tp, visible)
    if cfg.trainer.gpu_ids:  # all ranks on one node: FSDP2's collectives of every step stay within it
        slots = gpu_slots(cfg.trainer.gpu_ids, "trainer.gpu_ids")
        _one_node(slots, "trainer.gpu_ids", "the trainer (all its ranks)")
        actors += [_gpu_actor("trainer", r, [s], visible, backend="nccl") for r, s in enumerate(slots)]
    else:
        actors += [
            ActorPlan(role="trainer", index=r, devices=[], env=_env([]), backend="gloo")
            for r in range(cfg.trainer.cpu_ranks)
        ]
    return actors


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


def node_list(nodes: list[dict[str, Any]]) -> str:
    """``0 = host (address), 1 = ...``: the run's node numbering as rl prints it."""
    return ", ".join(f"{i} = {n.get('NodeManagerHostname', '?')} ({n.get('NodeManagerAddress', '?')})"
                     for i, n in enumerate(nodes))


def node_ids(actors: list[ActorPlan], nodes: list[dict[str, Any]]) -> list[str]:
    """The Ray node ids of ``nodes`` (in the run's order, :func:`node_order`); an actor planned on a
    node past them is a one-line ConfigError naming its role's key, before any engine starts."""
    for a in actors:
        if a.node >= len(nodes):
            raise ConfigError(f"{a.role}.gpu_ids: {a.name} is on node {a.node}, but the Ray cluster has "
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
        extra = f" tp={a.tp}" if a.tp > 1 else ""
        extra += f" backend={a.backend}" if a.backend else ""
        extra += f" -> {a.endpoint}" if a.endpoint else ""
        lines.append(f"#   {a.name:<14} {where}{extra}  CUDA_VISIBLE_DEVICES={a.env['CUDA_VISIBLE_DEVICES']!r}")
    return "\n".join(lines)
