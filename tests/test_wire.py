"""Wire codec: typed msgpack messages; anything else is a WireError."""

from __future__ import annotations

import math

import msgspec
import pytest

import shared.wire as wire
from shared.wire import (
    Rollout,
    RolloutBatch,
    ScoreRequest,
    ScoreResult,
    StepResult,
    TrainBatch,
    TrainSample,
    WireError,
    decode,
    encode,
)

_rollout = Rollout(
    prompt_index=3, prompt_ids=[1, 2, 3], completion_ids=[4, 5], logprobs=[-0.5, -1.25], finish_reason="stop", text="ab"
)
MESSAGES = [
    _rollout,
    Rollout(prompt_index=0, prompt_ids=[], completion_ids=[], logprobs=[]),
    RolloutBatch(rollouts=[_rollout, _rollout], adapter_step=7),
    RolloutBatch(rollouts=[]),
    ScoreRequest(prompt_ids=[[1, 2], [3]], completion_ids=[[4], [5, 6]]),
    ScoreResult(logprobs=[[-0.1], [-2.0, -3.5]]),
    TrainBatch(
        step=2,
        samples=[TrainSample(input_ids=[1, 2, 3, 4], prompt_len=2, inference_logprobs=[-1.0, -2.0], advantages=[0.5, -0.5])],
        total_tokens=2,
        num_micro_batches=1,
    ),
    StepResult(step=5, metrics={"loss": 0.25, "kl": 1.5}, adapter_path="/tmp/adapter-5"),
    StepResult(step=0, metrics={}),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = encode(msg)
    assert isinstance(data, bytes)
    assert decode(data) == msg
    assert decode(data, expect=type(msg)) == msg
    assert type(decode(data)) is type(msg)


def test_every_message_type_is_covered():
    assert {type(m) for m in MESSAGES} == set(wire.Message.__args__)


def test_round_trip_non_finite_floats():
    msg = ScoreResult(logprobs=[[float("-inf"), float("nan")]])
    (row,) = decode(encode(msg), expect=ScoreResult).logprobs
    assert row[0] == float("-inf") and math.isnan(row[1])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"not msgpack at all",
        b"\x93\x01\x02",  # truncated array
        msgspec.msgpack.encode(42),
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode({"prompt_index": 1}),  # no tag
        msgspec.msgpack.encode({"type": "Evil", "cmd": "rm -rf /"}),  # unknown tag
        msgspec.msgpack.encode({"type": "TrainSample", "input_ids": [], "prompt_len": 0, "inference_logprobs": [], "advantages": []}),
        msgspec.msgpack.encode({"type": "StepResult", "step": "five", "metrics": {}}),  # known tag, bad field
        msgspec.msgpack.encode({"type": "StepResult"}),  # missing required fields
        msgspec.msgpack.Ext(1, b"pickle"),
    ],
    ids=lambda d: repr(d)[:30],
)
def test_garbage_raises_wire_error(data):
    if isinstance(data, msgspec.msgpack.Ext):
        data = msgspec.msgpack.encode(data)
    with pytest.raises(WireError):
        decode(data)


def test_unknown_tag_message_names_the_problem():
    with pytest.raises(WireError, match="not a known message"):
        decode(msgspec.msgpack.encode({"type": "Evil"}))


def test_wrong_expected_type_raises_wire_error():
    data = encode(MESSAGES[0])
    with pytest.raises(WireError, match="expected StepResult, got Rollout"):
        decode(data, expect=StepResult)


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)


def test_oversized_frame_on_encode(monkeypatch):
    monkeypatch.setattr(wire, "MAX_FRAME_BYTES", 64)
    small = ScoreResult(logprobs=[[-1.0]])
    assert decode(encode(small)) == small
    big = ScoreResult(logprobs=[[-1.0] * 100])
    with pytest.raises(WireError, match="exceeds 64"):
        encode(big)


def test_oversized_frame_on_decode(monkeypatch):
    data = encode(ScoreResult(logprobs=[[-1.0] * 100]))
    monkeypatch.setattr(wire, "MAX_FRAME_BYTES", len(data) - 1)
    with pytest.raises(WireError, match="exceeds"):
        decode(data)
    monkeypatch.setattr(wire, "MAX_FRAME_BYTES", len(data))
    assert decode(data).logprobs == [[-1.0] * 100]  # exactly at the limit is fine
