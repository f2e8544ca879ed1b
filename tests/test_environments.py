"""Environments: deterministic prompts, held-out evaluation disjoint from training, scoring, dataset rows,
the fixed answer set and its config keys.  Pure CPU, no engine."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import environments
from orchestrator.data import DatasetError, Prompt
from orchestrator.environments import REGISTRY, make
from shared.answers import choose_by_loglik, match_answer, normalize
from orchestrator.environments.arithmetic import evaluate, expression, last_integer, solution
from orchestrator.environments.base import HELDOUT_SEED, GeneratedEnvironment, is_heldout
from orchestrator.environments.format_check import instruction, rule_score
from orchestrator.environments.reasoning_gym_env import extract
from shared.config import Config, ConfigError, from_dict, load

GENERATED = ["reverse_text", "arithmetic", "format_check", "reasoning_gym", "french"]


def cfg_for(environment: str, seed: int = 0, dataset: str = "", on_bad_row: str = "error", **env_args) -> Config:
    raw = {"seed": seed, "orchestrator": {"environment": environment, "env_args": env_args}}
    if dataset:
        raw["orchestrator"]["dataset"] = {"path": dataset, "on_bad_row": on_bad_row}
    return from_dict(raw)


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def envs():
    return {name: make(cfg_for(name)) for name in GENERATED}


# ----------------------------------------------------------------------------------------------
# Every generated environment


@pytest.mark.parametrize("name", GENERATED)
def test_prompts_are_deterministic_from_the_seed(name):
    a, b, c = (make(cfg_for(name, seed=s)) for s in (3, 3, 4))
    pa, pb, pc = a.next_prompts(40), b.next_prompts(40), c.next_prompts(40)
    assert [p.text for p in pa] == [p.text for p in pb]
    assert [p.answer for p in pa] == [p.answer for p in pb]
    assert [p.text for p in pa] != [p.text for p in pc]
    assert all(isinstance(p, Prompt) and p.text.strip() for p in pa)
    assert a.position == 40
    # Evaluation does not depend on the seed, and a longer list extends a shorter one.
    assert [p.text for p in a.eval_prompts(10)] == [p.text for p in c.eval_prompts(10)]
    assert [p.text for p in a.eval_prompts(5)] == [p.text for p in a.eval_prompts(10)[:5]]


@pytest.mark.parametrize("name", GENERATED)
def test_eval_prompts_are_disjoint_from_training(envs, name):
    env = envs[name]
    n = 64 if name != "french" else 1000  # french: all of its held-out questions
    held = {p.text for p in env.eval_prompts(n)}
    assert held and len(held) == len(env.eval_prompts(n))  # distinct
    train = {p.text for p in make(cfg_for(name, seed=1)).next_prompts(2000)}
    assert not held & train


@pytest.mark.parametrize("name", GENERATED)
def test_reference_answer_scores_one_and_empty_scores_zero(envs, name):
    env = envs[name]
    for p in env.eval_prompts(8) + env.next_prompts(8):
        assert env.score(p, "") == 0.0
        if p.answer is not None:
            assert env.score(p, p.answer) == 1.0


@pytest.mark.parametrize("name", GENERATED)
@settings(max_examples=60, deadline=None)
@given(completion=st.text(max_size=60))
def test_scores_stay_in_unit_interval(envs, name, completion):
    env = envs[name]
    for p in env.eval_prompts(2):
        assert 0.0 <= env.score(p, completion) <= 1.0


def test_every_registered_environment_is_documented():
    import msgspec

    from shared.config import OrchestratorConfig

    described = str(next(f.type for f in msgspec.structs.fields(OrchestratorConfig) if f.name == "environment"))
    for name in REGISTRY:
        assert f"``{name}``" in (environments.__doc__ or "")
        assert name in described


def test_unknown_environment_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^orchestrator.environment: unknown environment 'nope'"):
        make(cfg_for("nope"))


# ----------------------------------------------------------------------------------------------
# reverse_text


def test_reverse_text_training_skips_the_tiny_pairs_heldout_strings():
    from shared.builders import tiny_pair

    env = make(cfg_for("reverse_text"))
    excluded = {tiny_pair.prompt_for(s) for s in tiny_pair.heldout_strings(tiny_pair.HELDOUT_EXCLUDED)}
    assert not excluded & {p.text for p in env.next_prompts(3000)}
    assert [p.text for p in env.eval_prompts(3)] == [tiny_pair.prompt_for(s) for s in tiny_pair.heldout_strings(3)]
    p = env.eval_prompts(1)[0]
    assert env.score(p, f" {p.answer}\n") == 1.0
    assert env.score(p, p.answer[:-1]) == 0.0
    with pytest.raises(ValueError):
        env.eval_prompts(tiny_pair.HELDOUT_EXCLUDED + 1)


# ----------------------------------------------------------------------------------------------
# arithmetic


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("49", 49), ("-48", -48), ("The answer is 49.", 49), ("37 + 12 = 49", 49), ("5-3=2", 2), ("5-3", 3),
        ("x = −7", -7), ("1,234", 1234), ("about 12,345,678 units", 12345678), ("49.0", 49), ("49.50", None),
        ("3.14", None), ("no number here", None), ("", None), ("abc12", None), ("12 and then 13", 13),
        ("(-4)", -4), ("9" * 5000, None),
    ],
)
def test_last_integer(text, value):
    assert last_integer(text) == value


def test_expression_and_precedence():
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([2, 3, 4], ["*", "-"]) == 2
    assert evaluate([10, 3, 2, 5], ["-", "*", "+"]) == 9
    assert expression([3, -4], ["-"]) == "3 - (-4)" and evaluate([3, -4], ["-"]) == 7
    assert expression([-2, 5], ["*"]) == "(-2) * 5"


def test_arithmetic_scoring_and_options():
    env = make(cfg_for("arithmetic", arithmetic={"min_operand": -5, "max_operand": 5, "operators": ["*", "+"],
                                                 "terms": 3}))
    prompts = env.next_prompts(200)
    for p in prompts:
        assert p.text.startswith("What is ") and p.text.endswith("?")
        inner = p.text[len("What is "):-1]
        assert "-" not in inner.replace("(-", "")  # only * and +, negatives in parentheses
        assert inner.count("*") + inner.count("+") == 2
        assert int(p.answer) == eval(inner)  # noqa: S307 - our own generated expression
    p = Prompt(text="What is 40 + 2?", answer="42")
    assert env.score(p, "42") == 1.0
    assert env.score(p, "40 + 2 = 42.") == 1.0
    assert env.score(p, "I think it is 41, no wait, 42") == 1.0
    assert env.score(p, "42, or maybe 43") == 0.0  # the last number counts
    assert env.score(p, "forty-two") == 0.0
    assert env.score(p, "-42") == 0.0
    assert env.score(p, "") == 0.0


def test_arithmetic_solution_is_worked_step_by_step():
    assert solution([37, 12, 4], ["+", "*"]) == "37 + 12 * 4 = 37 + 48 = 85. The answer is 85."
    assert solution([5, -3, 2, 7], ["-", "*", "-"]) == "5 - (-3) * 2 - 7 = 5 - (-6) - 7 = 11 - 7 = 4. The answer is 4."
    assert solution([10, 3, 2], ["-", "-"]) == "10 - 3 - 2 = 7 - 2 = 5. The answer is 5."  # left to right
    assert solution([3, 4], ["*"]) == "3 * 4 = 12. The answer is 12."


def test_arithmetic_teacher_context_solution():
    """``teacher_context = "solution"``: every generated prompt (training and held-out) carries its worked
    solution, ending in its answer; the prompt text and the draws are those of the default (no context)."""
    args = {"min_operand": -9, "max_operand": 30, "terms": 3}
    plain, with_solution = (make(cfg_for("arithmetic", arithmetic={**args, **extra}))
                            for extra in ({}, {"teacher_context": "solution"}))
    a, b = plain.next_prompts(50) + plain.eval_prompts(10), with_solution.next_prompts(50) + with_solution.eval_prompts(10)
    assert [p.text for p in a] == [p.text for p in b] and all(p.teacher_context is None for p in a)
    for p in b:
        assert p.teacher_context.startswith(p.text[len("What is "):-1] + " = ")
        assert p.teacher_context.endswith(f"The answer is {p.answer}.")


def test_arithmetic_solution_context_needs_generated_prompts(tmp_path):
    path = _write(tmp_path, [{"prompt": "What is 1 + 1?", "answer": "2"}])
    with pytest.raises(ConfigError, match=r"^orchestrator\.env_args\.arithmetic\.teacher_context: \"solution\""):
        make(cfg_for("arithmetic", dataset=path, arithmetic={"teacher_context": "solution"}))


def test_arithmetic_space_too_small_is_a_config_error():
    # One possible prompt: either it is held out (no training prompt) or it is not (no evaluation prompt).
    with pytest.raises(ConfigError, match=r"^orchestrator\.(env_args\.arithmetic|environment): .*arithmetic"):
        make(cfg_for("arithmetic", arithmetic={"min_operand": 7, "max_operand": 7, "operators": ["+"]}))


def test_small_space_gives_fewer_eval_prompts():
    env = make(cfg_for("arithmetic", arithmetic={"min_operand": 0, "max_operand": 9, "operators": ["+"]}))
    held = env.eval_prompts(1000)
    assert 5 < len(held) < 100  # 100 possible prompts, ~1 in 5 held out
    assert all(is_heldout(p.text) for p in held)


# ----------------------------------------------------------------------------------------------
# format_check


@pytest.mark.parametrize(
    ("rules", "completion", "score"),
    [
        (["uppercase"], "PARIS IS THE CAPITAL.", 1.0),
        (["uppercase"], "Paris is the capital.", 0.0),
        (["uppercase"], "123 !!", 0.0),  # no letter at all
        (["uppercase"], "", 0.0),
        (["lowercase"], "paris, 2024.", 1.0),
        (["period"], "It is blue.", 1.0),
        (["period"], "It is blue.  \n", 1.0),
        (["period"], "It is blue", 0.0),
        (["period"], ".", 0.0),
        (["no_commas"], "red green blue", 1.0),
        (["no_commas"], "red, green", 0.0),
        (["no_commas"], "   ", 0.0),
        (["uppercase", "period"], "YES.", 1.0),
        (["uppercase", "period"], "YES", 0.5),
        (["uppercase", "period", "no_commas"], "no, thanks", 0.0),
    ],
)
def test_format_rules(rules, completion, score):
    assert rule_score(rules, completion) == pytest.approx(score)
    env = make(cfg_for("format_check", format_check={"rules": rules}))
    assert env.score(env.eval_prompts(1)[0], completion) == pytest.approx(score)


def test_format_check_instruction_in_prompt_or_not():
    plain = make(cfg_for("format_check"))
    told = make(cfg_for("format_check", format_check={"rules": ["uppercase", "period"], "instruct": True}))
    suffix = instruction(["uppercase", "period"])
    assert suffix == "Write your whole answer in uppercase letters. End your answer with a period."
    assert all(not p.text.endswith(suffix) for p in plain.next_prompts(5) + plain.eval_prompts(5))
    assert all(p.text.endswith(" " + suffix) for p in told.next_prompts(5) + told.eval_prompts(5))


# ----------------------------------------------------------------------------------------------
# reasoning_gym


@pytest.mark.parametrize(
    ("completion", "given"),
    [("<answer>42</answer>", "42"), ("think... <answer> 7 </answer> more <answer>8</answer>", "8"),
     ("  42 \n", "42"), ("", "")],
)
def test_reasoning_gym_extract(completion, given):
    assert extract(completion) == given


@pytest.mark.parametrize("dataset", ["leg_counting", "chain_sum", "basic_arithmetic"])
def test_reasoning_gym_datasets_score_with_their_own_scorer(dataset):
    env = make(cfg_for("reasoning_gym", reasoning_gym={"dataset": dataset}))
    for p in env.eval_prompts(5) + env.next_prompts(5):
        entry = p.meta["entry"]
        assert p.text.startswith(entry["question"].rstrip())
        assert p.text.endswith("<answer> and </answer> tags.")
        assert env.score(p, f"Let me count. <answer>{p.answer}</answer>") == 1.0
        assert env.score(p, p.answer) == 1.0
        assert env.score(p, "<answer>not a number</answer>") == 0.0
        assert env.score(p, "") == 0.0
        assert 0.0 < env.score(p, f"I believe the answer is {p.answer}") < 1.0  # its partial credit


def test_reasoning_gym_options_and_instruction():
    env = make(cfg_for("reasoning_gym", reasoning_gym={
        "dataset": "chain_sum", "options": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "instruction": ""}))
    for p in env.next_prompts(20):
        assert p.text == p.meta["entry"]["question"].rstrip()
        assert p.meta["entry"]["metadata"]["num_terms"] == 2


def test_reasoning_gym_dataset_file_rows_match_exactly(tmp_path):
    path = _write(tmp_path, [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}])
    env = make(cfg_for("reasoning_gym", dataset=path))
    p = env.next_prompts(1)[0]
    assert p.meta is None
    assert env.score(p, f"<answer>{p.answer}</answer>") == 1.0
    assert env.score(p, "the answer is " + p.answer) == 0.0


# ----------------------------------------------------------------------------------------------
# Dataset files: override, bad rows, the environment's own row rules


def test_dataset_file_replaces_generated_training_prompts(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(7)]
    path = _write(tmp_path, rows)
    a, b = make(cfg_for("arithmetic", dataset=path)), make(cfg_for("arithmetic", dataset=path))
    first = a.next_prompts(7)
    assert sorted(p.text for p in first) == sorted(r["prompt"] for r in rows)  # one epoch = every row once
    assert first == b.next_prompts(7)
    assert a.score(first[0], first[0].answer) == 1.0
    assert a.eval_prompts(3) == make(cfg_for("arithmetic")).eval_prompts(3)  # evaluation stays generated


@pytest.mark.parametrize(
    ("environment", "row", "problem"),
    [
        ("arithmetic", {"prompt": "What is 1 + 1?"}, "missing field 'answer'"),
        ("arithmetic", {"prompt": "What is 1 + 1?", "answer": "two"}, "'answer' must be an integer"),
        ("arithmetic", {"prompt": "What is 1 + 1?", "answer": "2 apples"}, "'answer' must be an integer"),
        ("reverse_text", {"prompt": "abc="}, "missing field 'answer'"),
        ("reasoning_gym", {"prompt": "q"}, "missing field 'answer'"),
        ("exact_answer", {"prompt": "q"}, "missing field 'answer'"),
        ("arithmetic", {"prompt": ""}, "'prompt' must be a non-empty string"),
        ("format_check", {"answer": "x"}, "missing field 'prompt'"),
        ("format_check", '{"prompt": ', "not valid JSON"),
    ],
)
def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path, environment, row, problem):
    good = [{"prompt": f"What is {i} + 0? {w}", "answer": str(i)} for i, w in enumerate("abcdefghijklmnopqrst")]
    path = _write(tmp_path, good[:2] + [row] + good[2:])
    with pytest.raises(DatasetError) as e:
        make(cfg_for(environment, dataset=path))
    assert str(e.value).startswith(f"{path}:3: {problem}"), str(e.value)
    env = make(cfg_for(environment, dataset=path, on_bad_row="skip"))
    assert env.bad_rows == 1 and len(env.dataset) == len(good)


def test_format_and_french_rows_need_no_answer(tmp_path):
    path = _write(tmp_path, [{"prompt": "Tell me about bread."}, {"prompt": "What is rain?"}])
    for name in ("format_check", "french"):
        env = make(cfg_for(name, dataset=path))
        assert env.bad_rows == 0 and {p.text for p in env.next_prompts(2)} == {"Tell me about bread.", "What is rain?"}


# ----------------------------------------------------------------------------------------------
# exact_answer


def test_exact_answer_splits_the_file_and_matches_normalised(tmp_path):
    rows = [{"prompt": f"Capital number {i}?", "answer": f"City {i}"} for i in range(60)]
    path = _write(tmp_path, rows)
    env = make(cfg_for("exact_answer", dataset=path))
    held = env.eval_prompts(100)
    train = {p.text for p in env.next_prompts(300)}
    assert held and train and not {p.text for p in held} & train
    assert len(held) + len(train) == 60
    p = held[0]
    assert env.score(p, p.answer) == 1.0
    assert env.score(p, f"  {p.answer.upper()}. ") == 1.0
    assert env.score(p, "City") == 0.0 and env.score(p, "") == 0.0


def test_exact_answer_needs_a_file_and_enough_rows(tmp_path):
    with pytest.raises(ConfigError, match=r"^orchestrator.environment: \"exact_answer\" needs orchestrator.dataset.path"):
        cfg_for("exact_answer")
    path = _write(tmp_path, [{"prompt": "only one", "answer": "x"}])
    with pytest.raises(DatasetError, match="needs both"):
        make(cfg_for("exact_answer", dataset=path))


# ----------------------------------------------------------------------------------------------
# A fixed answer set


@pytest.mark.parametrize(
    ("completion", "exact", "nearest"),
    [
        ("B", "B", "B"),
        ("  B\n", "B", "B"),
        ("b", None, "B"),
        ("B.", None, "B"),
        ("The answer is B", None, "B"),
        ("Not A, it is C", None, "C"),
        ("This is a test; the answer: D", None, "D"),
        ("Bb", None, "B"),  # the most similar (ties go to the first listed)
        ("", None, None),
        ("  ...  ", None, None),
    ],
)
def test_match_answer(completion, exact, nearest):
    answers = ["A", "B", "C", "D"]
    assert match_answer(completion, answers, "exact") == exact
    assert match_answer(completion, answers, "nearest") == nearest


def test_match_answer_prefers_the_longer_phrase_and_normalises():
    answers = ["York", "New York", "Paris"]
    assert match_answer("I'd say new york!", answers, "nearest") == "New York"
    assert match_answer("PARIS", answers, "nearest") == "Paris"
    assert normalize("  Hello,   World! ") == "hello,   world".replace("   ", " ")


def test_choose_by_loglik():
    assert choose_by_loglik({"yes": -1.5, "no": -0.25}) == "no"
    assert choose_by_loglik({"yes": -1.0, "no": -1.0}) == "yes"  # ties: the first listed
    assert choose_by_loglik({"yes": float("nan"), "no": -30.0}) == "no"
    assert choose_by_loglik({"a": float("-inf"), "b": float("-inf")}) == "a"
    with pytest.raises(ValueError):
        choose_by_loglik({})


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=5), st.floats(allow_nan=True), min_size=1, max_size=6))
def test_choose_by_loglik_is_an_argmax(sums):
    choice = choose_by_loglik(sums)
    assert choice in sums
    finite = [v for v in sums.values() if v == v]
    if finite:
        assert sums[choice] == max(finite)


def test_answers_constrain_scoring(tmp_path):
    rows = [{"prompt": f"Is {i} even?", "answer": "yes" if i % 2 == 0 else "no"} for i in range(40)]
    path = _write(tmp_path, rows)
    exact = make(cfg_for("exact_answer", dataset=path, answers=["yes", "no"]))
    nearest = make(cfg_for("exact_answer", dataset=path, answers=["yes", "no"], answer_match="nearest"))
    p = next(q for q in exact.eval_prompts(40) if q.answer == "yes")
    assert exact.score(p, "yes") == 1.0 and exact.score(p, "no") == 0.0
    assert exact.score(p, "Yes, it is.") == 0.0  # not a member
    assert nearest.score(p, "Yes, it is.") == 1.0
    assert nearest.score(p, "no, it is odd") == 0.0
    bad = _write(tmp_path, rows + [{"prompt": "Is 41 even?", "answer": "maybe"}], name="bad.jsonl")
    with pytest.raises(DatasetError, match=r"bad.jsonl:41: 'answer' 'maybe' is not one of orchestrator.env_args.answers"):
        make(cfg_for("exact_answer", dataset=bad, answers=["yes", "no"]))


def test_answers_with_a_generated_environment():
    env = make(cfg_for("reasoning_gym", reasoning_gym={"dataset": "syllogism"}, answers=["Yes", "No"],
                       answer_match="nearest"))
    p = env.eval_prompts(1)[0]
    assert p.answer in ("Yes", "No")
    assert env.score(p, p.answer.lower() + ", because...") == 1.0


# ----------------------------------------------------------------------------------------------
# Config keys


def test_env_args_defaults():
    ea = Config().orchestrator.env_args
    assert ea.answers == [] and ea.answer_match == "exact"
    assert (ea.arithmetic.min_operand, ea.arithmetic.max_operand, ea.arithmetic.terms) == (0, 99, 2)
    assert ea.arithmetic.operators == ["+", "-", "*"]
    assert ea.format_check.rules == ["uppercase"] and ea.format_check.instruct is False
    assert ea.reasoning_gym.dataset == "leg_counting" and ea.reasoning_gym.options == {}


def test_env_args_from_the_command_line():
    cfg = load(["--orchestrator.environment", "arithmetic", "--orchestrator.env_args.arithmetic.operators", "+,*",
                "--orchestrator.env_args.answers", "yes,no", "--orchestrator.env_args.format_check.rules", "period"])
    ea = cfg.orchestrator.env_args
    assert ea.arithmetic.operators == ["+", "*"] and ea.answers == ["yes", "no"] and ea.format_check.rules == ["period"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--orchestrator.env_args.arithmetic.operators", "+,/"],
         'orchestrator.env_args.arithmetic.operators: unknown value "/"'),
        (["--orchestrator.env_args.arithmetic.operators", "+,+"], "orchestrator.env_args.arithmetic.operators: duplicate"),
        (["--orchestrator.env_args.arithmetic.operators", ""], "orchestrator.env_args.arithmetic.operators: must not be empty"),
        (["--orchestrator.env_args.arithmetic.min_operand", "5", "--orchestrator.env_args.arithmetic.max_operand", "4"],
         "orchestrator.env_args.arithmetic.min_operand: must not be above max_operand"),
        (["--orchestrator.env_args.arithmetic.terms", "1"], "orchestrator.env_args.arithmetic.terms: expected int >= 2"),
        (["--orchestrator.env_args.arithmetic.max_operand", "x"], "orchestrator.env_args.arithmetic.max_operand: expected int"),
        (["--orchestrator.env_args.format_check.rules", "shouting"],
         'orchestrator.env_args.format_check.rules: unknown value "shouting"'),
        (["--orchestrator.env_args.answers", "yes,yes"], "orchestrator.env_args.answers: duplicate answer"),
        (["--orchestrator.env_args.answers", "yes, "], "orchestrator.env_args.answers: an answer must not be empty"),
        (["--orchestrator.env_args.answer_match", "fuzzy"], "orchestrator.env_args.answer_match: expected one of"),
        (["--orchestrator.environment", "reasoning_gym", "--orchestrator.env_args.reasoning_gym.dataset", "nope"],
         'orchestrator.env_args.reasoning_gym.dataset: unknown dataset "nope"'),
        (["--orchestrator.environment", "reasoning_gym", "--orchestrator.env_args.reasoning_gym.dataset", "chain_sum",
          "--orchestrator.env_args.reasoning_gym.options", "{bogus = 1}"],
         "orchestrator.env_args.reasoning_gym.options: "),
        (["--orchestrator.environment", "reasoning_gym", "--orchestrator.env_args.reasoning_gym.dataset", "chain_sum",
          "--orchestrator.env_args.reasoning_gym.options", "{min_terms = 5, max_terms = 2}"],
         "orchestrator.env_args.reasoning_gym.options: max_terms must be >= min_terms"),
        (["--orchestrator.environment", "reasoning_gym", "--orchestrator.env_args.reasoning_gym.options", "{seed = 1}"],
         "orchestrator.env_args.reasoning_gym.options: seed and size are set by the run"),
        (["--orchestrator.env_args.unknown", "1"], "orchestrator.env_args.unknown: unknown option"),
    ],
)
def test_bad_env_args_name_the_key(args, message):
    with pytest.raises(ConfigError) as e:
        load(args)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_env_args_exit_2(tmp_path, capsys):
    from orchestrator.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('[orchestrator.env_args.format_check]\nrules = ["uppercase", "loud"]\n')
    assert main(["@", str(bad), "--dry_run"]) == 2
    assert 'orchestrator.env_args.format_check.rules: unknown value "loud"' in capsys.readouterr().err


def test_env_args_round_trip_through_toml():
    import tomli

    from shared.config import to_toml

    cfg = load(["--orchestrator.environment", "reasoning_gym", "--orchestrator.env_args.reasoning_gym.dataset",
                "chain_sum", "--orchestrator.env_args.reasoning_gym.options", "{min_terms = 2, max_terms = 3}",
                "--orchestrator.env_args.answers", "a,b"])
    assert from_dict(tomli.loads(to_toml(cfg))) == cfg


# ----------------------------------------------------------------------------------------------
# The split helper itself


def test_generated_environment_contract():
    class Coin(GeneratedEnvironment):
        name = "coin"

        def sample(self, rng: random.Random) -> Prompt:
            return Prompt(text=f"flip {rng.randrange(1000)}", answer="x")

        def grade(self, prompt: Prompt, completion: str) -> float:
            return 2.0 if completion == "big" else float("nan")

    env = Coin(Config())
    held = env.eval_prompts(50)
    assert len(held) == 50 and all(is_heldout(p.text) for p in held)
    assert not any(is_heldout(p.text) for p in env.next_prompts(200))
    assert env.score(held[0], "big") == 1.0 and env.score(held[0], "x") == 0.0  # clamped, NaN -> 0
    assert HELDOUT_SEED == 12345
