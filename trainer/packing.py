"""Packed micro-batches: sequences concatenated into one row by a token budget, no padding.

A packed micro-batch of sequences of lengths ``L_0 .. L_{n-1}`` is one row ``[1, N]``, ``N = sum_i L_i``,
with ``position_ids`` restarting at 0 at each sequence (RoPE sees every sequence as if it were alone)
and ``cu_seqlens = [0, L_0, L_0 + L_1, ..., N]``.  Attention must not cross a sequence boundary:

- transformers 5.x builds a block-diagonal causal mask by itself when it gets ``position_ids``, no
  ``attention_mask`` and no cache (``masking_utils.find_packed_sequence_indices``).  It is silent about the
  condition: with the config's default ``use_cache=True`` (train mode included, transformers 5.19) a
  ``DynamicCache`` is made first, detection is skipped and the sequences attend to each other.  And SDPA
  on the CPU then scores all ``N^2`` query-key pairs of the row: with 32 sequences of ~120 tokens, ~32x
  the attention work of the sequences alone (``sum_i L_i^2``);
- :func:`segment_attention` (registered as the attention implementation ``"opd_segments"``) runs causal
  SDPA on each ``cu_seqlens`` segment separately, ``sum_i L_i^2`` pairs, as flash-attention's varlen
  kernel does on a GPU.  Without ``cu_seq_lens_q`` it is exactly transformers' SDPA (with transformers'
  own mask, block-diagonal included), so a padded batch and a model called without the segments are
  computed as before.

Only the positions that predict a completion token are sent through the lm-head and log-softmax
(``logits_to_keep`` as a tensor of positions: transformers gathers ``hidden[:, keep]`` before the head),
so neither the prompt nor padding costs a ``V``-way softmax (V = 49k on SmolLM2).

The micro-batch plan is a pure function of the sequence lengths, so the orchestrator can agree the
number of micro-batches for every rank (FSDP2's collectives need the same count on each) from the same
lengths the ranks will pack (:func:`micro_batch_count`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

ATTENTION = "opd_segments"


def plan_micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of the sequences of each micro-batch: first-fit decreasing into bins of ``budget`` tokens.

    Sequences are taken longest first (ties by index) and each goes into the first micro-batch it fits in,
    else opens a new one; a sequence longer than ``budget`` gets a micro-batch of its own.  Indices keep
    their input order inside a micro-batch.  Deterministic: the same lengths give the same plan.
    """
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def micro_batch_count(share_lengths: Sequence[Sequence[int]], micro_batch_size: int, micro_batch_tokens: int) -> int:
    """Micro-batches every rank runs: the most any rank's share needs.

    ``micro_batch_tokens = 0``: ``ceil(sequences / micro_batch_size)`` of the largest share (sequences dealt
    round-robin); otherwise the largest :func:`plan_micro_batches` over the shares.  A rank that needs
    fewer runs zero-weight passes so that the collectives line up.
    """
    if not micro_batch_tokens:
        return -(-max(len(s) for s in share_lengths) // micro_batch_size)
    return max(len(plan_micro_batches(s, micro_batch_tokens)) for s in share_lengths)


class MicroBatch(NamedTuple):
    """One micro-batch's model inputs and its per-token arrays (``M`` predicted completion tokens).

    ``model_kwargs`` go to the forward as they are and include ``logits_to_keep``, the positions whose
    logits predict the tokens in ``targets``; every per-token array has the shape of ``targets``.
    """

    model_kwargs: dict
    targets: Tensor  # [B, M] the tokens the kept logits predict
    mask: Tensor  # 1 on policy samples' completion tokens
    inference_logprobs: Tensor
    advantages: Tensor
    lockin: Tensor  # supervised weight on policy samples' completion tokens
    corrective: Tensor  # supervised weight on non-policy (teacher-answer) samples' completion tokens


def padded(samples: Sequence, pad_id: int, device: torch.device | str = "cpu") -> MicroBatch:
    """Right-padded ``[n, T]`` rows (``trainer.micro_batch_tokens = 0``); per-token arrays ``[n, T - 1 - first]``.

    Only positions ``first .. T-2`` can predict a completion token (``first`` = the earliest
    ``prompt_len - 1`` in the micro-batch), so the lm-head runs there only; per-token arrays are placed at
    the position that predicts each token and are 0 on prompt and padding positions.
    """
    length = max(len(s.input_ids) for s in samples)
    first = min(s.prompt_len for s in samples) - 1
    n = len(samples)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    attn = torch.zeros((n, length), dtype=torch.long)
    mask, inf_lp, adv, lockin, corrective = (torch.zeros((n, length - 1 - first)) for _ in range(5))
    for i, s in enumerate(samples):
        L = len(s.input_ids)
        ids[i, :L] = torch.tensor(s.input_ids)
        attn[i, :L] = 1
        a, b = s.prompt_len - 1 - first, L - 1 - first  # logits at a..b-1 predict prompt_len..L-1
        if s.policy:
            mask[i, a:b] = 1
            inf_lp[i, a:b] = torch.tensor(s.inference_logprobs)
            adv[i, a:b] = torch.tensor(s.advantages)
        (lockin if s.policy else corrective)[i, a:b] = s.sft_weight
    ids, attn = ids.to(device), attn.to(device)
    kwargs = dict(input_ids=ids, attention_mask=attn, use_cache=False,
                  logits_to_keep=torch.arange(first, length - 1, device=device))
    return MicroBatch(kwargs, ids[:, first + 1:], *(t.to(device) for t in (mask, inf_lp, adv, lockin, corrective)))


def pack(samples: Sequence, device: torch.device | str = "cpu") -> MicroBatch:
    """Concatenate ``samples`` (``shared.wire.TrainSample``) into one row ``[1, N]``; arrays ``[1, M]``.

    Sample ``i`` at offset ``o`` with prompt length ``p`` and length ``L``: positions ``o + p - 1 ..
    o + L - 2`` predict its completion tokens ``input_ids[p:]`` (at ``o + p .. o + L - 1``), so
    ``logits_to_keep`` lists them and the per-token arrays follow the same order.  ``mask`` /
    ``inference_logprobs`` / ``advantages`` / ``lockin`` are set on policy samples, ``corrective`` on the
    others (``sft_weight``).  The forward gets ``position_ids`` restarting at 0 and the segment bounds
    ``cu_seq_lens_q = [0, L_0, L_0 + L_1, ..., N]`` that :func:`segment_attention` reads.
    """
    ids: list[int] = []
    pos: list[int] = []
    keep: list[int] = []
    per_token: dict[str, list[float]] = {k: [] for k in ("mask", "inf_lp", "adv", "lockin", "corrective")}
    bounds = [0]
    for s in samples:
        o, L, p = len(ids), len(s.input_ids), s.prompt_len
        zeros = [0.0] * (L - p)
        ids += s.input_ids
        pos += range(L)
        keep += range(o + p - 1, o + L - 1)
        per_token["mask"] += [1.0 if s.policy else 0.0] * (L - p)
        per_token["inf_lp"] += s.inference_logprobs if s.policy else zeros
        per_token["adv"] += s.advantages if s.policy else zeros
        per_token["lockin"] += [s.sft_weight] * (L - p) if s.policy else zeros
        per_token["corrective"] += zeros if s.policy else [s.sft_weight] * (L - p)
        bounds.append(len(ids))

    def row(x: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(x, dtype=dtype, device=device).unsqueeze(0)

    input_ids, keep_t = row(ids, torch.long), torch.tensor(keep, dtype=torch.long, device=device)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    kwargs = dict(input_ids=input_ids, position_ids=row(pos, torch.long), use_cache=False, logits_to_keep=keep_t,
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return MicroBatch(kwargs, input_ids[:, keep_t + 1], *(row(v, torch.float32) for v in per_token.values()))


def segment_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      cu_seq_lens_q: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """Causal attention inside each ``cu_seq_lens_q`` segment of a packed row; plain SDPA without segments.

    ``query`` ``[1, heads, N, d]``, ``key`` / ``value`` ``[1, kv_heads, N, d]``; returns ``[1, N, heads, d]``
    like transformers' SDPA.  Segment ``[a, b)`` attends only to itself with an ordinary causal mask, so
    its output equals the sequence run alone; the transformers mask built for the row is not used.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed row has batch size 1, got {query.shape[0]}")
    bounds = cu_seq_lens_q.tolist()
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                                   scaling=scaling, is_causal=True)[0] for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=1), None


def use_segment_attention(model: torch.nn.Module) -> None:
    """Register :func:`segment_attention` (with SDPA's mask builder) and make every transformers model inside
    ``model`` (a peft or FSDP2 wrapper included) use it."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m.config._attn_implementation = ATTENTION
