"""Workflows as plug-ins: ``orchestrator.workflow`` names one of :data:`REGISTRY` (interface: ``base.py``).

Adding one is a module with a :class:`~orchestrator.workflows.base.Workflow` subclass, a line here, its name in
``shared/config.py``'s ``orchestrator.workflow`` choices, an experiment TOML and a test (docs/workflows.md).
"""

from __future__ import annotations

from orchestrator.workflows.base import Context, PolicyWorkflow, RewardSource, StepSamples, Workflow
from orchestrator.workflows.comparator import Comparator
from orchestrator.workflows.distill import Distill
from orchestrator.workflows.judge import Judge
from orchestrator.workflows.sft import SFT

REGISTRY: dict[str, type[Workflow]] = {w.name: w for w in (Distill, Judge, Comparator, SFT)}


def make(ctx: Context) -> Workflow:
    return REGISTRY[ctx.cfg.orchestrator.workflow](ctx)


__all__ = ["REGISTRY", "Context", "PolicyWorkflow", "RewardSource", "StepSamples", "Workflow", "make"]
