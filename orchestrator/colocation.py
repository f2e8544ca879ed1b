"""Engines that share a GPU with the trainer step aside while it trains (``placement.sleep``).

Under ``placement.colocate`` the plan marks each engine whose GPUs include a trainer rank's
(``ActorPlan.sleeps``, shared/placement.py). One synchronous step is then

    sample -> score -> sleep those engines -> train -> wake them -> serve the new adapter

so the trainer's share of the GPU may reuse theirs (the memory rule in shared/placement.py). The loop calls
:meth:`Colocation.before_train` and :meth:`Colocation.after_train` every step; with nothing asleep both do
nothing, so the loop has no colocation branch. The calls go through ``Roles.call``: each kind
(``inference sleep``, ``teacher wake_up``, ...) has its deadline, and a failure names the role and the actor.
Sleep needs the synchronous loop (``orchestrator.max_async_level = 0``, checked by the plan): with k > 0 the
engines sample while the trainer steps.
"""

from __future__ import annotations

from typing import Any

from shared.engines import SLEEP_LEVEL


class Colocation:
    """The engines that sleep while the trainer steps, from ``roles`` (an ``orchestrator.roles.Roles``, which
    builds this: not imported here, no import circle): its plan and its started actors, by role in plan order
    (``actors[role][a.index]`` is ``a``'s actor)."""

    def __init__(self, roles: Any):
        self.roles = roles
        self.sleepers = [(a.role, a.name, roles.actors[a.role][a.index]) for a in roles.run.actors if a.sleeps]

    def _all(self, method: str, *args: object) -> None:
        """``method`` on every sleeper at once; returns when all have answered."""
        by_role: dict[str, list] = {}
        for role, name, actor in self.sleepers:
            by_role.setdefault(role, []).append(self.roles._owned(getattr(actor, method).remote(*args), name))
        for role, refs in by_role.items():
            self.roles.call(role, f"{role} {method}", refs)

    def before_train(self) -> None:
        """Put the engines to sleep (vLLM level 1: weights to CPU memory, KV cache freed)."""
        self._all("sleep", SLEEP_LEVEL)

    def after_train(self) -> None:
        """Wake them (weights back on the GPU, an empty KV cache) before they load the new adapter."""
        self._all("wake_up")
