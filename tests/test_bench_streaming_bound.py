"""benchmarks/streaming_bound.py's arithmetic: stage times read from hand-made metrics rows, the flow-shop bound
against hand-worked values, and the summary's per-round ratios (its runs are the tiny pair's and the main job's,
which the engine tests and the committed results exercise)."""

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import streaming_bound  # noqa: E402


def _row(step, scale=1.0, **extra):
    """A synchronous step: sampling 0.3, scoring 0.2, training 0.25 (0.02 of it the optimizer, 0.01 the adapter),
    weight update 0.05 and 0.02 s of the orchestrator's own: 0.82 s."""
    return {"step": step, "time/step": 0.82 * scale, "time/inference": 0.3 * scale, "time/teacher": 0.2 * scale,
            "time/trainer": 0.25 * scale, "time/trainer_update": 0.02 * scale, "time/adapter_save": 0.01 * scale,
            "time/weight_update": 0.05 * scale, **extra}


def test_stage_times_split_a_step_into_chunk_work_and_work_done_once():
    rows = [{"step": 0, "eval/reverse_text/avg": 0.1}, _row(1, scale=10.0), _row(2, scale=10.0),
            *(_row(s) for s in range(3, 7))]
    got = streaming_bound.stage_times(rows)  # steps 1..2 (warm-up, 10x slower) left out
    assert got["s"] == pytest.approx(0.3) and got["t"] == pytest.approx(0.2)
    assert got["r"] == pytest.approx(0.22)  # 0.25 less the optimizer and the adapter
    assert got["once"] == pytest.approx(0.05 + 0.02 + 0.03)  # weight update, orchestrator, optimizer + adapter
    assert got["s"] + got["t"] + got["r"] + got["once"] == pytest.approx(got["step"])


def test_stage_times_refuse_asynchronous_or_incomplete_rows():
    with pytest.raises(ValueError, match="step 1: the roles overlapped"):
        streaming_bound.stage_times([_row(1, **{"time/overlap": 0.1})])
    bare = _row(1)
    del bare["time/trainer_update"]
    with pytest.raises(ValueError, match="step 1: no time/trainer_update in metrics.jsonl"):
        streaming_bound.stage_times([bare])
    with pytest.raises(ValueError, match="no training steps"):
        streaming_bound.stage_times([{"step": 0, "eval/x/avg": 0.0}])


def test_bound_is_the_flow_shop_makespan_plus_the_work_done_once():
    whole = {"s": 0.3, "t": 0.2, "r": 0.22, "once": 0.1, "step": 0.82}
    assert streaming_bound.bound(whole, whole, 1) == pytest.approx(0.82)  # c = 1: the step itself
    # halves that cost 0.25 / 0.11 / 0.12: sampling is the bottleneck, paid twice; the rest once each
    half = {"s": 0.25, "t": 0.11, "r": 0.12, "once": 0.09, "step": 0.57}
    assert streaming_bound.bound(half, whole, 2) == pytest.approx(0.25 + 0.11 + 0.12 + 0.25 + 0.1)
    # quarters: three more chunks of the slowest stage
    quarter = {"s": 0.22, "t": 0.06, "r": 0.07}
    assert streaming_bound.bound(quarter, whole, 4) == pytest.approx(0.35 + 3 * 0.22 + 0.1)


def test_summarise_takes_ratios_within_each_round():
    runs = []
    for k, slow in ((0, 1.0), (1, 2.0)):  # round 1 twice as slow: the ratios are the same
        for c, (s, t, r) in ((1, (0.3, 0.2, 0.22)), (2, (0.25, 0.11, 0.12))):
            runs.append({"round": k, "c": c, "s": s * slow, "t": t * slow, "r": r * slow, "once": 0.1 * slow,
                         "step": (s + t + r + 0.1) * slow})
    table = streaming_bound.summarise(runs, (1, 2))
    assert table[1]["ratio"]["median"] == pytest.approx(1.0)
    assert table[2]["ratio"] == {"min": pytest.approx(0.83 / 0.82), "median": pytest.approx(0.83 / 0.82),
                                 "max": pytest.approx(0.83 / 0.82), "n": 2}
    assert table[2]["scale"]["s"]["median"] == pytest.approx(0.25 / 0.3)
    assert table[2]["bound"] == pytest.approx(0.83 * 1.5)  # mean over the rounds: 0.83 and 1.66
    text = streaming_bound.markdown("python benchmarks/streaming_bound.py", streaming_bound.SETUPS["tiny"],
                                    [dict(r, load_before=1.0, load_after=1.2, wall_s=9.0, steps=12) for r in runs],
                                    table)
    assert "| 2 | 64 | 375 | 165 | 180 | 150 | 870 | 0.83 (0.83–0.83) |" in text
    assert "Best c = 2: bound / measured step 1.01; streaming cannot make a synchronous step faster here." in text


def test_chunk_counts_divide_the_batch_and_alternate():
    assert streaming_bound.chunk_counts(streaming_bound.SETUPS["tiny"], quick=False) == (1, 2, 4)
    assert streaming_bound.chunk_counts(streaming_bound.QUICK, quick=True) == (1, 2)
    with pytest.raises(ValueError, match="batch_size 6 does not split into 4 chunks"):
        streaming_bound.chunk_counts(streaming_bound.QUICK._replace(batch_size=6), quick=False)
    assert streaming_bound.order((1, 2, 4), 0) == (1, 2, 4) and streaming_bound.order((1, 2, 4), 1) == (4, 2, 1)
