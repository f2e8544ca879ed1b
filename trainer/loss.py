"""The loss algebra: small pure functions over per-token tensors, each with its formula.

Shapes: ``[..., T]`` per-token tensors; ``mask`` is 1 on completion tokens that count.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sanitize_logprobs(logprobs: Tensor, floor: float) -> tuple[Tensor, int]:
    """Replace NaN, -inf and anything below ``floor`` by ``floor``; return the count replaced.

    A teacher that assigns probability 0 to a sampled token would otherwise give an infinite
    advantage and blow up the update; clipping bounds that token's pull at ``-floor`` nats.
    """
    bad = torch.isnan(logprobs) | (logprobs < floor)
    return torch.where(bad, torch.full_like(logprobs, floor), logprobs), int(bad.sum())


def reverse_kl_advantages(student_logprobs: Tensor, teacher_logprobs: Tensor, kl_coef: float) -> Tensor:
    """Per-token on-policy distillation advantage ``A_t = -kl_coef * (logp_S(t) - logp_T(t))``.

    On tokens sampled from the student, ``logp_S - logp_T`` is a one-sample estimate of the per-token
    reverse KL(student || teacher); using its negative as the advantage makes the policy gradient
    minimise that KL (discount 0: each token only answers for itself).
    """
    return -kl_coef * (student_logprobs - teacher_logprobs)


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


def token_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """``log softmax(logits)[token]`` for each position without storing the full log-softmax."""
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def policy_loss(
    logprobs: Tensor,
    inference_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ratio_low: float,
    ratio_high: float,
    normalizer: float,
) -> tuple[Tensor, dict[str, float]]:
    """Importance-weighted policy gradient with token masking of extreme ratios.

    ``r_t = exp(logp_train(t) - logp_inference(t))``; tokens with ``r_t`` outside
    ``[ratio_low, ratio_high]`` are dropped; ``loss = -sum_t keep_t * r_t * A_t / normalizer``
    (``normalizer`` = completion tokens in the whole batch, across ranks).  The gradient is
    ``-sum keep * r * A * grad logp / N``: the REINFORCE gradient, corrected for rollouts sampled by a
    slightly different (stale or numerically different) policy.
    """
    mask = mask.bool()
    log_ratio = (logprobs - inference_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    low = mask & (ratio < ratio_low)
    high = mask & (ratio > ratio_high)
    keep = (mask & ~low & ~high).to(logprobs.dtype)
    loss = -(keep * ratio * advantages).sum() / normalizer
    n = max(int(mask.sum()), 1)
    stats = {
        "masked_low": float(low.sum()),
        "masked_high": float(high.sum()),
        "ratio_mean": float((ratio.detach() * mask).sum() / n),
        "tokens": float(mask.sum()),
    }
    return loss, stats
