"""benchmarks/vs_trl.py, trl_env.py and trl_side.py.

Pure logic (ratios, summaries, the spec both sides share) against hand-made numbers; then ``--quick``
for real (one 2-step run of ours and one of TRL's), checking only that the results are well-formed. The
TRL environment is created on first use (seconds with uv's cache, a few minutes of downloads without);
the quick test is skipped, with the reason, only when that environment cannot be created here.
"""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_bench_throughput import run_quick

sys.path.insert(0, str(ROOT / "benchmarks"))
import trl_env  # noqa: E402
import vs_trl  # noqa: E402


def _side(step_s, tok_s, acc, run_s=100.0, flop_s=1e9):
    return {"step_s": step_s, "tok_s": tok_s, "acc_after": acc, "run_s": run_s, "tokens_per_step": tok_s * step_s,
            "acc_before": 0.2, "steps": 40, "flop_s": flop_s}


def test_side_summary_leaves_warmup_out_on_both_sides():
    # 6 steps: steps 1-2 are warm-up; steps 3-6 take 1, 1, 2, 2 s and sample 100, 100, 300, 300 tokens
    s = vs_trl.side_summary([9.0, 9.0, 1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 100.0, 100.0, 300.0, 300.0], 0.2, 0.6, 50.0)
    assert s == {"steps": 6, "step_s": 1.5, "tokens_per_step": 200.0, "tok_s": 200.0 / 1.5, "acc_before": 0.2,
                 "acc_after": 0.6, "run_s": 50.0}
    # 2 steps: nothing is left out
    assert vs_trl.side_summary([3.0, 1.0], [10.0, 30.0], 0.0, 0.0, 5.0)["step_s"] == 2.0


def test_pair_ratios_and_their_min_median_max():
    pairs = [{"ratio": vs_trl.pair_ratios(_side(0.5, 2000, 0.4), _side(1.0, 500, 0.2))},
             {"ratio": vs_trl.pair_ratios(_side(0.6, 1800, 0.3), _side(1.0, 600, 0.3))},
             {"ratio": vs_trl.pair_ratios(_side(0.4, 2400, 0.5), _side(1.0, 400, 0.0))}]  # TRL accuracy 0
    assert pairs[0]["ratio"] == {"step_s": 0.5, "tok_s": 4.0, "acc_after": 2.0, "run_s": 1.0, "flop_s": 1.0}
    no_flops = {k: v for k, v in _side(0.5, 2000, 0.4).items() if k != "flop_s"}
    assert math.isnan(vs_trl.pair_ratios(no_flops, _side(1.0, 500, 0.2))["flop_s"])  # a side without the count
    assert math.isnan(pairs[2]["ratio"]["acc_after"])
    table = {label: (st, undefined) for label, st, undefined in vs_trl.ratio_table(pairs)}
    st, undefined = table["wall time per step (s)"]
    assert (st["min"], st["median"], st["max"], st["n"], undefined) == (0.4, 0.5, 0.6, 3, 0)
    st, _ = table["student tokens/s"]
    assert (st["min"], st["median"], st["max"]) == (3.0, 4.0, 6.0)
    st, undefined = table["held-out accuracy after training"]
    assert (st["min"], st["max"], st["n"], undefined) == (1.0, 2.0, 2, 1)
    # ours at accuracy 0 (nothing learned in the steps) is a ratio of 0 in the table, not a failed measurement
    zero = [{"ratio": vs_trl.pair_ratios(_side(0.5, 2000, 0.0), _side(1.0, 500, 0.5))}, *pairs[:2]]
    st, undefined = {label: (st, u) for label, st, u in vs_trl.ratio_table(zero)}["held-out accuracy after training"]
    assert (st["min"], st["median"], st["max"], undefined) == (0.0, 1.0, 2.0, 0)


def test_spec_holds_our_prompts_schedule_and_lora():
    spec = vs_trl.build_spec(vs_trl.SETUPS["tiny"], 3, 0,
                             ("--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "32"))
    assert len(spec["train_prompts"]) == 3 and all(len(step) == 32 for step in spec["train_prompts"])
    first = spec["train_prompts"][0]
    assert first[:4] == [first[0]] * 4 and first[0].endswith("=")  # each prompt group_size times in a row
    assert len(spec["eval"]) == 32 and all(a == p[:-1][::-1] for p, a in spec["eval"])
    train = {p for step in spec["train_prompts"] for p in step}
    assert not train & {p for p, _ in spec["eval"]}  # held-out prompts never trained on
    # warm-up 10 steps over 3 (0.1, 0.2, 0.3) times a cosine to 0.05 over max_steps = 3
    cos = [0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / 3)) for i in range(3)]
    assert spec["lr_multipliers"] == pytest.approx([0.1 * cos[0], 0.2 * cos[1], 0.3 * cos[2]])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert spec["lora"] == {"rank": 32, "alpha": 64.0, "dropout": 0.0, "target_modules": targets}
    assert (spec["max_tokens"], spec["temperature"], spec["lr"], spec["micro_batch_size"]) == (12, 1.0, 2e-3, 64)
    # no chat template and no context: each prompt's tokens are its characters plus BOS, the same for the teacher
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["student"])
    assert spec["prompt_tokens"][0] == sum(len(tok(p).input_ids) for p in first) == spec["teacher_prompt_tokens"][0]
    assert spec["mode"] == "distillation"


def test_model_flops_by_hand():
    # N = 10: sampling 2N (P + C) = 20 * 7, teacher 2N (P_t + C) = 20 * 9, training 4N (P + C) = 40 * 7
    assert vs_trl.model_flops(10, 3, 5, 4) == 140 + 180 + 280
    # per step from the spec's prompt counts and a side's completion tokens; the mean over steady steps / time
    spec = {"prompt_tokens": [3, 3], "teacher_prompt_tokens": [5, 5]}
    flops = vs_trl.step_flops(spec, 10, [4, 8])
    assert flops == [600, 20 * 11 + 20 * 13 + 40 * 11]
    s = vs_trl.side_summary([2.0, 4.0], [4, 8], 0.0, 0.0, 10.0, flops)
    assert s["flop_s"] == pytest.approx((600 + 920) / 2 / 3.0)


def test_smollm2_spec_gives_sdft_its_messages_context_and_eval(tmp_path):
    setup = vs_trl.SETUPS["smollm2"]
    spec = vs_trl.build_spec(setup, 2, 0, setup.quick["overrides"])
    assert spec["mode"] == "sdft" and spec["privileged_context"] == "Answer in French."
    assert len(spec["train_messages"]) == 2 and all(len(step) == 2 for step in spec["train_messages"])
    assert spec["train_messages"][0][0][0]["role"] == "user" and spec["group_size"] == 1
    assert len(spec["eval_messages"]) == len(spec["eval_texts"]) == 4
    # the teacher's view adds the context's tokens to every prompt
    assert all(t > p for p, t in zip(spec["prompt_tokens"], spec["teacher_prompt_tokens"]))
    # TRL's held-out texts are graded by our french environment
    assert vs_trl.grade(setup, spec, ["Bonjour, je suis très content de vous aider aujourd'hui."] * 2
                        + ["Hello, I am happy to help you today."] * 2) == 0.5


def test_trl_env_without_a_torch_wheel_folder_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("UV_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(trl_env.TrlEnvError, match="set PIP_FIND_LINKS"):
        trl_env.ensure(tmp_path / "env")
    assert not (tmp_path / "env").exists()


def test_trl_env_rebuilds_when_its_pins_changed(tmp_path):
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    (env / "READY").write_text(" ".join(trl_env.PINS) + "\n")
    assert trl_env.is_ready(env)
    (env / "READY").write_text("trl==0.1\n")
    assert not trl_env.is_ready(env)


def test_pins_keep_the_cpu_torch_and_leave_the_project_alone():
    pins = dict(p.split("==") for p in trl_env.PINS)
    assert pins["torch"] == "2.13.0+cpu" and "trl" in pins and "transformers" in pins
    assert "trl" not in (ROOT / "pyproject.toml").read_text()  # not a dependency of the project


def test_missing_trl_env_is_one_line_and_exit_1(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OPD_CACHE": str(tmp_path), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "benchmarks/vs_trl.py", "--quick", "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: trl env: ")


def _trl_python_or_skip():
    try:
        return trl_env.ensure()
    except trl_env.TrlEnvError as e:
        pytest.skip(f"cannot create the TRL environment here: {e}")


@pytest.mark.engine
@pytest.mark.timeout(1800)  # ~2 min on a quiet machine; 10+ under other jobs' load
def test_quick_mode_writes_well_formed_results(tmp_path):
    _trl_python_or_skip()
    proc = run_quick("vs_trl.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = next((tmp_path / "out").glob("vs_trl_*_quick.md")).read_text()
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in dict(vs_trl.METRICS).values():
            rows[cells[0]] = cells
    assert set(rows) == set(dict(vs_trl.METRICS).values())
    for label in ("wall time per step (s)", "student tokens/s", "wall time of the whole run (s)"):
        lo, med, hi = (float(x) for x in rows[label][1:4])
        assert 0 < lo <= med <= hi and math.isfinite(hi)
    assert "What differs:" in md and "transformers.generate" in md
    data = json.loads(next((tmp_path / "out").glob("vs_trl_*_quick.json")).read_text())
    (pair,) = data["pairs"]
    for side in ("ours", "trl"):
        s = pair[side]
        assert s["steps"] == 2 and s["tokens_per_step"] > 0 and 0 <= s["acc_after"] <= 1
        assert s["tokens_per_step"] <= 32 * 12  # 8 prompts x 4 samples, at most 12 tokens each
    for key, value in pair["ratio"].items():
        assert key == "acc_after" or (value > 0 and math.isfinite(value))

    from PIL import Image

    with Image.open(next((tmp_path / "out").glob("vs_trl_*_quick.png"))) as im:
        assert im.size[0] > 200 and im.size[1] > 200
