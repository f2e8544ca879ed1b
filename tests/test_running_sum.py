"""The long-horizon task (``shared/builders/tiny_long.py``, ``orchestrator/environments/running_sum.py``): the
generator and both scores against hand-worked values, the held-out split, the environment and its reward option,
and the builder on a two-step recipe (seconds on one thread: its checks, records and cache, not its accuracy)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from orchestrator.data import Prompt
from orchestrator.environments import REGISTRY, make
from shared.builders import tiny_long as tl
from shared.builders import tiny_pair as tp
from shared.config import ConfigError, from_dict


def test_answer_is_each_digit_then_the_running_total_mod_10():
    # totals 3, 3+1=4, 4+4=8, 8+1=9, 9+5=14 -> 4
    assert tl.steps_for("31415") == ["33", "14", "48", "19", "54"] and tl.answer_for("31415") == "3314481954"
    assert tl.answer_for("000") == "000000" and tl.answer_for("999") == "999897"  # 9, 18, 27 mod 10
    assert tl.prompt_for("31415") == "3 1 4 1 5 ="
    digits = tl.make_digits(random.Random(0))
    assert len(digits) == tl.MAX_DIGITS == 16 and digits.isdigit() and len(tl.answer_for(digits)) == 32


def test_partial_credit_counts_the_steps_right_before_the_first_wrong_one():
    answer = tl.answer_for("31415")  # "33 14 48 19 54" without the spaces
    assert tl.partial_score(answer, "3314481954") == 1.0 and tl.exact_score(answer, " 3314481954\n") == 1.0
    assert tl.partial_score(answer, "3314491954") == pytest.approx(2 / 5)  # step 3 wrong; 4 and 5 right after it
    assert tl.partial_score(answer, "3414481954") == 0.0  # the first total wrong: nothing counts
    assert tl.partial_score(answer, "331448") == pytest.approx(3 / 5)  # stopped early
    assert tl.partial_score(answer, "331448195401") == pytest.approx(5 / 6)  # ran on: over the longer of the two
    assert tl.partial_score(answer, "33144819545") == pytest.approx(5 / 6)  # an odd last character is a step
    assert tl.partial_score(answer, "") == 0.0 and tl.exact_score(answer, "33144819") == 0.0


def test_heldout_split_is_stable_disjoint_and_prefix_closed():
    held = tl.heldout_digits(40)
    assert held[:10] == tl.heldout_digits(10) and len(set(held)) == 40 and all(tl.is_heldout(s) for s in held)
    rng = random.Random(7)
    train = [tl.training_digits(rng) for _ in range(500)]
    assert not any(tl.is_heldout(s) for s in train)
    share = sum(tl.is_heldout(tl.make_digits(random.Random(i))) for i in range(2000)) / 2000
    assert 0.15 < share < 0.25  # ~1 in HELDOUT_EVERY = 5


def _cfg(reward: str = "exact", seed: int = 0):
    return from_dict({"seed": seed, "orchestrator": {"environment": "running_sum",
                                                     "env_args": {"running_sum": {"reward": reward}}}})


def test_environment_rewards_exact_match_or_partial_credit_and_logs_both():
    assert REGISTRY["running_sum"].name == "running_sum"
    env, partial = make(_cfg()), make(_cfg("partial"))
    train = env.next_prompts(20)
    assert train == make(_cfg()).next_prompts(20)  # deterministic from cfg.seed
    assert all(p.text.endswith(" =") and p.answer == tl.answer_for(p.text[:-2].replace(" ", "")) for p in train)
    evals = env.eval_prompts(5)
    assert [p.text for p in evals] == [tl.prompt_for(s) for s in tl.heldout_digits(5)]
    assert not {p.text for p in evals} & {p.text for p in env.next_prompts(500)}
    p = Prompt(text="3 1 4 1 5 =", answer="3314481954")
    assert (env.score(p, "3314491954"), partial.score(p, "3314491954")) == (0.0, pytest.approx(0.4))
    assert env.score(p, "3314481954") == partial.score(p, "3314481954") == 1.0
    scored = [(p, "3314481954"), (p, "3314491954"), (p, "9")]
    assert env.eval_metrics(scored) == pytest.approx({"exact": 1 / 3, "partial": (1 + 0.4 + 0) / 3})
    assert make(from_dict({"orchestrator": {"environment": "reverse_text"}})).eval_metrics(scored) == {}
    with pytest.raises(ConfigError, match=r"orchestrator\.env_args\.running_sum\.reward"):
        _cfg("prefix")


def test_tokenizer_is_one_token_per_character_with_the_pair_special_ids():
    tok = tl.char_tokenizer(tl.CHARACTERS)
    assert len(tok) % tp.VOCAB_MULTIPLE == 0 and (tok.eos_token_id, tok.pad_token_id) == (tp.EOS_ID, tp.PAD_ID)
    text = tl.prompt_for("31415") + tl.answer_for("31415")
    ids = tok(text).input_ids
    assert ids[0] == tp.BOS_ID and tp.UNK_ID not in ids and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert 1 + 2 * tl.MAX_DIGITS + 1 + 2 * tl.MAX_DIGITS + 1 <= tl.MAX_POSITIONS  # BOS, prompt, "=", answer, EOS


@pytest.fixture
def two_step_recipe(monkeypatch):
    """The builder's recipe cut to two optimiser steps on small models (its accuracy thresholds set by each test)."""
    tiny = tp.ModelSpec(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32)
    train = tp.TrainSpec(lr=1e-3, batch_size=4, warmup_steps=1, schedule_steps=2, eval_every=2,
                         stop_at_val_accuracy=1.0)
    for name, value in {"TEACHER_MODEL": tiny, "STUDENT_MODEL": tiny, "TEACHER_TRAIN": train, "STUDENT_TRAIN": train,
                        "VALIDATION_N": 4, "HELDOUT_EVAL_N": 4}.items():
        monkeypatch.setattr(tl, name, value)
    return monkeypatch


def test_builder_records_scores_caches_and_refuses_a_weak_teacher(two_step_recipe, tmp_path):
    two_step_recipe.setattr(tl, "TEACHER_MIN_ACCURACY", 0.5)  # two steps solve nothing: a build error
    with pytest.raises(RuntimeError, match=r"^tiny_long: teacher reached only 0\.000 held-out exact match"):
        tl.build_pair(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tp.LOCK_FILE]  # nothing installed, no temporaries left

    two_step_recipe.setattr(tl, "TEACHER_MIN_ACCURACY", 0.0)
    teacher, student = tl.build_pair(tmp_path)
    assert (teacher.name, student.name) == tl.pair_dir_names() and tl.is_built(tmp_path)
    info = {role: json.loads((d / tp.BUILD_MARKER).read_text()) for role, d in (("teacher", teacher), ("student", student))}
    for role, rec in info.items():
        assert rec["role"] == role and rec["task"] == "running_sum" and rec["train_steps"] == 2
        assert rec["heldout_n"] == 4 and 0 <= rec["heldout_accuracy"] <= rec["heldout_partial"] <= 1
        assert rec["recipe_hash"] == tl.RECIPE_HASH and rec["model"] == dataclasses.asdict(tl.TEACHER_MODEL)
    two_step_recipe.setattr(tl, "train_model", lambda *a, **k: pytest.fail("a cached pair is trained again"))
    assert tl.build_pair(tmp_path) == (teacher, student)
