"""benchmarks/forgetting.py: the table and summary from metrics.jsonl files written here by hand (no run started),
and the experiment TOMLs it runs (loaded, not run)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import forgetting as fg  # noqa: E402

CORES = ("arithmetic", "format_check")


def _write_run(path, french, arith, fmt, teacher=None):
    """A metrics.jsonl as a run writes it: a start evaluation (step 0), training rows, a middle evaluation and the
    end evaluation; ``french``/``arith``/``fmt`` are (start, middle, end) scores."""
    rows = [{"step": 0, "eval/french/avg": french[0], "eval/core/arithmetic/avg": arith[0],
             "eval/core/format_check/avg": fmt[0], "eval/core/arithmetic/delta_from_start": 0.0}]
    if teacher is not None:  # eval_baseline: the teacher with its context, on the new and the core behaviours
        rows[0].update({"eval/french/baseline_teacher/avg": teacher, "eval/core/arithmetic/baseline_teacher/avg": 0.25,
                        "eval/core/format_check/baseline_teacher/avg": 0.5})
    rows += [{"step": s, "teacher_kl": 0.3, "loss/sft": 1.0} for s in range(1, 5)]
    rows.append({"step": 2, "eval/french/avg": french[1], "eval/core/arithmetic/avg": arith[1],
                 "eval/core/format_check/avg": fmt[1]})
    rows.append({"step": 4, "eval/french/avg": french[2], "eval/core/arithmetic/avg": arith[2],
                 "eval/core/format_check/avg": fmt[2]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "torn', encoding="utf-8")
    return path


@pytest.fixture
def runs(tmp_path):
    from shared.metrics import read_metrics

    files = {  # (method, seed): (french, arithmetic, format_check), each (start, middle, end)
        ("opd", 0): ((0.0, 0.2, 0.5), (0.8, 0.1, 0.7), (0.6, 0.6, 0.6)),
        ("sft", 0): ((0.0, 0.5, 0.8), (0.8, 0.6, 0.4), (0.6, 0.6, 0.7)),
        ("opd", 1): ((0.0, 0.1, 0.3), (0.8, 0.8, 0.6), (0.6, 0.6, 0.5)),
    }
    out = []
    for (method, seed), (fr, ar, fc) in files.items():
        p = _write_run(tmp_path / f"{method}_{seed}.jsonl", fr, ar, fc, teacher=0.85 if not out else None)
        out.append(fg.run_from_rows(read_metrics(p), "french", CORES, method, seed, wall_s=100.0, load="2.00"))
    return out


def test_a_run_is_read_at_its_first_and_last_evaluation(runs):
    r = runs[0]
    assert (r.method, r.seed, r.steps) == ("opd", 0, 4)
    assert r.new == (0.0, 0.5) and r.cores == {"arithmetic": (0.8, 0.7), "format_check": (0.6, 0.6)}  # not step 2
    assert r.teacher_new == 0.85 and math.isnan(runs[1].teacher_new)
    assert r.teacher_cores == {"arithmetic": 0.25, "format_check": 0.5} and runs[1].teacher_cores == {}
    assert r.gain == pytest.approx(0.5)
    assert r.drop("arithmetic") == pytest.approx(0.1)
    assert r.forgetting_per_gain("arithmetic") == pytest.approx(0.2)  # 0.1 / 0.5
    assert r.forgetting_per_gain("format_check") == pytest.approx(0.0)
    assert runs[1].forgetting_per_gain("format_check") == pytest.approx(-0.125)  # improved by 0.1 for a gain of 0.8


def test_no_gain_means_no_forgetting_per_gain():
    r = fg.Run("opd", 0, 4, (0.4, 0.4), {"arithmetic": (0.8, 0.5)})
    assert math.isnan(r.forgetting_per_gain("arithmetic"))


def test_summary_is_mean_drop_over_mean_gain_per_method(runs):
    opd, sft = fg.summarize(runs)
    # opd: gains 0.5, 0.3 (mean 0.4); arithmetic drops 0.1, 0.2 (mean 0.15); format_check 0, 0.1 (mean 0.05)
    assert (opd.method, opd.seeds) == ("opd", [0, 1]) and opd.gain == pytest.approx(0.4)
    assert opd.change == pytest.approx({"arithmetic": -0.15, "format_check": -0.05})
    assert opd.forgetting_per_gain == pytest.approx({"arithmetic": 0.375, "format_check": 0.125})
    assert opd.forgetting_per_gain_all == pytest.approx(0.25)
    # sft: gain 0.8; arithmetic drop 0.4 -> 0.5; format_check drop -0.1 -> -0.125; mean 0.1875
    assert sft.forgetting_per_gain_all == pytest.approx(0.1875)
    assert fg.ratio([opd, sft]) == pytest.approx(0.25 / 0.1875)
    assert math.isnan(fg.ratio([opd]))  # no sft
    no_forgetting = fg.MethodSummary("sft", [0], 0.8, forgetting_per_gain_all=-0.1)
    assert math.isnan(fg.ratio([opd, no_forgetting]))  # nothing to compare against


def test_the_table_and_json_carry_the_numbers(runs, tmp_path):
    meta = {"date": "2026-12-02", "suffix": "_test", "machine": "x86_64, 2 cores", "load_before": "1.00 1.00 1.00",
            "load_after": "2.00 2.00 2.00", "wall_s": 300.0, "command": "python benchmarks/forgetting.py",
            "setup": "setup paragraph"}
    md = fg.write_results(tmp_path / "out", runs, meta)
    assert md.name == "forgetting_2026-12-02_test.md"
    text = md.read_text(encoding="utf-8")
    assert "| opd | 0 | 4 | 0.000 → 0.500 (+0.500) | 0.800 → 0.700 (-0.100) | 0.600 → 0.600 (+0.000) | +0.200 | " \
           "+0.000 | 100 | 2.00 |" in text
    assert "| opd | 0, 1 | +0.400 | -0.150 | -0.050 | +0.375 | +0.125 | +0.250 |" in text
    assert "OPD's forgetting per unit of gain / SFT's (mean over cores): 1.33" in text
    assert "The teacher (the base model with its context) scores 0.850 on the new behaviour" in text
    assert "On the core behaviours the teacher, with its context, scores arithmetic 0.250, format_check 0.500:" in text
    assert "load average before / after: 1.00 1.00 1.00 / 2.00 2.00 2.00" in text
    data = json.loads((tmp_path / "out" / "forgetting_2026-12-02_test.json").read_text(encoding="utf-8"))
    assert data["opd_over_sft"] == pytest.approx(4 / 3)
    assert data["runs"][1]["teacher_new"] is None  # NaN as null: strict JSON
    assert data["summary"][1]["forgetting_per_gain"]["format_check"] == pytest.approx(-0.125)


def test_a_run_without_two_evaluations_or_a_core_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^metrics\.jsonl: eval/french/avg at fewer than two steps"):
        fg.run_from_rows([{"step": 0, "eval/french/avg": 0.0}], "french", CORES, "opd", 0)
    rows = [{"step": 0, "eval/french/avg": 0.0, "eval/core/arithmetic/avg": 0.8},
            {"step": 4, "eval/french/avg": 0.5, "eval/core/arithmetic/avg": 0.7}]
    with pytest.raises(ValueError, match=r"^metrics\.jsonl: no eval/core/format_check/avg at steps 0 and 4"):
        fg.run_from_rows(rows, "french", CORES, "opd", 0)


def test_the_experiments_load_and_differ_only_in_the_method():
    from orchestrator.api import load_config

    opd = load_config(fg.EXPERIMENT / "opd.toml")
    sft = load_config(fg.EXPERIMENT / "opd.toml", *fg.METHODS["sft"])
    assert (opd.orchestrator.workflow, sft.orchestrator.workflow) == ("distill", "sft")
    assert (opd.trainer.loss.kl_coef, sft.trainer.loss.kl_coef) == (1.0, 0.0)
    for cfg in (opd, sft):  # the same teacher samples a step, and forgetting measured, not prevented
        oc = cfg.orchestrator
        assert (oc.batch_size, oc.group_size, cfg.max_steps, cfg.trainer.lr) == (8, 4, 8, 1e-3)
        assert oc.continual.core_environments == list(CORES)
        assert (oc.continual.replay_ratio, oc.continual.gate, cfg.trainer.loss.ref_kl_coef) == (0.0, False, 0.0)
    assert "arithmetic + on operands 0..9" in fg.setup_text(opd)


def test_sft_takes_the_capability_suite_but_not_replay():
    from orchestrator.api import load_config
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match=r'^orchestrator\.continual\.replay_ratio: must be 0 with orchestrator\.workflow '
                                          r'= "sft"'):
        load_config(fg.EXPERIMENT / "opd.toml", *fg.METHODS["sft"], overrides={"orchestrator.continual.replay_ratio": 0.25})


def test_a_finished_run_is_kept_and_one_cut_short_is_not(tmp_path):
    """``--runs DIR`` again: a run whose end evaluation is at the asked step count is read back (wall time not
    known again), anything else (no file, one evaluation, another step count) is run again."""
    done = tmp_path / "opd_s0"
    done.mkdir()
    _write_run(done / "metrics.jsonl", (0.0, 0.2, 0.5), (0.8, 0.1, 0.7), (0.6, 0.6, 0.6))
    r = fg.finished_run(done, "french", CORES, "opd", 0, steps=4)
    assert r is not None and r.new == (0.0, 0.5) and math.isnan(r.wall_s) and r.load == "earlier"
    assert fg.finished_run(done, "french", CORES, "opd", 0, steps=10) is None  # asked for more steps
    assert fg.finished_run(tmp_path / "sft_s0", "french", CORES, "sft", 0, steps=4) is None  # never started
    cut = tmp_path / "sft_s1"
    cut.mkdir()
    (cut / "metrics.jsonl").write_text('{"step": 0, "eval/french/avg": 0.0}\n{"step": 1, "teacher_kl": 0.3}\n')
    assert fg.finished_run(cut, "french", CORES, "sft", 1, steps=4) is None  # stopped before its end evaluation
    meta = {"date": "2026-12-02", "machine": "m", "load_before": "1", "load_after": "2", "wall_s": 1.0,
            "command": "c", "setup": "s"}
    assert "| opd | 0 | 4 | 0.000 → 0.500 (+0.500) |" in fg.markdown([r], meta) and "| n/a | earlier |" in fg.markdown([r], meta)
