"""The top-k teacher estimator: a KL over the teacher's top-k tokens plus a tail bucket, at every position.

The sampled-token estimator (``shared/advantages.py``) sees one token per position: ``logp_S(y) - logp_T(y)``
for the token ``y`` the student drew, a one-sample estimate of the per-position reverse KL whose gradient
reaches the student through the policy gradient.  With ``trainer.loss.teacher_topk = k`` the teacher also
returns its ``k`` most likely tokens ``S_t`` and their log-probs at each completion position, and the trainer
sums over them instead of sampling: with the student's ``p = softmax(z_t / T)`` (``T``: the run's sampling
temperature, :func:`shared.sampling.policy_temperature`) and the teacher's ``q``, both collapsed onto the
``k + 1`` buckets ``{v}`` for ``v`` in ``S_t`` and the tail ``V \\ S_t``
(``P_tail = 1 - sum_{v in S} p_v``, ``Q_tail = 1 - sum_{v in S} q_v``)::

    reverse  KL(p || q) = sum_{v in S} p_v log(p_v / q_v) + P_tail log(P_tail / Q_tail)
    forward  KL(q || p) = sum_{v in S} q_v log(q_v / p_v) + Q_tail log(Q_tail / P_tail)
    KL_t = beta * reverse + (1 - beta) * forward          (beta = trainer.loss.topk_reverse_weight)

and the loss adds ``topk_coef * sum_t mask_t * KL_t / N`` (``N``: the batch's policy tokens, as every term).
Its gradient is exact at each position (no sampling over the next token).  Collapsing onto buckets can only
lower a KL (the data-processing inequality), so ``KL_t`` is a lower bound of the full-vocabulary KL that is
tight when the tail holds no mass, e.g. ``k = V``.

Direction: reverse by default (``beta = 1``).  It is the quantity the sampled-token estimator and the
``teacher_kl`` metric estimate, on the same positions (the student's own rollouts), so switching estimator
changes the variance and not the objective; it is mode-seeking (the student is not pushed to spread mass
over every token the teacher allows, which a small student cannot do well), as in on-policy distillation
(Agarwal et al. 2024, GKD; Gu et al. 2024, MiniLLM).  Its gradient with respect to the student's logits is
``p_v (log(P_b / Q_b) - KL)`` for ``v`` in bucket ``b``: a token the teacher ranks low loses mass in
proportion to how much the student gives it.  Forward (``beta = 0``, the classical KD direction) is
mode-covering, gradient ``p_v - q_v`` on the support and ``p_v (1 - Q_tail / P_tail)`` in the tail; the
mixture interpolates (GKD's experiments find the best ``beta`` task-dependent).

The teacher's log-probs are its own (temperature 1, as vLLM's ``prompt_logprobs`` always are): what the
student learns to match at the sampling temperature is the teacher itself (docs/workflows.md, "The sampling
temperature").  A teacher log-prob below ``logprob_floor`` (or NaN) is clipped to it, and so is the log of the
teacher's tail, so a teacher whose top-k sum to 1 (or a little more, by rounding) gives a tail of
``exp(floor)``, not ``log 0``; the forward direction clips the student's tail the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.loss import _acc, _as_3d, _blocks


class _SupportLogprobs(torch.autograd.Function):
    """``(logp[..., K], log_tail)`` of logits ``z`` at ``ids``: ``logp_k = z[id_k] - lse(z)`` and
    ``log_tail = lse(z[v not in ids]) - lse(z)`` (``-inf`` when the ids cover the vocabulary).

    Backward, for incoming ``g_k`` and ``g_tail``::

        d/dz_v = sum_k g_k ([v = id_k] - p_v) + g_tail ([v not in ids] p_v / P_tail - p_v)
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        z, idx, acc = _as_3d(logits, 2), _as_3d(ids, 2), _acc(logits)
        out = torch.empty(idx.shape, dtype=acc, device=logits.device)  # (R, T, K)
        lse = torch.empty(idx.shape[:2], dtype=acc, device=logits.device)  # (R, T)
        lse_tail = torch.empty_like(lse)
        for b, s in _blocks(z):
            block = z[b, s].to(acc)  # (t, V)
            lse[b, s] = torch.logsumexp(block, dim=-1)
            out[b, s] = block.gather(-1, idx[b, s]) - lse[b, s].unsqueeze(-1)
            lse_tail[b, s] = torch.logsumexp(block.scatter(-1, idx[b, s], float("-inf")), dim=-1)
        ctx.save_for_backward(logits, ids, lse, lse_tail)
        return out.view(ids.shape), (lse_tail - lse).view(ids.shape[:-1])

    @staticmethod
    def backward(ctx, g: Tensor, g_tail: Tensor):
        logits, ids, lse, lse_tail = ctx.saved_tensors
        acc = _acc(logits)
        z, idx = _as_3d(logits, 2), _as_3d(ids, 2)
        g, g_tail = _as_3d(g, 2).to(acc), _as_3d(g_tail, 1).to(acc)
        dz = torch.empty_like(z)
        for b, s in _blocks(z):
            block = z[b, s].to(acc)
            p = torch.exp(block - lse[b, s].unsqueeze(-1))  # (t, V)
            gt = g_tail[b, s].unsqueeze(-1)
            # the tail's own softmax; none (0) where the ids cover the vocabulary (lse_tail = -inf)
            finite = torch.isfinite(lse_tail[b, s]).unsqueeze(-1)
            tail_p = torch.where(finite, torch.exp(block - torch.where(finite, lse_tail[b, s].unsqueeze(-1), 0.0)), 0.0)
            tail_p = tail_p.scatter(-1, idx[b, s], 0.0)
            d = -(g[b, s].sum(-1, keepdim=True) + gt) * p + gt * tail_p
            d.scatter_add_(-1, idx[b, s], g[b, s])
            dz[b, s] = d.to(dz.dtype)
        return dz.view(logits.shape), None


def support_logprobs(logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The student's ``log softmax(logits)`` at ``ids`` (``[..., T, K]``) and the log of its mass outside them
    (``[..., T]``), for ``[..., T, V]`` logits; computed a block of positions at a time like
    :func:`trainer.loss.token_logprobs` (float32, or float64 for float64 logits).  The ids of one position
    must be distinct."""
    return _SupportLogprobs.apply(logits, ids)


def teacher_tail(teacher_lp: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """The teacher's top-k log-probs clipped to ``floor`` (NaN too) and the log of its tail mass
    ``log(1 - sum_k q_k)``, clipped to ``floor`` (never ``log 0``)."""
    lq = torch.nan_to_num(teacher_lp, nan=floor).clamp(min=floor)
    mass = torch.exp(lq).sum(-1)
    return lq, torch.log1p(-mass.clamp(max=1.0)).clamp(min=floor)


def topk_kl(student_lp: Tensor, student_log_tail: Tensor, teacher_lp: Tensor, reverse_weight: float,
            floor: float) -> Tensor:
    """Per-position ``KL_t = beta * KL(p || q) + (1 - beta) * KL(q || p)`` over the buckets ``S_t`` + tail
    (module docstring): ``student_lp`` / ``teacher_lp`` ``[..., T, K]`` at the teacher's top-k ids,
    ``student_log_tail`` ``[..., T]`` from :func:`support_logprobs`; returns ``[..., T]``."""
    lq, lq_tail = teacher_tail(teacher_lp, floor)
    kl = torch.zeros_like(student_log_tail)
    if reverse_weight > 0:
        has_tail = torch.isfinite(student_log_tail)
        lp_tail = torch.where(has_tail, student_log_tail, 0.0)  # a tail of mass 0 adds 0 (and no NaN gradient)
        tail = torch.where(has_tail, torch.exp(lp_tail) * (lp_tail - lq_tail), 0.0)
        rev = (torch.exp(student_lp) * (student_lp - lq)).sum(-1) + tail
        kl = kl + reverse_weight * rev
    if reverse_weight < 1:
        lp_tail = student_log_tail.clamp(min=floor)
        fwd = (torch.exp(lq) * (lq - student_lp)).sum(-1) + torch.exp(lq_tail) * (lq_tail - lp_tail)
        kl = kl + (1.0 - reverse_weight) * fwd
    return kl


def topk_tensors(samples, length: int, first: int, floor: float) -> tuple[Tensor, Tensor] | None:
    """The teacher's top-k ids and log-probs of a micro-batch placed like the trainer's per-token arrays
    (``trainer/worker.py`` ``_micro_batch``: position ``prompt_len - 1 - first + j`` predicts completion token
    ``j``), ``[n, length - 1 - first, K]`` each; positions without any (prompts, padding, non-policy samples)
    hold id 0 and log-prob ``floor`` (finite; the mask zeroes them).  None when no sample carries any."""
    k = max((len(row) for s in samples for row in (getattr(s, "topk_ids", None) or [])[:1]), default=0)
    if not k:
        return None
    ids = torch.zeros((len(samples), length - 1 - first, k), dtype=torch.long)
    lps = torch.full((len(samples), length - 1 - first, k), floor, dtype=torch.float32)
    for i, s in enumerate(samples):
        if getattr(s, "policy", True) and getattr(s, "topk_ids", None):
            a = s.prompt_len - 1 - first
            n = len(s.topk_ids)
            ids[i, a:a + n] = torch.tensor(s.topk_ids, dtype=torch.long)
            lps[i, a:a + n] = torch.tensor(s.topk_logprobs, dtype=torch.float32)
    return ids, lps


def packed_topk_tensors(samples, floor: float) -> tuple[Tensor, Tensor] | None:
    """The same for a packed row (``trainer/packing.py`` :func:`~trainer.packing.pack`): the per-token arrays
    there list only completion positions, sample after sample, so the result is ``[1, M, K]`` with ``M`` the
    micro-batch's completion tokens; a sample without top-k entries (non-policy, or unscored) holds id 0 and
    log-prob ``floor``.  None when no sample carries any."""
    k = max((len(row) for s in samples for row in (getattr(s, "topk_ids", None) or [])[:1]), default=0)
    if not k:
        return None
    ids: list[list[int]] = []
    lps: list[list[float]] = []
    for s in samples:
        n = len(s.input_ids) - s.prompt_len
        have = s.topk_ids if getattr(s, "policy", True) and getattr(s, "topk_ids", None) else []
        ids += list(have[:n]) + [[0] * k] * (n - len(have[:n]))
        lps += list(s.topk_logprobs[:n] if have else []) + [[floor] * k] * (n - len(have[:n]))
    return (torch.tensor(ids, dtype=torch.long).unsqueeze(0), torch.tensor(lps, dtype=torch.float32).unsqueeze(0))
