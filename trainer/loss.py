"""The loss algebra: small pure functions over per-token tensors, each with its formula.

Shapes: ``[..., T]`` per-token tensors; ``mask`` is 1 on completion tokens that count.  The advantages
these losses weight arrive with the batch, formed by the orchestrator (``shared/advantages.py``).
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
from torch import Tensor

# Positions per block when a function walks over ``[..., T, V]`` logits: only one block is ever
# held in float32, never the whole ``T x V`` (49k-vocabulary) log-softmax.
CHUNK = 256


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
