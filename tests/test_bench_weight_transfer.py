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


def test_markdown_gives_the_ratio_table_and_one_row_per_run():
    runs = [{"pair": 0, "side": side, "load": 1.5, "run_s": 50.0, "adapters": 20, "time/step": step,
             "time/weight_update": upd, "time/adapter_save": save}
            for side, step, upd, save in (("filesystem", 0.6, 0.015, 0.04), ("memory", 0.54, 0.02, 0.005))]
    ratios = {key: weight_transfer.ratio_stats([runs[1][key] / runs[0][key]]) for key, _ in weight_transfer.KEYS}
    text = weight_transfer.markdown("python benchmarks/weight_transfer.py", runs, ratios, 20)
    assert "| step (s) | 0.90 | 0.90 | 0.90 | 1 |" in text
    assert "| weight update (s) | 1.33 | 1.33 | 1.33 | 1 |" in text
    assert "| 0 | memory | 540 ms | 20 ms | 5 ms | 20/20 | 50 | 1.5 |" in text
