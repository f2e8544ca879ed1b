"""Issue 3's workflows: reward sources and continual-learning pieces (engine-free), then each workflow's
experiment for 2 steps through the real `rl` command (marked `engine`)."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator import continual
from orchestrator.prompts import render_messages
from orchestrator.workflows.base import RewardSource
from orchestrator.workflows.comparator import ComparatorReward
from orchestrator.workflows.judge import JudgeReward
from orchestrator.data import Prompt
from shared.config import ConfigError, load
from shared.metrics import read_metrics
from shared.wire import Rollout

# ------------------------------------------------------------------------------------------------
# Engine-free


def _rollout(i: int, text: str, ids: list[int] | None = None) -> Rollout:
    return Rollout(prompt_index=i, prompt_ids=[1], completion_ids=ids if ids is not None else [5] * len(text),
                   logprobs=[-1.0] * len(text), text=text)


class FakeTeacher:
    """``generate(ids, max_tokens, temperature)``: canned replies in order; records each call."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, ids, max_tokens, temperature):
        self.calls.append((ids, max_tokens, temperature))
        out = [self.replies.pop(0) for _ in ids]
        return [_rollout(k, t) for k, t in enumerate(out)]


def test_judge_reward_counts_unparseable_and_drops_with_skip():
    cfg = load(["--orchestrator.workflow", "judge", "--model.max_model_len", "64", "--inference.max_tokens", "8"])
    prompts = [Prompt(text="ab=", answer="ba"), Prompt(text="cd=", answer="dc")]
    rollouts = [_rollout(10, "ba"), _rollout(10, "ab"), _rollout(11, "dc")]
    teacher = FakeTeacher(["fine.\nVERDICT: PASS", "VERDICT: FAIL", "no idea"])
    source = JudgeReward(cfg, lambda m: [1] * 10, teacher, check=lambda p, t: float(t == p.answer))
    rewards, m = source.rewards(prompts, rollouts, base=10)
    assert rewards == [1.0, -1.0, None]  # on_unparseable = "skip" (the default)
    assert m["judge/unparseable"] == 1 and m["judge/dropped"] == 1 and m["judge/too_long"] == 0
    assert m["judge/reward_mean"] == 0.0 and m["judge/agreement"] == 1.0
    assert teacher.calls[0][1] == min(cfg.orchestrator.judge.max_tokens, 64 - 10)


def test_judge_reward_by_loglik_scores_yes_and_no_after_each_prompt():
    """verdict = loglik: one scoring pass of prompt + yes and prompt + no per rollout; the summed log-probs
    decide (binary), a failed score drops the rollout, a prompt too long for prompt + the longer option is
    counted as too long."""
    cfg = load(["--orchestrator.workflow", "judge", "--orchestrator.judge.verdict", "loglik",
                "--model.max_model_len", "12", "--inference.max_tokens", "4"])
    yes, no = [7], [8, 9]
    table = {"ba": ([-0.2], [-1.0, -1.5]), "ab": ([-3.0], [-0.5, -0.5]), "xy": None}
    calls = []

    def score(prompt_ids, completion_ids):
        calls.append((prompt_ids, completion_ids))
        out = []
        for p, c in zip(prompt_ids, completion_ids):
            entry = table[{1: "ba", 2: "ab", 3: "xy"}[p[0]]]
            out.append(None if entry is None else entry[0] if c == yes else entry[1])
        return out

    render = {"ba": [1] * 9, "ab": [2] * 9, "xy": [3] * 9, "toolong": [4] * 10}  # 10 + 2 + one output position > 12
    prompts = [Prompt(text="ab=", answer="ba")]
    rollouts = [_rollout(0, t) for t in ("ba", "ab", "xy", "toolong")]
    source = JudgeReward(cfg, lambda m: render[m[-1]["content"].split("Answer to judge:\n")[1].split("\n")[0]],
                                   FakeTeacher([]), check=lambda p, t: float(t == p.answer), score=score,
                                   options=(yes, no))
    rewards, m = source.rewards(prompts, rollouts, base=0)
    assert rewards == [1.0, -1.0, None, None]  # too long + on_unparseable = skip -> dropped
    assert calls == [([[1] * 9, [1] * 9, [2] * 9, [2] * 9, [3] * 9, [3] * 9], [yes, no] * 3)]
    assert m["judge/teacher_failed"] == 1 and m["judge/too_long"] == 1 and m["judge/unparseable"] == 1
    assert m["judge/agreement"] == 1.0  # "ba" is right and judged yes, "ab" wrong and judged no
    assert m["judge/check_mean"] == 0.25  # of the 4 rollouts only "ba" is right (whether judged or not)
    # P(yes | yes or no) = sigmoid(ly - ln): -0.2 - (-2.5) = 2.3 and -3.0 - (-1.0) = -2.0
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    assert m["judge/p_yes"] == pytest.approx((sig(2.3) + sig(-2.0)) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="needs score"):
        JudgeReward(cfg, lambda m: [1], FakeTeacher([]))


def test_judge_reward_too_long_prompt_is_unparseable_not_a_crash():
    cfg = load(["--orchestrator.workflow", "judge", "--orchestrator.judge.on_unparseable", "zero",
                "--model.max_model_len", "32", "--inference.max_tokens", "8"])
    teacher = FakeTeacher([])
    source = JudgeReward(cfg, lambda m: [1] * 40, teacher)
    rewards, m = source.rewards([Prompt(text="ab=")], [_rollout(0, "ba")], base=0)
    assert rewards == [0.0] and m["judge/too_long"] == 1 and m["judge/unparseable"] == 1 and not teacher.calls


def test_render_messages_plain_text_without_a_chat_template():
    class Tok:
        chat_template = None

        def __call__(self, text, **kw):
            class R:
                input_ids = list(text.encode())
            return R()

    ids = render_messages(Tok(), [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], True)
    assert bytes(ids) == b"s\n\nu"


def test_comparator_reward_uses_teacher_references_and_marks_wrong_prompts():
    cfg = load(["--orchestrator.workflow", "comparator"])
    prompts = [Prompt(text="ab="), Prompt(text="cd=")]
    rollouts = [_rollout(4, "ba"), _rollout(4, "xx"), _rollout(5, "dc"), _rollout(5, "dc")]
    teacher = FakeTeacher(["ba", "dc"])
    source = ComparatorReward(cfg, lambda p: [len(p.text)], teacher, param_ratio=0.5)
    rewards, m = source.rewards(prompts, rollouts, base=4)
    assert rewards == [1.0, 0.0, 1.0, 1.0]
    assert len(teacher.calls) == 1 and teacher.calls[0][2] == 0.0  # one greedy reference per prompt
    assert source.failed_prompts([4, 4, 5, 5], rewards) == [4]
    assert set(source.references()) == {4, 5} and source.references()[4].text == "ba"
    assert m["comparator/accuracy"] == 0.75 and m["comparator/cumulative_reward"] == 3.0
    assert m["comparator/param_ratio"] == 0.5 and m["comparator/transfer_rate_per_1k"] == 0.0


def test_env_reward_failed_prompts():
    source = RewardSource(lambda p, t: float(t == p.answer))
    rewards, m = source.rewards([Prompt(text="ab=", answer="ba")], [_rollout(3, "ba"), _rollout(3, "b")], base=3)
    assert rewards == [1.0, 0.0] and m == {} and source.failed_prompts([3, 3], rewards) == [3]


def test_continual_config_errors():
    with pytest.raises(ConfigError, match=r"^orchestrator\.continual\.replay_ratio: needs"):
        load(["--orchestrator.continual.replay_ratio", "0.2"])
    with pytest.raises(ConfigError, match=r"^orchestrator\.continual\.replay_ratio"):
        load(["--orchestrator.continual.core_environments", "reverse_text_short", "--orchestrator.continual.replay_ratio", "1"])
    with pytest.raises(ConfigError, match=r"^orchestrator\.continual\.max_regression"):
        load(["--orchestrator.continual.max_regression", "-0.1"])
    with pytest.raises(ConfigError, match=r"^orchestrator\.continual\.core_environments: must not contain"):
        load(["--orchestrator.continual.core_environments", "reverse_text"])
    with pytest.raises(ConfigError, match=r"^orchestrator\.skip_verification: must be false"):
        load(["--orchestrator.workflow", "judge", "--orchestrator.skip_verification"])
    cfg = load(["--orchestrator.continual.core_environments", "nope"])
    with pytest.raises(ConfigError, match=r"^orchestrator\.continual\.core_environments: unknown environment 'nope'"):
        continual.make_core_envs(cfg)


def test_replay_mix_draws_the_ratio_from_the_cores_and_scores_by_source():
    cfg = load(["--orchestrator.environment", "reverse_text_long",
                "--orchestrator.continual.core_environments", "reverse_text_short",
                "--orchestrator.continual.replay_ratio", "0.25"])
    from orchestrator import environments

    env = environments.make(cfg)
    mix = continual.ReplayMix(env, env, continual.make_core_envs(cfg), 0.25)
    prompts = mix.next_prompts(8)
    lengths = [len(p.answer) for p in prompts]
    assert all(n >= 7 for n in lengths[:6]) and all(n <= 5 for n in lengths[6:])
    assert [p.env for p in prompts] == [""] * 6 + ["reverse_text_short"] * 2  # each replayed prompt names its core
    assert mix.metrics(prompts) == {"continual/replay_prompts": 2.0}
    assert mix.position == 8
    assert mix.score(prompts[7], prompts[7].answer) == 1.0  # scored by its core environment
    assert mix.score(prompts[0], prompts[0].answer) == 1.0 and mix.score(prompts[0], "") == 0.0


def test_core_suite_gate_and_restore(tmp_path):
    cfg = load(["--orchestrator.environment", "reverse_text_long",
                "--orchestrator.continual.core_environments", "reverse_text_short",
                "--orchestrator.continual.max_regression", "0.1"])
    suite = continual.CoreSuite(cfg, continual.make_core_envs(cfg), tmp_path)
    for step in (0, 1, 2, 3):
        d = tmp_path / "broadcast" / f"step_{step}"
        d.mkdir(parents=True)
        (d / "COMPLETE").write_text(str(step))
    scores = iter([0.5, 0.45, 0.3])
    row, ok = suite.evaluate(lambda env: next(scores), 0)
    assert ok and row["eval/core/reverse_text_short/delta_from_start"] == 0.0
    row, ok = suite.evaluate(lambda env: next(scores), 2)
    assert ok and row["eval/core/reverse_text_short/delta_from_start"] == pytest.approx(-0.05)
    row, ok = suite.evaluate(lambda env: next(scores), 3)
    assert not ok and row["continual/gate_failed"] == 1.0
    path = suite.restore(3)
    assert path.name == "step_2" and (tmp_path / "broadcast" / "rejected_step_3").is_dir()
    final = json.loads((tmp_path / "final_adapter.json").read_text())
    assert final["step"] == 2 and final["gate_failed"] and final["failed_step"] == 3
    from orchestrator.export import latest_adapter

    assert latest_adapter(tmp_path).name == "step_2"  # `rl export` takes the restored adapter


# ------------------------------------------------------------------------------------------------
# Each workflow's experiment for 2 steps (real Ray actors and vLLM engines on the CPU)

SMALL = ["--max_steps", "2", "--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "16",
         "--wandb.mode", "disabled"]
COMMON = ["teacher_kl", "combined_advantage", "loss/policy", "masked/low", "masked/high", "time/step"]


def _run(config: str, out, *extra: str, steps: tuple[int, ...] = (1, 2), timeout: int = 600):
    from tests.test_e2e import run_rl

    p = run_rl("@", config, "--output_dir", str(out), *SMALL, *extra, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "teacher_kl" in r]
    assert tuple(r["step"] for r in train) == steps
    for r in train:
        for key in COMMON:
            assert r.get(key) is not None, key
    return rows, train


# Workflow 1 (on-policy distillation, skip_verification) is tests/test_e2e.py::test_two_step_run.


@pytest.mark.engine
def test_hybrid_workflow_two_steps(tiny_pair, tmp_path):
    _, train = _run("experiments/hybrid/rl.toml", tmp_path / "h")
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in train)


@pytest.mark.engine
def test_comparator_workflow_two_steps(tiny_pair, tmp_path):
    rows, train = _run("experiments/comparator/rl.toml", tmp_path / "c")
    for r in train:
        assert 0.0 <= r["comparator/accuracy"] <= 1.0
        assert r["reward/mean"] == pytest.approx(r["comparator/accuracy"])  # reward 1 / 0
        assert 0 < r["comparator/param_ratio"] < 1  # the tiny student is smaller than its teacher
        assert r["corrective/samples"] == r["comparator/wrong_prompts"]  # one teacher answer per wrong prompt
        assert "loss/corrective" in r and "comparator/transfer_rate_per_1k" in r
    assert train[1]["comparator/cumulative_reward"] >= train[0]["comparator/cumulative_reward"]


@pytest.mark.engine
def test_judge_workflow_two_steps_tiny_pair(tiny_pair, tmp_path):
    """The tiny judge that sees the reference answer: a verifier built on a tiny budget (100 steps, cached; the
    experiment's own verifier takes 2000 steps, minutes, so CI does not build it) records its agreement with
    exact match on held-out answers and on the student's own samples, and judges the rubric
    "{question}{answer}={reference}=" (the environment's answer filled in) through verdict = loglik: every
    rollout gets 2 P(yes) - 1."""
    from shared.builders.tiny_pair import read_build_info
    from shared.builders.tiny_verifier import build_verifier

    verifier = build_verifier("exact", steps=100, layout="reference")
    info = read_build_info(verifier)
    assert info["train_steps"] == 100 and info["heldout_n"] == 1000 and info["student_samples_n"] == 400
    assert info["layout"] == "reference" and info["rubric"] == "{question}{answer}={reference}="
    # 100 steps are far from competent (the 2000-step build: 0.962) and not bit-reproducible across machines:
    # builds measured 0.526 and 0.564 overall, 0.90 and 0.85 on correct answers. What every build must show is
    # that it tells right from wrong better than any constant answer: balanced accuracy (the mean of its agreement
    # on correct and on wrong answers, 0.5 for "always yes" or "always no") measured 0.537 and 0.571.
    by_kind, n_by_kind = info["heldout_agreement_by_kind"], info["heldout_n_by_kind"]
    n_wrong = sum(n for k, n in n_by_kind.items() if k != "correct")
    on_wrong = sum(by_kind[k] * n for k, n in n_by_kind.items() if k != "correct") / n_wrong
    assert sum(n_by_kind.values()) == info["heldout_n"]
    assert info["heldout_agreement"] * info["heldout_n"] == pytest.approx(
        by_kind["correct"] * n_by_kind["correct"] + on_wrong * n_wrong)
    assert (by_kind["correct"] + on_wrong) / 2 > 0.52 and by_kind["correct"] >= 0.75
    from tests.test_e2e import run_rl

    out = tmp_path / "j"  # no KL term (kl_coef = 0): teacher_kl is not measured, so not through _run
    p = run_rl("@", "experiments/judge/tiny.toml", "--output_dir", str(out), *SMALL, "--teacher.name", str(verifier))
    assert p.returncode == 0, p.stderr[-3000:]
    train = [r for r in read_metrics(out / "metrics.jsonl") if "judge/p_yes" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["judge/teacher_failed"] == 0
        assert r["judge/unparseable"] == r["judge/too_long"]  # loglik: only a prompt too long has no verdict
        # every judged rollout's reward is its graded verdict 2 P(yes) - 1
        assert r["judge/reward_mean"] == pytest.approx(2 * r["judge/p_yes"] - 1, abs=1e-9)
        assert 0.0 <= r["judge/agreement"] <= 1.0 and 0.0 <= r["judge/check_mean"] <= 1.0
        assert r["loss/lockin"] is not None


@pytest.mark.engine
def test_continual_workflow_two_steps_two_teachers(tiny_pair, tmp_path):
    """experiments/multi_teacher is experiments/continual (whose gate test below runs it with one teacher) with a
    teacher engine per environment: both workflows in one run, one more engine start."""
    rows, train = _run("experiments/multi_teacher/rl.toml", tmp_path / "cl")
    evals = [r for r in rows if "eval/core/reverse_text_short/avg" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval/core/reverse_text_short/delta_from_start"] == 0.0
    assert all("eval/reverse_text_long/avg" in r for r in evals)
    assert all(r["continual/replay_prompts"] == 2 for r in train) and all("loss/ref_kl" in r for r in train)
    final = json.loads((tmp_path / "cl" / "final_adapter.json").read_text())
    assert final["step"] == 2 and not final["gate_failed"]
    # two teacher engines, each scoring its environment's rollouts: 6 long and 2 replayed short prompts of 8
    pids = json.loads((tmp_path / "cl" / "logs" / "pids.json").read_text())
    assert "teacher-0" in pids and "teacher-1" in pids and pids["teacher-0"] != pids["teacher-1"]
    for r in train:
        assert (r["teacher/long/prompts"], r["teacher/short/prompts"]) == (6, 2)
        assert r["teacher/long/rollouts"] + r["teacher/short/rollouts"] + r["rollouts/empty"] == 8 * 4
        for t in ("long", "short"):
            assert r[f"teacher/{t}/scored"] == r[f"teacher/{t}/rollouts"] > 0
        # merged back in order: the aggregate KL is the token-weighted mean of the two teachers'
        n_long, n_short = r["teacher/long/tokens"], r["teacher/short/tokens"]
        assert r["teacher_kl"] == pytest.approx(
            (n_long * r["teacher/long/kl"] + n_short * r["teacher/short/kl"]) / (n_long + n_short), rel=1e-6)


@pytest.mark.engine
def test_continual_gate_restores_the_last_passing_adapter(tiny_pair, tmp_path):
    """A learning rate that wrecks the student: the core metric regresses at step 1, the engines go back
    to step_0 (the untouched student), whose evaluation then equals the start's. Merged, so step 1's adapter
    reached the engine from trainer memory and its file is written in the background: the gate must still
    find it and set it aside."""
    out = tmp_path / "gate"
    rows, _ = _run("experiments/continual/rl.toml", out, "--trainer.lr", "0.5", "--orchestrator.eval.interval", "1",
                   "--orchestrator.continual.max_regression", "0.0", "--orchestrator.eval_baseline", "true",
                   "--inference.lora_mode", "merge", steps=(1,))
    start = next(r for r in rows if r.get("step") == 0 and "eval/core/reverse_text_short/avg" in r)
    # eval_baseline also scores the teacher on each core behaviour: the trained tiny teacher reverses short
    # texts far better than the student it will teach
    assert start["eval/core/reverse_text_short/baseline_teacher/avg"] > start["eval/core/reverse_text_short/avg"] + 0.3
    failed = next(r for r in rows if r.get("continual/gate_failed") == 1.0)
    restored = next(r for r in rows if "continual/restored_step" in r)
    assert failed["eval/core/reverse_text_short/delta_from_start"] < 0
    assert restored["continual/restored_step"] == 0
    assert restored["eval/core/reverse_text_short/avg"] == start["eval/core/reverse_text_short/avg"]
    final = json.loads((out / "final_adapter.json").read_text())
    assert final["gate_failed"] and final["step"] == 0
    assert not (out / "broadcast" / f"step_{failed['step']}").exists()
    assert (out / "broadcast" / f"rejected_step_{failed['step']}" / "COMPLETE").exists()


@pytest.mark.engine
def test_judge_workflow_two_steps_smollm2(tmp_path):
    """The real judge: SmolLM2-135M-Instruct reads the rubric through its chat template and is read by
    log-likelihood (verdict = loglik, graded): every rollout gets 2 P(Yes | Yes or No) - 1, none is
    unparseable."""
    from tests.test_e2e import run_rl

    out = tmp_path / "js"
    p = run_rl("@", "experiments/judge/rl.toml", "--output_dir", str(out), "--max_steps", "2",
               "--orchestrator.eval.num_prompts", "4", "--wandb.mode", "disabled", timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    train = [r for r in read_metrics(out / "metrics.jsonl") if "teacher_kl" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["judge/unparseable"] == r["judge/dropped"] == r["judge/too_long"] == 0
        assert 0.0 < r["judge/p_yes"] < 1.0 and -1.0 < r["reward/mean"] < 1.0
        # every rollout's reward is its graded verdict: the means agree, and 2 p - 1 averages to the same
        assert r["reward/mean"] == pytest.approx(r["judge/reward_mean"])
        assert r["reward/mean"] == pytest.approx(2 * r["judge/p_yes"] - 1, abs=1e-9)
        assert 0.0 <= r["judge/agreement"] <= 1.0


@pytest.mark.engine
def test_sft_workflow_two_steps(tiny_pair, tmp_path):
    """experiments/sft/rl.toml: the teacher writes the completions (the student engines sample nothing), the
    trainer fits them by NLL; the KL is not measured (NaN, null in metrics.jsonl)."""
    from tests.test_e2e import run_rl

    out = tmp_path / "sft"
    p = run_rl("@", "experiments/sft/rl.toml", "--output_dir", str(out), *SMALL, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    train = [r for r in read_metrics(out / "metrics.jsonl") if "tokens/step" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["teacher_kl"] is None and r["loss/policy"] == 0.0 and r["loss/sft"] > 0
        assert r["time/inference"] == 0.0 and r["time/teacher"] > 0 and r["tokens/step"] > 0
    assert train[1]["loss/sft"] < train[0]["loss/sft"] * 1.5  # a step of NLL does not blow the next one up
