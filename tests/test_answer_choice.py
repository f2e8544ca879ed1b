"""A fixed answer set as the action space: answers drawn by the student's log-likelihood."""

import itertools
import json
import math
from collections import Counter

import pytest

from inference.answer_choice import answer_distribution, draw_answers
from shared.config import ConfigError, from_dict


def test_distribution_by_hand():
    # L = (-1, -2, -3), T = 1: weights e^0, e^-1, e^-2 over 1 + e^-1 + e^-2 = 1.503215
    z = 1 + math.exp(-1) + math.exp(-2)
    assert answer_distribution([-1.0, -2.0, -3.0], 1.0) == pytest.approx([1 / z, math.exp(-1) / z, math.exp(-2) / z])
    # T = 0.5 doubles the gaps: e^0, e^-2, e^-4
    z = 1 + math.exp(-2) + math.exp(-4)
    assert answer_distribution([-1.0, -2.0, -3.0], 0.5) == pytest.approx([1 / z, math.exp(-2) / z, math.exp(-4) / z])


def test_greedy_ties_nan_and_all_impossible():
    assert answer_distribution([-3.0, -1.0, -1.0], 0.0) == [0.0, 1.0, 0.0]  # arg-max, ties to the first listed
    assert answer_distribution([float("nan"), -5.0], 1.0) == [0.0, 1.0]  # NaN counts as -inf
    assert answer_distribution([-math.inf, -math.inf], 1.0) == [1.0, 0.0]
    with pytest.raises(ValueError):
        answer_distribution([], 1.0)


def test_draws_are_seeded_and_follow_the_distribution():
    ll = [math.log(0.7), math.log(0.2), math.log(0.1)]
    a = draw_answers(ll, 4000, 1.0, seed=7)
    assert a == draw_answers(ll, 4000, 1.0, seed=7)
    freq = Counter(a)
    for i, p in enumerate([0.7, 0.2, 0.1]):  # 4000 draws: standard error <= 0.008
        assert freq[i] / 4000 == pytest.approx(p, abs=0.03)
    assert draw_answers(ll, 5, 0.0, seed=1) == [0] * 5


@pytest.mark.parametrize("over, message", [
    ({"orchestrator": {"env_args": {"answer_choice": "loglik"}}}, "needs orchestrator.env_args.answers"),
    ({"orchestrator": {"env_args": {"answer_choice": "loglik", "answers": ["a", "b"]}}},
     'set inference.lora_mode = "merge"'),
    ({"orchestrator": {"env_args": {"answer_choice": "argmax", "answers": ["a"]}}}, "answer_choice"),
])
def test_config_errors(over, message):
    with pytest.raises(ConfigError, match="orchestrator.env_args.answer_choice") as e:
        from_dict(over)
    assert message in str(e.value)


@pytest.mark.engine
def test_engine_draws_allowed_answers_with_the_students_logprobs(tiny_pair):
    """In the real engine: every rollout is an allowed answer, its log-probs are the student's (checked
    against transformers), greedy picks the most likely answer, and T = 1 draws follow pi(a)."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.engine import InferenceEngine
    from shared.engines import engine_env
    from shared.wire import RolloutBatch, decode

    _, student = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(student))
    answers = ["".join(p) for p in itertools.permutations("abc")]
    prompts = [tok("abc=").input_ids, tok("cab=").input_ids]
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    ref = []  # per prompt: each answer's per-token log-probs under transformers
    for p in prompts:
        rows = []
        for a in answers:
            c = tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0, :-1], -1)
            rows.append(logp[len(p) - 1:].gather(-1, torch.tensor(c)[:, None])[:, 0].tolist())
        ref.append(rows)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a leftover cluster
    try:
        spec = dict(dtype="float32", max_model_len=32, seed=0, lora_rank=8, lora_mode="merge", answers=answers,
                    answer_choice="loglik")
        engine = ray.remote(InferenceEngine).options(num_cpus=0, runtime_env={"env_vars": engine_env(1)}).remote(
            str(student), spec, None)
        ray.get(engine.ready.remote())
        greedy = decode(ray.get(engine.generate.remote(prompts, [0, 1], 2, 0.0, 1.0, 12, 0)), RolloutBatch).rollouts
        drawn = decode(ray.get(engine.generate.remote(prompts, [0, 1], 600, 1.0, 1.0, 12, 0)), RolloutBatch).rollouts
    finally:
        ray.shutdown()

    for j, p in enumerate(prompts):
        sums = [sum(r) for r in ref[j]]
        mine = [r for r in greedy if r.prompt_index == j]
        assert {r.text for r in mine} == {answers[max(range(6), key=lambda i: sums[i])]}
        for r in mine:
            assert r.prompt_ids == p and r.finish_reason == "stop"
            assert r.logprobs == pytest.approx(ref[j][answers.index(r.text)], abs=1e-4)
        counts = Counter(r.text for r in drawn if r.prompt_index == j)
        assert sum(counts.values()) == 600 and set(counts) <= set(answers)
        for a, pa in zip(answers, answer_distribution(sums, 1.0)):  # 600 draws: standard error <= 0.021
            assert counts[a] / 600 == pytest.approx(pa, abs=0.07), (a, counts, pa)


@pytest.mark.engine
def test_two_step_run_with_an_answer_set(tiny_pair, tmp_path):
    """Through the real CLI: with answer_choice = loglik every rollout is one of the 24 allowed
    4-letter answers (4 tokens + EOS), so the mean completion length is exactly 5."""
    from shared.metrics import read_metrics
    from tests.test_e2e import run_rl

    perms = ["".join(p) for p in itertools.permutations("abcd")]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{p}=", "answer": p[::-1]}) + "\n" for p in perms))
    out = tmp_path / "run"
    p = run_rl("@", "experiments/reverse_text/rl.toml", "--max_steps", "2", "--output_dir", str(out),
               "--orchestrator.environment", "exact_answer", "--orchestrator.dataset.path", str(data),
               "--orchestrator.env_args.answers", ",".join(perms), "--orchestrator.env_args.answer_choice", "loglik",
               "--inference.lora_mode", "merge", "--orchestrator.batch_size", "4", "--orchestrator.eval.num_prompts",
               "4", "--wandb.mode", "disabled")
    assert p.returncode == 0, p.stderr[-3000:]
    train = [r for r in read_metrics(out / "metrics.jsonl") if "teacher_kl" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["seq_len/mean"] == 5.0 for r in train)
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in train)
