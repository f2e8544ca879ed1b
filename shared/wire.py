"""Typed messages between roles, encoded as msgpack with msgspec (nothing on our own wire is pickled).

Ray carries the bytes; the receiving side decodes them into exactly one of the known message types
(a tagged union), so an unknown message or an oversized frame is rejected, never executed.
"""

from __future__ import annotations

from typing import Union

import msgspec
from msgspec import Struct

MAX_FRAME_BYTES = 256 * 1024 * 1024


class WireError(ValueError):
    """A frame that is not one of our messages, or too large."""


class Rollout(Struct, tag=True, kw_only=True, omit_defaults=True):
    """One sampled completion of one prompt, with the sampler's per-token log-probs."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str = ""
    text: str = ""
    # the teacher's top-k token ids and log-probs at each completion position (trainer.loss.teacher_topk > 0),
    # attached once scored (orchestrator.roles.Scores.attach_topk); empty otherwise
    teacher_topk_ids: list[list[int]] = msgspec.field(default_factory=list)
    teacher_topk_logprobs: list[list[float]] = msgspec.field(default_factory=list)


# ``Rollout.finish_reason`` of a teacher answer that an external endpoint failed to give (after retries).
TEACHER_FAILED = "teacher_error"


class RolloutBatch(Struct, tag=True, kw_only=True):
    rollouts: list[Rollout]
    adapter_step: int = 0
    seconds: float = 0.0  # the engine's own time on the call (vLLM, an adapter's first load included)


class ScoreRequest(Struct, tag=True, kw_only=True, omit_defaults=True):
    """Score each completion after its teacher prompt (the teacher's prompt may carry extra context)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    topk: int = 0  # also return the teacher's top-k tokens and log-probs at each completion position


class ScoreResult(Struct, tag=True, kw_only=True, omit_defaults=True):
    """Teacher log-prob of every completion token (same lengths as the request's completions); ``failed``:
    indices of completions the teacher could not score (an external endpoint; their lists are empty)."""

    logprobs: list[list[float]]
    failed: list[int] = msgspec.field(default_factory=list)
    # with ScoreRequest.topk = k: per completion, per position, the k ids and log-probs (most likely first)
    topk_ids: list[list[list[int]]] = msgspec.field(default_factory=list)
    topk_logprobs: list[list[list[float]]] = msgspec.field(default_factory=list)
    seconds: float = 0.0  # the engine's own time on the call


class TrainSample(Struct, kw_only=True, omit_defaults=True):
    """A prompt + completion; per-completion-token arrays align with ``input_ids[prompt_len:]``.

    ``policy``: the completion was sampled by the student and enters the policy-gradient loss (and
    the reference-KL and entropy terms); ``sft_weight``: weight of a supervised NLL term on its
    completion tokens (a rewarded rollout's lock-in term).  A corrective sample carries the teacher's
    answer with ``policy = False``, ``sft_weight = corrective_coef`` and empty per-token arrays.
    """

    input_ids: list[int]
    prompt_len: int
    inference_logprobs: list[float]
    advantages: list[float]
    sft_weight: float = 0.0
    policy: bool = True
    # the teacher's top-k ids / log-probs per completion token (the top-k estimator, trainer/topk.py); empty = none
    topk_ids: list[list[int]] = msgspec.field(default_factory=list)
    topk_logprobs: list[list[float]] = msgspec.field(default_factory=list)


class TrainBatch(Struct, tag=True, kw_only=True):
    step: int
    samples: list[TrainSample]
    total_tokens: int  # completion tokens across all ranks: the loss normaliser
    num_micro_batches: int = 1  # the same on every rank, so FSDP's collectives line up
    micro_batch_tokens: int = 0  # > 0: pack micro-batches by this token budget (trainer/packing.py); 0: by count


# StepResult metrics that are sums over a rank's micro-batches; the orchestrator adds the ranks' up.
# ``loss/*`` are each term's contribution to the loss (already divided by the batch's policy tokens),
# ``ref_kl_sum`` / ``entropy_sum`` / ``ratio_sum`` sums over policy tokens, ``tokens`` their count.
SUMMED_METRICS = ("loss/policy", "loss/ref_kl", "loss/lockin", "loss/corrective", "loss/entropy", "ref_kl_sum",
                  "entropy_sum", "masked_low", "masked_high", "ratio_sum", "tokens", "loss/topk", "topk_kl_sum")


class StepResult(Struct, tag=True, kw_only=True):
    step: int
    metrics: dict[str, float]
    adapter_path: str = ""


Message = Union[Rollout, RolloutBatch, ScoreRequest, ScoreResult, TrainBatch, StepResult]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    data = _encoder.encode(msg)
    if len(data) > MAX_FRAME_BYTES:
        raise WireError(f"{type(msg).__name__} frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    return data


def decode(data: bytes, expect: type | None = None) -> Message:
    if len(data) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        msg = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise WireError(f"not a known message: {e}") from None
    if expect is not None and not isinstance(msg, expect):
        raise WireError(f"expected {expect.__name__}, got {type(msg).__name__}")
    return msg
