"""The advantage algebra: small pure functions from rewards and per-token log-probs to advantages.

The orchestrator forms the advantages (it holds the rewards and both models' log-probs); the trainer
only consumes them (``trainer/loss.py``), so this lives in ``shared/``.  Shapes: ``[..., T]``
per-token tensors of a completion's sampled tokens.

Advantage of sampled completion token ``t`` of a rollout with task reward ``R`` (see
:func:`combined_advantages`)::

    A_t = adv_tau * A_task + teacher_tau * logp_T(t) - student_tau * logp_S(t)

with ``A_task`` the group-baselined reward (:func:`group_advantages`).  The defaults
(``adv_tau = 0``, ``teacher_tau = student_tau = kl_coef = 1``, per-token, discount 0) are the pure
reverse-KL advantage ``-(logp_S - logp_T)`` of on-policy distillation.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor


def sanitize_logprobs(logprobs: Tensor, floor: float) -> tuple[Tensor, int]:
    """Replace NaN, -inf and anything below ``floor`` by ``floor``; return the count replaced.

    A teacher that assigns probability 0 to a sampled token would otherwise give an infinite
    advantage and blow up the update; clipping bounds that token's pull at ``-floor`` nats.
    """
    bad = torch.isnan(logprobs) | (logprobs < floor)
    return torch.where(bad, torch.full_like(logprobs, floor), logprobs), int(bad.sum())


def group_advantages(rewards: Sequence[float], group_ids: Sequence[int], std_scale: bool = False) -> list[float]:
    """Task advantage of each rollout: its reward minus the mean reward of its prompt's group.

    ``A_i = R_i - mean_{j: g_j = g_i} R_j``; with ``std_scale``, ``A_i / (std_g + 1e-6)`` where
    ``std_g`` is the population standard deviation of the group's rewards (a group whose rewards are
    all equal gets 0, not a division by zero).  Rollouts of one prompt share a group id.
    """
    if len(rewards) != len(group_ids):
        raise ValueError(f"{len(rewards)} rewards but {len(group_ids)} group ids")
    groups: dict[int, list[float]] = {}
    for r, g in zip(rewards, group_ids):
        groups.setdefault(g, []).append(float(r))
    stats = {}
    for g, rs in groups.items():
        mean = sum(rs) / len(rs)
        std = (sum((r - mean) ** 2 for r in rs) / len(rs)) ** 0.5
        stats[g] = (mean, std + 1e-6 if std_scale else 1.0)
    return [(float(r) - stats[g][0]) / stats[g][1] for r, g in zip(rewards, group_ids)]


def discounted_sum(x: Tensor, discount: float) -> Tensor:
    """Reward-to-go along the last axis: ``out_t = sum_{k >= t} discount^(k - t) * x_k``.

    ``discount = 0`` returns ``x`` (each token answers only for itself); ``discount = 1`` gives each
    token the sum of the terms from it to the end of the sequence.
    """
    if discount == 0.0:
        return x.clone()
    out = torch.empty_like(x)
    running = torch.zeros_like(x[..., 0])
    for t in range(x.shape[-1] - 1, -1, -1):
        running = x[..., t] + discount * running
        out[..., t] = running
    return out


def combined_advantages(
    student_lp: Tensor,
    teacher_lp: Tensor,
    a_task: float | Tensor,
    adv_tau: float,
    teacher_tau: float,
    student_tau: float,
    level: Literal["token", "sequence"] = "token",
    discount: float = 0.0,
) -> Tensor:
    """Per-token advantage of one sampled completion (``[..., T]`` log-probs of the sampled tokens).

    Per-token KL term ``k_t = teacher_tau * logp_T(t) - student_tau * logp_S(t)``, then

    - ``level = "token"``: ``A_t = adv_tau * A_task + sum_{k >= t} discount^(k - t) * k_k``
      (``discount = 0``: ``A_t = adv_tau * A_task + k_t``);
    - ``level = "sequence"``: every token gets the summed sequence term,
      ``A_t = adv_tau * A_task + sum_k k_k`` (``discount`` must be 0).

    ``teacher_tau = student_tau = c`` makes ``k_t = -c * (logp_S - logp_T)``, ``-c`` times a
    one-sample estimate of the per-token reverse KL(student || teacher).  ``a_task`` is a scalar (or
    broadcastable ``[..., 1]`` tensor) per sequence: the group-baselined task reward.
    """
    k = teacher_tau * teacher_lp - student_tau * student_lp
    if level == "sequence":
        if discount:
            raise ValueError("a discount only applies to kl_level = 'token'")
        k = k.sum(-1, keepdim=True).expand_as(k)
    elif level == "token":
        k = discounted_sum(k, discount)
    else:
        raise ValueError(f"unknown level {level!r}")
    return adv_tau * a_task + k


def reverse_kl_advantages(student_logprobs: Tensor, teacher_logprobs: Tensor, kl_coef: float) -> Tensor:
    """Per-token on-policy distillation advantage ``A_t = -kl_coef * (logp_S(t) - logp_T(t))``.

    The special case ``adv_tau = 0``, ``teacher_tau = student_tau = kl_coef``, per token, discount 0
    of :func:`combined_advantages`: on tokens sampled from the student, ``logp_S - logp_T`` is a
    one-sample estimate of the per-token reverse KL(student || teacher); its negative as the advantage
    makes the policy gradient minimise that KL.
    """
    return combined_advantages(student_logprobs, teacher_logprobs, 0.0, 0.0, kl_coef, kl_coef)


def subtract_baseline(advantages: list[Tensor]) -> list[Tensor]:
    """``A_t - mean(A)`` over every token of the batch.

    A constant baseline b leaves the policy gradient unbiased (``E[grad log p] = 0`` for each token)
    while removing the common offset: with reverse-KL advantages that are almost all negative, every
    sampled token would otherwise be pushed down, and only the differences between tokens carry signal.
    """
    if not advantages:
        return advantages
    mean = torch.cat(advantages).mean()
    return [a - mean for a in advantages]
