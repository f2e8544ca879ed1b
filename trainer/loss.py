"""The loss algebra: small pure functions over per-token tensors, each with its formula.

Shapes: ``[..., T]`` per-token tensors; ``mask`` is 1 on completion tokens that count.

Advantage of sampled completion token ``t`` of a rollout with task reward ``R`` (see
:func:`combined_advantages`)::

    A_t = adv_tau * A_task + teacher_tau * logp_T(t) - student_tau * logp_S(t)

with ``A_task`` the group-baselined reward (:func:`group_advantages`).  The defaults
(``adv_tau = 0``, ``teacher_tau = student_tau = kl_coef = 1``, per-token, discount 0) are the pure
reverse-KL advantage ``-(logp_S - logp_T)`` of on-policy distillation.
"""

from __future__ import annotations

from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor

# Positions per block when a function walks over ``[..., T, V]`` logits: only one block is ever
# held in float32, never the whole ``T x V`` (49k-vocabulary) log-softmax.
CHUNK = 256


def sanitize_logprobs(logprobs: Tensor, floor: float) -> tuple[Tensor, int]:
    """Replace NaN, -inf and anything below ``floor`` by ``floor``; return the count replaced.

    A teacher that assigns probability 0 to a sampled token would otherwise give an infinite
    advantage and blow up the update; clipping bounds that token's pull at ``-floor`` nats.
    """
    bad = torch.isnan(logprobs) | (logprobs < floor)
    return torch.where(bad, torch.full_like(logprobs, floor), logprobs), int(bad.sum())


# ----------------------------------------------------------------------------------------------
# Advantages


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


# ----------------------------------------------------------------------------------------------
# Per-position functions of the logits, computed block by block


def _blocks(logits: Tensor) -> Iterator[tuple[int, slice]]:
    """``(row, positions)`` blocks of at most :data:`CHUNK` positions of ``[B, T, V]`` logits."""
    rows, length = logits.shape[0], logits.shape[1]
    for b in range(rows):
        for s in range(0, length, CHUNK):
            yield b, slice(s, min(s + CHUNK, length))


def _as_3d(x: Tensor, tail: int) -> Tensor:
    """View ``x`` with its leading dims flattened, keeping the last ``tail`` dims."""
    return x.reshape(-1, *x.shape[x.dim() - tail :])


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for float32/bf16/fp16 logits, float64 for float64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


class _TokenLogprobs(torch.autograd.Function):
    """``logp_t = z_t[y_t] - logsumexp(z_t)``; backward ``d logp_t / d z_t = onehot(y_t) - softmax(z_t)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, token_ids: Tensor) -> Tensor:
        z, ids, acc = _as_3d(logits, 2), _as_3d(token_ids, 1), _acc(logits)
        out = torch.empty(ids.shape, dtype=acc, device=logits.device)
        lse = torch.empty_like(out)
        for b, s in _blocks(z):
            block = z[b, s].to(acc)
            lse[b, s] = torch.logsumexp(block, dim=-1)
            out[b, s] = block.gather(-1, ids[b, s].unsqueeze(-1)).squeeze(-1) - lse[b, s]
        ctx.save_for_backward(logits, token_ids, lse)
        return out.view(token_ids.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, token_ids, lse = ctx.saved_tensors
        acc = _acc(logits)
        z, ids, g = _as_3d(logits, 2), _as_3d(token_ids, 1), _as_3d(grad, 1).to(acc)
        dz = torch.empty_like(z)
        for b, s in _blocks(z):
            d = torch.exp(z[b, s].to(acc) - lse[b, s].unsqueeze(-1)) * -g[b, s].unsqueeze(-1)
            d.scatter_add_(-1, ids[b, s].unsqueeze(-1), g[b, s].unsqueeze(-1))
            dz[b, s] = d.to(dz.dtype)
        return dz.view(logits.shape), None


class _Entropy(torch.autograd.Function):
    """``H_t = -sum_v p_v log p_v = logsumexp(z_t) - sum_v p_v z_v``;
    backward ``dH_t / dz_v = -p_v (log p_v + H_t)``."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        z, acc = _as_3d(logits, 2), _acc(logits)
        out = torch.empty(z.shape[:2], dtype=acc, device=logits.device)
        lse = torch.empty_like(out)
        for b, s in _blocks(z):
            block = z[b, s].to(acc)
            lse[b, s] = torch.logsumexp(block, dim=-1)
            p = torch.exp(block - lse[b, s].unsqueeze(-1))
            out[b, s] = lse[b, s] - (p * block).sum(-1)
        ctx.save_for_backward(logits, lse, out)
        return out.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, lse, ent = ctx.saved_tensors
        acc = _acc(logits)
        z, g = _as_3d(logits, 2), _as_3d(grad, 1).to(acc)
        dz = torch.empty_like(z)
        for b, s in _blocks(z):
            logp = z[b, s].to(acc) - lse[b, s].unsqueeze(-1)
            d = -torch.exp(logp) * (logp + ent[b, s].unsqueeze(-1)) * g[b, s].unsqueeze(-1)
            dz[b, s] = d.to(dz.dtype)
        return dz.view(logits.shape)


def token_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """``log softmax(logits)[token]`` (float32; float64 for float64 logits) at each position of ``[..., T, V]`` logits.

    Computed :data:`CHUNK` positions at a time, forward and backward (the gradient
    ``onehot(token) - softmax(logits)`` is rebuilt per block from the saved ``logsumexp``), so a bf16
    model never holds a float32 copy of its whole ``T x V`` logits or log-softmax.
    """
    return _TokenLogprobs.apply(logits, token_ids)


def entropy(logits: Tensor) -> Tensor:
    """Entropy ``H_t = -sum_v p_v log p_v`` (nats) of the softmax at each position of ``[..., T, V]``
    logits, computed block by block (dtype as in :func:`token_logprobs`)."""
    return _Entropy.apply(logits)


# ----------------------------------------------------------------------------------------------
# Loss terms


def reference_kl(logp: Tensor, ref_logp: Tensor, estimator: Literal["k1", "k3"]) -> Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy.

    With ``d = ref_logp - logp``: ``k1 = -d = logp - ref_logp`` (unbiased, high variance, can be
    negative); ``k3 = exp(d) - d - 1`` (Schulman's estimator: unbiased, always >= 0, low variance).
    Used directly as a loss (as GRPO does), k3's gradient is ``(1 - p_ref/p) grad logp``, whose
    expectation is the gradient of KL(reference || policy): it pulls the policy back towards every
    token the reference likes.  k1's gradient is ``grad logp``, zero in expectation on policy samples.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown estimator {estimator!r}")


def masked_nll(logp: Tensor, weights: Tensor, normalizer: float) -> Tensor:
    """Weighted negative log-likelihood ``-sum_t w_t * logp_t / normalizer``.

    ``w_t`` is 0 outside the target tokens and the term's weight on them (a supervised term on the
    completion of a rewarded rollout, or on a teacher's answer).
    """
    return -(weights * logp).sum() / normalizer


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
