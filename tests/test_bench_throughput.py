"""benchmarks/throughput.py and the reading it shares with benchmarks/profile_run.py.

Pure logic against hand-made metrics rows; then ``--quick`` for real (4 tiny-pair steps through Ray and
vLLM on one start of the roles), checking only that its table, JSON and plot are well-formed.
"""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT, stop_process_group

sys.path.insert(0, str(ROOT / "benchmarks"))
import profile_run  # noqa: E402
import throughput  # noqa: E402


def run_quick(script: str, tmp_path, limit: float = 1500.0) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> --quick`` in a session of its own. Past ``limit`` seconds its process group
    gets SIGTERM (``rl``'s relay passes it on to its run), then everything of the session (the run and its Ray
    actors too) SIGKILL, and the test fails: a plain timeout would leave the run behind."""
    cmd = [sys.executable, f"benchmarks/{script}", "--quick", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        stop_process_group(proc, 60)
        pytest.fail(f"{script} --quick took more than {limit:.0f} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _row(step, inf, tea, tra, step_s, tokens=100.0, overlap=0.0):
    return {"step": step, "time/step": step_s, "time/inference": inf, "time/teacher": tea, "time/trainer": tra,
            "tokens/step": tokens, "time/weight_update": 0.05, "time/overlap": overlap}


def test_overlap_of_a_synchronous_and_a_perfect_step():
    # roles 1, 2, 3 s: perfect overlap takes max = 3 s, none takes sum = 6 s
    sync = profile_run.overlap(6.0, {"a": 1.0, "b": 2.0, "c": 3.0})
    assert sync["ideal_overlap_s"] == 3.0 and sync["no_overlap_s"] == 6.0
    assert sync["step_over_ideal"] == 2.0 and sync["step_over_sum"] == 1.0 and sync["overlap_realised"] == 0.0
    perfect = profile_run.overlap(3.0, {"a": 1.0, "b": 2.0, "c": 3.0})
    assert perfect["step_over_ideal"] == 1.0 and perfect["step_over_sum"] == 0.5 and perfect["overlap_realised"] == 1.0
    half = profile_run.overlap(4.5, {"a": 1.0, "b": 2.0, "c": 3.0})
    assert half["overlap_realised"] == pytest.approx(0.5)
    # one busy role: nothing to overlap, so "realised" is undefined rather than a division by zero
    assert math.isnan(profile_run.overlap(2.0, {"a": 2.0, "b": 0.0})["overlap_realised"])


def test_summarize_skips_warmup_and_eval_rows():
    rows = [{"step": 0, "eval/reverse_text/avg": 0.2, "time/startup_inference": 30.0, "time/startup_teacher": 31.0,
             "time/startup_trainer": 5.0}]
    rows += [_row(1, 9.0, 9.0, 9.0, 30.0), _row(2, 9.0, 9.0, 9.0, 30.0)]  # warm-up: left out (6 steps > 4)
    rows += [_row(s, 0.5, 0.25, 1.0, 2.0, tokens=200.0, overlap=0.5) for s in (3, 4, 5, 6)]
    rows.append({"step": 6, "eval/reverse_text/avg": 0.5})
    s = profile_run.summarize(rows, "r")
    assert s["steps"] == 4 and s["step_s"] == 2.0 and s["startup_inference_s"] == 30.0
    assert s["inference_tok_s"] == 400.0 and s["teacher_tok_s"] == 800.0 and s["trainer_tok_s"] == 200.0
    assert (s["inference_busy"], s["teacher_busy"], s["trainer_busy"]) == (0.25, 0.125, 0.5)
    assert s["ideal_overlap_s"] == 1.0 and s["no_overlap_s"] == 1.75 and s["overlap_s"] == 0.5
    assert s["step_over_ideal"] == 2.0 and s["step_over_sum"] == pytest.approx(2.0 / 1.75)
    assert s["slowest_role"] == "trainer"
    assert profile_run.summarize(rows[:1], "empty") == {"run": "empty", "steps": 0, "startup_inference_s": 30.0,
                                                         "startup_teacher_s": 31.0, "startup_trainer_s": 5.0}


def test_breakdown_splits_a_synchronous_step_into_parts_that_add_up_to_it():
    def row(step, scale=1.0, overlap=0.0):
        return {"step": step, "time/step": 1.0 * scale, "time/inference": 0.4 * scale,
                "time/inference_engine": 0.3 * scale, "time/teacher": 0.2 * scale, "time/teacher_engine": 0.15 * scale,
                "time/trainer": 0.3 * scale, "time/trainer_compute": 0.2 * scale, "time/adapter_save": 0.05 * scale,
                "time/weight_update": 0.02 * scale, "time/overlap": overlap}

    rows = [row(1, 9.0), row(2, 9.0)] + [row(s) for s in (3, 4, 5, 6)] + [{"step": 6, "eval/x/avg": 0.5}]
    parts = dict(profile_run.breakdown(rows))  # steps 1-2 (warm-up) left out
    expected = [0.3, 0.1, 0.15, 0.05, 0.2, 0.05, 0.05, 0.02, 0.08, 1.0]  # rest: 1 - (0.4 + 0.2 + 0.3 + 0.02)
    assert list(parts.values()) == pytest.approx(expected)
    assert sum(list(parts.values())[:-1]) == pytest.approx(parts["step"])
    table = profile_run.breakdown_markdown(list(parts.items()))
    assert "| **step** | **1000** | 100% |" in table and "| scoring: vLLM prompt_logprobs (teacher engine) | 150 | 15% |" in table
    assert profile_run.breakdown([row(s, overlap=0.1) for s in (1, 2)]) == []  # asynchronous: stages overlap
    assert profile_run.breakdown([{k: v for k, v in row(1).items() if k != "time/inference_engine"}]) == []


def test_schedule_alternates_and_balances_the_order():
    assert throughput.schedule(1) == [0, 1]
    assert throughput.schedule(3) == [0, 1, 1, 0, 0, 1]


def _run(setup, k, step_s, busy=(0.5, 0.25, 1.0), load=(1.0, 2.0)):
    s = profile_run.summarize([_row(i, *busy, step_s) for i in (1, 2)], f"k{k}")
    return {**s, "setup": setup, "k": k, "wall_s": 60.0, "load_before": load[0], "load_after": load[1]}


def test_aggregate_and_paired_speedups():
    runs = [_run("tiny", 0, 2.0), _run("tiny", 1, 1.0, load=(3.0, 0.5)), _run("tiny", 1, 1.5), _run("tiny", 0, 2.0)]
    agg = throughput.aggregate([r for r in runs if r["k"] == 1])
    assert agg["runs"] == 2 and agg["steps"] == 4 and agg["step_s"] == 1.25 and agg["load"] == (0.5, 3.0)
    assert agg["ideal_overlap_s"] == 1.0 and agg["no_overlap_s"] == 1.75 and agg["step_over_ideal"] == 1.25
    assert throughput.paired_speedups(runs) == {"tiny": [2.0, 2.0 / 1.5]}
    table = throughput.markdown([throughput.aggregate([runs[0], runs[3]]), agg],
                                throughput.paired_speedups(runs), "cmd")
    assert "| tiny | 1 | 2 × 2 | 1.250 | 1.000 | 1.750 | 1.25 | 0.71 | 0.67 |" in table
    assert "| tiny | 2 | 1.33 | 1.67 | 2.00 |" in table


def test_ratio_stats_rejects_what_is_not_a_ratio():
    assert profile_run.ratio_stats([2.0, 0.5, 1.0]) == {"min": 0.5, "median": 1.0, "max": 2.0, "n": 3}
    for bad in ([], [1.0, 0.0], [float("inf")], [float("nan")], [-1.0]):
        with pytest.raises(ValueError):
            profile_run.ratio_stats(bad)


@pytest.mark.engine
@pytest.mark.timeout(1800)  # ~2 min on a quiet machine; 10+ under other jobs' load (engine start-up ~170 s)
def test_quick_mode_writes_well_formed_results(tmp_path):
    proc = run_quick("throughput.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = next((tmp_path / "out").glob("throughput_*_quick.md")).read_text()
    table = [line for line in md.splitlines() if line.startswith("| tiny pair")]
    assert len(table) == 3  # K = 0, K = 1, and the paired step-time ratio
    for line in table[:2]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 16
        step, ideal, total = (float(c) for c in cells[3:6])
        assert 0 < ideal <= total and step > 0
        assert all(float(c) > 0 for c in cells[9:12])  # tokens/s of each role
    data = json.loads(next((tmp_path / "out").glob("throughput_*_quick.json")).read_text())
    assert [r["k"] for r in data["runs"]] == [0, 1] and all(r["steps"] == 2 for r in data["runs"])
    (startup,) = data["startup_s"].values()  # one start of the roles for both runs
    assert sorted(startup) == ["time/startup_inference", "time/startup_teacher", "time/startup_trainer"]
    assert all(v > 0 for v in startup.values())
    assert "One start of the roles per setup" in md
    for r in data["runs"]:
        assert r["tokens_per_step"] > 0 and 0 < r["inference_busy"] <= 1.0 + 1e-6

    from PIL import Image

    with Image.open(next((tmp_path / "out").glob("throughput_*_quick.png"))) as im:
        assert im.size[0] > 200 and im.size[1] > 200
