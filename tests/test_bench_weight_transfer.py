"""benchmarks/weight_transfer.py's reading of a run: pure logic against hand-made rows and folders (its runs are
the tiny pair's job, which the engine tests and the committed result exercise)."""

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import weight_transfer  # noqa: E402


def _rows(steps):
    rows = [{"step": 0, "eval/reverse_text/avg": 0.1}]
    for s in range(1, steps + 1):  # steps 1-2 are warm-up (slow); the rest alternate 0.5 / 0.7 s
        slow = s <= 2
        rows.append({"step": s, "time/step": 5.0 if slow else 0.5 + 0.2 * (s % 2),
                     "time/weight_update": 1.0 if slow else 0.01 * s, "time/adapter_save": 0.04})
    return rows + [{"step": steps, "eval/reverse_text/avg": 0.3}]


def test_run_summary_takes_medians_of_the_steady_steps_and_refuses_a_short_run():
    got = weight_transfer.run_summary(_rows(6), 6)  # steady: steps 3..6
    assert got["time/step"] == pytest.approx(0.6)  # 0.7, 0.5, 0.7, 0.5
    assert got["time/weight_update"] == pytest.approx(0.045)  # 0.03 .. 0.06
    assert got["time/adapter_save"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="the run trained 6 steps, not 8"):
        weight_transfer.run_summary(_rows(6), 8)


def test_complete_adapters_counts_only_marked_directories(tmp_path):
    for s in (1, 2, 3):
        (tmp_path / "broadcast" / f"step_{s}").mkdir(parents=True)
    (tmp_path / "broadcast" / "step_1" / "COMPLETE").write_text("1")
    (tmp_path / "broadcast" / "step_3" / "COMPLETE").write_text("3")
    assert weight_transfer.complete_adapters(tmp_path, 3) == 2
    assert weight_transfer.complete_adapters(tmp_path, 1) == 1
