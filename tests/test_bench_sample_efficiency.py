"""benchmarks/sample_efficiency.py: the analysis on hand-made curves (steps to the target, the learning-rate sweep,
costs against OPD in steps and tokens), the arithmetic pair's tokenizer, the running_sum task's runs, and
``--quick`` end to end (marked ``engine``): its table parses, its PNG loads, its numbers are in range."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import sample_efficiency as se  # noqa: E402


def test_steps_to_reach_is_the_first_evaluation_at_or_above_the_target():
    steps, acc = [0, 4, 8, 12], [0.2, 0.85, 0.9, 0.7]
    assert se.steps_to_reach(steps, acc, 0.9) == 8  # exactly the target counts
    assert se.steps_to_reach(steps, acc, 0.8) == 4
    assert se.steps_to_reach(steps, acc, 0.95) is None  # never: not reached
    assert se.steps_to_reach(steps, acc, 0.1) == 0  # a student already at the target needs 0 steps


def test_median_steps_counts_a_seed_that_never_reached_as_infinite():
    assert se.median_steps([8, 12, 4]) == 8
    assert se.median_steps([8, None, 4]) == 8  # 4, 8, inf
    assert se.median_steps([None, None, 4]) == math.inf
    assert se.median_steps([8, None]) == math.inf  # (8 + inf) / 2


def test_step_ratio_is_exact_when_both_reached_and_a_bound_otherwise():
    assert se.step_ratio([30, 40, 20], [4, 8, 4], budget=40) == ("=", 30 / 4)
    assert se.step_ratio([None, None, 20], [4, 8, 4], budget=40) == (">", 40 / 4)  # RL counted at the budget
    assert se.step_ratio([8, 8, 8], [None, None, 4], budget=40) == ("<", 8 / 40)
    kind, value = se.step_ratio([None] * 3, [None] * 3, budget=40)
    assert kind == "n/a" and math.isnan(value)


def test_curve_from_rows_reads_evaluations_and_cumulative_sampled_tokens():
    rows = [{"step": 0, "time/startup_inference": 1.0}, {"step": 0, "eval/reverse_text/avg": 0.2},
            {"step": 1, "tokens/step": 100.0, "teacher_kl": 3.0}, {"step": 2, "tokens/step": 90.0, "teacher_kl": 2.0},
            {"step": 2, "eval/reverse_text/avg": 0.5}, {"step": 3, "tokens/step": 80.0, "teacher_kl": None},
            {"step": 4, "tokens/step": 70.0, "teacher_kl": 1.0}, {"step": 4, "eval/reverse_text/avg": 0.75}]
    c = se.curve_from_rows(rows, "reverse_text", "reverse_text", "opd", 1, 12.0)
    assert (c.steps, c.accuracy, c.tokens) == ([0, 2, 4], [0.2, 0.5, 0.75], [0.0, 190.0, 340.0])
    assert c.teacher_kl_last == pytest.approx(2.0)  # mean of the last 3 finite values (3.0, 2.0, 1.0)


def _curve(method, seed, acc, task="t"):
    return se.Curve(task, method, seed, [0, 4, 8], acc, [0.0, 400.0, 800.0], 10.0)


def test_summarize_and_markdown_on_hand_made_curves():
    curves = [_curve("opd", 0, [0.2, 0.9, 0.95]), _curve("opd", 1, [0.2, 0.5, 0.92]),
              _curve("rl", 0, [0.2, 0.3, 0.4]), _curve("rl", 1, [0.2, 0.4, 0.95])]
    rows = se.summarize(curves, {"t": 1.0}, se.QUICK)
    opd, rl = rows
    assert opd["steps"] == [4, 8] and opd["median_steps"] == 6 and opd["median_tokens"] == 600
    assert opd["final_mean"] == pytest.approx(0.935) and opd["target"] == pytest.approx(0.9)
    assert rl["steps"] == [None, 8] and rl["median_steps"] == math.inf
    assert opd["half_target"] == pytest.approx(0.6) and opd["half_steps"] == [4, 8] and rl["half_steps"] == [None, 8]
    ratios = se.ratios_of(rows, 8)
    assert ratios == {"t": ((">", 8 / 6), (">", 8 / 6))}
    meta = {"date": "2026-01-01", "machine": "m", "load_before": "1", "load_after": "2", "wall_s": 3.0,
            "command": "c"}
    text = se.markdown(rows, ratios, meta, se.QUICK)
    table = [line for line in text.splitlines() if line.startswith("| t | ")]
    assert table[0].split(" | ")[6:8] == ["4, 8", "6"] and "| —, 8 | not reached |" in table[1]
    assert "| t | > 1.33 | > 1.33 |" in text  # RL not reached: at least budget 8 / OPD's 6


def test_arithmetic_tokenizer_round_trips_the_prompts_with_the_pair_special_ids():
    from shared.builders import tiny_pair as tp

    tok = se.arith_tokenizer()
    assert len(tok) % tp.VOCAB_MULTIPLE == 0
    for text in ("What is 37 + 12?", "What is 0 + 99?", "146"):
        ids = tok(text).input_ids
        assert ids[0] == tp.BOS_ID and tp.UNK_ID not in ids and len(ids) == len(text) + 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (tp.EOS_ID, tp.PAD_ID)


def _table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| reverse_text | ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.engine
def test_quick_mode_writes_a_well_formed_table_json_and_plot(tiny_pair, tmp_path):
    from PIL import Image

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sample_efficiency.py"), "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [md] = tmp_path.glob("sample_efficiency_*_quick.md")
    text = md.read_text()
    rows = _table_rows(text)
    assert [r[1] for r in rows if len(r) == 12] == ["opd", "rl", "hybrid", "sft"]
    for r in rows[:4]:
        teacher, target, start = float(r[2]), float(r[3]), float(r[4])
        final, sd = (float(x) for x in r[5].split(" ± "))
        assert 0.9 <= teacher <= 1.0 and target == pytest.approx(0.9 * teacher, abs=1e-3)
        assert 0 <= start <= 1 and 0 <= final <= 1 and 0 <= sd <= 0.5
        assert re.fullmatch(r"(\d+|—), (\d+|—)", r[6]) and (r[7] == "not reached" or 0 <= int(r[7]) <= 3)
        assert re.fullmatch(r"(\d+|—), (\d+|—)", r[9])
        assert float(r[10]) > 0 and float(r[11]) > 0  # sampled tokens per step, seconds per run
    cell = r"(n/a \(neither reached\)|[<>]? ?\d+\.\d\d)"
    assert re.search(rf"\| reverse_text \| {cell} \| {cell} \|", text)

    data = json.loads(md.with_suffix(".json").read_text())  # strict JSON: no NaN/Infinity
    assert len(data["curves"]) == 8 and data["budget"]["steps"] == 3
    for c in data["curves"]:
        assert c["steps"] == [0, 1, 2, 3] and all(0 <= a <= 1 for a in c["accuracy"])
        assert c["tokens"][0] == 0 and all(b > a for a, b in zip(c["tokens"], c["tokens"][1:]))
    # the same seed starts every method from the same base student: equal step-0 accuracy
    assert len({c["accuracy"][0] for c in data["curves"]}) == 1
    image = Image.open(md.with_suffix(".png"))
    assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 200


def test_methods_are_valid_session_runs_with_the_intended_loss(tmp_path):
    from orchestrator.api import _merged, session_run_config

    env, base = se.task_configs(se.FULL, tmp_path, ["reverse_text"])["reverse_text"]
    session = _merged(ROOT / "experiments" / "reverse_text" / "rl.toml", base)
    loss = {}
    for method, m in se.METHODS.items():
        cfg = session_run_config(session, overrides=m.overrides, seed=2)
        lc = cfg.trainer.loss
        loss[method] = (lc.adv_tau, lc.teacher_tau, lc.student_tau, cfg.orchestrator.workflow, lc.teacher_topk)
        assert (cfg.max_steps, cfg.seed, cfg.trainer.lr, cfg.orchestrator.batch_size) == (60, 2, 2e-3, 16)
    assert loss == {"opd": (0.0, 1.0, 1.0, "distill", 0), "rl": (1.0, 0.0, 0.0, "distill", 0),
                    "hybrid": (1.0, 1.0, 1.0, "distill", 0), "sft": (0.0, 0.0, 0.0, "sft", 0),
                    "opd_topk": (0.0, 1.0, 1.0, "distill", 8)}
    assert env == "reverse_text"


# ------------------------------------------------------------------------------------------------
# The long-horizon task: the sweep, teacher tokens, costs against OPD


def test_curve_from_rows_reads_partial_credit_and_counts_teacher_tokens_per_method():
    rows = [{"step": 0, "eval/running_sum/avg": 0.1, "eval/running_sum/partial": 0.4},
            {"step": 1, "tokens/step": 100.0}, {"step": 2, "tokens/step": 60.0},
            {"step": 2, "eval/running_sum/avg": 0.5, "eval/running_sum/partial": 0.8}]
    opd = se.curve_from_rows(rows, "running_sum", "running_sum", "opd", 0, 1.0, lr=3e-3)
    assert (opd.partial, opd.tokens, opd.teacher_tokens, opd.lr) == ([0.4, 0.8], [0.0, 160.0], [0.0, 160.0], 3e-3)
    rl = se.curve_from_rows(rows, "running_sum", "running_sum", "rl", 0, 1.0, uses_teacher=False)
    assert rl.teacher_tokens == [0.0, 0.0] and rl.tokens == [0.0, 160.0]
    no_partial = se.curve_from_rows([r for r in rows if "tokens/step" in r or r["step"] == 2] + [
        {"step": 0, "eval/running_sum/avg": 0.1}], "running_sum", "t", "opd", 0, 1.0)
    assert no_partial.partial == []  # logged at some evaluations only: none kept


def _long(method, seed, lr, acc, tokens=(0.0, 400.0, 800.0)):
    teacher = [0.0] * 3 if method == "rl" else list(tokens)
    return se.Curve("t", method, seed, [0, 4, 8], acc, list(tokens), 10.0, math.nan, lr, [], teacher)


def test_sweep_picks_per_method_the_rate_reaching_first_then_the_higher_curve():
    curves = [_long("opd", 0, 1e-3, [0.1, 0.5, 0.95]), _long("opd", 0, 3e-3, [0.1, 0.92, 0.95]),
              _long("opd", 0, 1e-2, [0.1, 0.2, 0.1]),
              _long("rl", 0, 1e-3, [0.1, 0.2, 0.3]), _long("rl", 0, 3e-3, [0.1, 0.4, 0.5]),
              _long("rl", 0, 1e-2, [0.1, 0.0, 0.0]),
              _long("opd", 1, 3e-3, [0.1, 0.6, 0.9])]  # a later seed at the chosen rate: not part of the sweep
    rows = se.sweep_rows(curves, "t", 1.0)
    assert [(r["method"], r["lr"], r["steps"]) for r in rows] == [
        ("opd", 1e-3, [8]), ("opd", 3e-3, [4]), ("opd", 1e-2, [None]),
        ("rl", 1e-3, [None]), ("rl", 3e-3, [None]), ("rl", 1e-2, [None])]
    assert rows[4]["mean_accuracy"] == pytest.approx(1 / 3) and rows[4]["key"] == pytest.approx((math.inf, -1 / 3))
    assert se.best_rates(curves, "t", 1.0) == {"opd": 3e-3, "rl": 3e-3}  # opd: 4 steps < 8; rl: none reached, 0.33
    assert se.sweep_key([4, None, 8], 0.5) == (8.0, -0.5)


def test_a_shorter_sweep_ranks_the_rates_and_the_whole_budget_runs_alone_are_the_results():
    """Budget.sweep_steps: the sweep's short runs rank the rates; the best rate's whole-budget runs (the sweep's
    seed included) fill the results, and nothing of the sweep counts twice."""
    sweep = [_long("opd", 0, 1e-3, [0.1, 0.5, 0.6]), _long("opd", 0, 3e-3, [0.1, 0.7, 0.8])]
    for c in sweep:
        c.sweep = True
    final = [se.Curve("t", "opd", s, [0, 4, 8, 12], [0.1, 0.7, 0.8, 0.95], [0.0, 400.0, 800.0, 1200.0], 10.0,
                      math.nan, 3e-3, [], [0.0, 400.0, 800.0, 1200.0]) for s in (0, 1)]
    curves = sweep + final
    rows = se.sweep_rows(curves, "t", 1.0)
    assert [(r["lr"], r["seeds"], r["final_mean"]) for r in rows] == [(1e-3, [0], 0.6), (3e-3, [0], 0.8)]
    assert se.best_rates(curves, "t", 1.0) == {"opd": 3e-3}
    (row,) = se.summarize(curves, {"t": 1.0}, se.BUDGETS["full"], {"t": {"opd": 3e-3}})
    assert row["seeds"] == [0, 1] and row["steps"] == [12, 12] and row["final_mean"] == 0.95
    full = se.BUDGETS["full"]
    assert 0 < full.sweep_steps < full.steps and full.steps % full.eval_every == 0


def test_costs_against_opd_in_steps_sampled_tokens_and_teacher_tokens():
    curves = [_long("opd", s, 3e-3, [0.1, 0.95, 0.95]) for s in (0, 1, 2)]
    curves += [_long("sft", s, 1e-3, [0.1, 0.5, 0.95], tokens=(0.0, 300.0, 600.0)) for s in (0, 1, 2)]
    curves += [_long("rl", s, 1e-2, [0.1, 0.3, 0.5]) for s in (0, 1, 2)]
    best = {"t": {"opd": 3e-3, "sft": 1e-3, "rl": 1e-2}}
    rows = se.summarize(curves, {"t": 1.0}, se.BUDGETS["tiny"], best)
    by = {r["method"]: r for r in rows}
    assert by["opd"]["median_teacher_tokens"] == 400 and by["sft"]["median_teacher_tokens"] == 600
    assert by["rl"]["teacher_tokens_per_step"] == 0 and by["rl"]["median_steps"] == math.inf
    versus = {v["method"]: v for v in se.versus_opd(rows, 8)}
    assert versus["sft"]["steps"] == ("=", 2.0) and versus["sft"]["tokens"] == ("=", 1.5)  # 8/4 steps, 600/400
    assert versus["sft"]["teacher_tokens"] == ("=", 1.5)
    assert versus["rl"]["steps"] == (">", 2.0) and versus["rl"]["tokens"] == (">", 2.0)  # at its whole run: 800/400
    assert versus["rl"]["teacher_tokens"][0] == "none"  # rl asks the teacher nothing
    assert se.reach_ratio([None], [4], 100, 50) == (">", 25.0) and se.reach_ratio([10], [None], 100, 50) == ("<", 0.2)
    meta = {"date": "2026-01-01", "machine": "m", "load_before": "1", "load_after": "2", "wall_s": 3.0, "command": "c"}
    sweep = se.sweep_rows(curves, "t", 1.0)
    text = se.markdown(rows, se.ratios_of(rows, 8), meta, se.BUDGETS["tiny"], sweep, se.versus_opd(rows, 8))
    assert "| t | sft | 2.00 | 1.50 | 1.50 |" in text and "| t | rl | > 2.00 | > 2.00 | n/a (no teacher) |" in text
    assert "| t | opd | 0.003 | 400 | 100 | — -> — |" in text and "| t | rl | 0.01 | 0 (no teacher) | 0 | — -> — |" in text
    assert "| t | opd | 0.003 * | 4, 4, 4 |" in text  # the sweep table, its chosen rate starred


def test_budgets_sweep_at_least_three_rates_on_three_seeds_and_the_running_sum_task_is_a_valid_session(
        tmp_path, monkeypatch):
    from orchestrator.api import _merged, session_run_config
    from shared.builders import tiny_long

    full = se.BUDGETS["full"]
    assert len(full.rates) >= 3 and len(full.seeds) >= 3 and set(full.sweep) <= set(full.seeds)
    assert se.FULL.rates == (2e-3,) and se.FULL.sweep == se.FULL.seeds  # the short-answer benchmark as before
    monkeypatch.setattr(tiny_long, "build_pair", lambda: (tmp_path / "teacher", tmp_path / "student"))
    env, base = se.task_configs(full, tmp_path, ["running_sum"])["running_sum"]
    session = _merged(ROOT / "experiments" / "reverse_text" / "rl.toml", base)
    cfg = session_run_config(session, overrides={**se.METHODS["rl"].overrides, "trainer.lr": 1e-2}, seed=1)
    assert env == "running_sum" and cfg.orchestrator.environment == "running_sum" and cfg.trainer.lr == 1e-2
    assert cfg.model.name == str(tmp_path / "student") and cfg.teacher.name == str(tmp_path / "teacher")
    prompt_tokens = 2 * tiny_long.MAX_DIGITS + 2  # BOS, digit and space each, "="
    assert cfg.inference.max_tokens == 2 * tiny_long.MAX_DIGITS + 2 <= cfg.model.max_model_len - prompt_tokens
