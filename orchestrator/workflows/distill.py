"""On-policy distillation, hybrid and context distillation (``orchestrator.workflow = "distill"``).

The student samples, the teacher scores every sampled token, and each token's advantage is
``A_t = adv_tau * A_task + teacher_tau * logp_T(t) - student_tau * logp_S(t)``: with ``adv_tau = 0`` the
negative per-token reverse KL (on-policy distillation), with ``adv_tau > 0`` the environment's verifiable
reward as well (hybrid). Context distillation is the same workflow with a teacher that sees
``orchestrator.teacher_model.context`` (the renderer's teacher view); nothing here changes for it.

All of it is :class:`~orchestrator.workflows.base.PolicyWorkflow` with the environment's score as the reward.
"""

from __future__ import annotations

from orchestrator.workflows.base import PolicyWorkflow


class Distill(PolicyWorkflow):
    name = "distill"
