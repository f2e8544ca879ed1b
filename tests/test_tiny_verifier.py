"""The tiny verifier's data (near misses, labelers), the agreement metric, and the judge prompt it is trained on
(engine-free; the verifier itself is built and checked in tests/test_workflows.py's tiny judge run)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from orchestrator.judge import judge_messages
from shared.builders import tiny_verifier as tv
from shared.builders.tiny_pair import answer_for, prompt_for
from shared.config import load


def test_near_miss_edits_by_hand():
    rng = random.Random(0)  # each edit, then the property that defines it
    r = "dcba"
    assert tv._unreversed(r, rng) == "abcd"
    for _ in range(50):
        d = tv._drop(r, rng)
        assert len(d) == 3 and any(r[:i] + r[i + 1:] == d for i in range(4))
        w = tv._swap(r, rng)
        assert sorted(w) == sorted(r) and sum(a != b for a, b in zip(w, r)) == 2
        i = next(k for k in range(4) if w[k] != r[k])
        assert (w[i], w[i + 1]) == (r[i + 1], r[i])  # adjacent
        p = tv._repeat(r, rng)
        assert len(p) == 5 and any(r[: i + 1] + r[i] + r[i + 1:] == p for i in range(4))
        s = tv._substitute(r, rng)
        assert len(s) == 4 and sum(a != b for a, b in zip(s, r)) == 1 and set(s) <= set(tv.ALPHABET)
        t = tv._truncate(r, rng)
        assert len(t) < 4 and r.startswith(t)
        e = tv._extend(r, rng)
        assert e.startswith(r) and 5 <= len(e) <= tv.MAX_ANSWER


def test_near_miss_is_never_the_answer_and_covers_every_kind():
    rng = random.Random(1)
    kinds = Counter()
    for s in ["aaa", "aba", "abcd", "hgfedcba"] * 100:  # palindromes and one-letter strings too
        kind, wrong = tv.near_miss(s, rng)
        assert wrong != answer_for(s) and kind in tv.NEAR_MISSES
        kinds[kind] += 1
    assert set(kinds) == set(tv.NEAR_MISSES)
    assert kinds["swap"] < kinds["substitute"]  # "aaa" has no swap or copy that changes it: redrawn


@pytest.mark.parametrize("labeler,s,answer,expected", [
    ("exact", "abcd", "dcba", True), ("exact", "abcd", "dcb", False), ("exact", "abcd", "abcd", False),
    ("exact", "abcd", "dcbaa", False),
    ("length", "abcd", "dcba", True), ("length", "abcd", "xxxx", True), ("length", "abcd", "dcbaaaa", True),
    ("length", "abcd", "dcb", False), ("length", "abcd", "", False),
])
def test_labelers_by_hand(labeler, s, answer, expected):
    assert tv.LABELERS[labeler](s, answer) is expected


def test_examples_are_half_correct_and_labels_follow_the_labeler():
    rng = random.Random(2)
    rows = [tv.make_example(rng) for _ in range(2000)]
    correct = sum(a == answer_for(s) for s, a, _ in rows)
    assert 900 < correct < 1100  # Binomial(2000, 1/2): mean 1000, sd 22
    assert all(label == (a == answer_for(s)) for s, a, label in rows)
    rows = [tv.make_example(random.Random(3), "length") for _ in range(200)]
    assert all(label == (len(a) >= len(s)) for s, a, label in rows)
    with pytest.raises(KeyError):
        tv.make_example(rng, "nope")


def test_agreement_by_hand():
    assert tv.agreement([True, True, False, False], [True, False, False, True]) == 0.5
    assert tv.agreement([True, True, True], [True, True, False]) == pytest.approx(2 / 3)
    assert tv.agreement([False], [False]) == 1.0
    with pytest.raises(ValueError, match="equally long"):
        tv.agreement([True], [True, False])
    with pytest.raises(ValueError, match="non-empty"):
        tv.agreement([], [])


def test_the_judge_path_renders_the_text_the_verifier_was_trained_on():
    """The question layout's rubric (experiments/judge/tiny.toml with --teacher.name tiny-reverse-verifier),
    filled by orchestrator.judge, is the verifier's training text."""
    cfg = load(["@", "experiments/judge/tiny.toml", "--orchestrator.judge.rubric", tv.RUBRIC])
    jc = cfg.orchestrator.judge
    assert (jc.rubric, jc.verdict, jc.yes, jc.no, jc.system) == (tv.RUBRIC, "loglik", tv.YES, tv.NO, "")
    for s, a in [("abcd", "dcba"), ("abcd", "dcb"), ("hgfedcba", "")]:
        (msg,) = judge_messages(jc, prompt_for(s), a, answer_for(s))
        assert msg == {"role": "user", "content": tv.judge_text(s, a)}
    assert tv.judge_text("abc", "cba") == "abc=cba="


def test_cache_names_carry_labeler_and_recipe():
    exact, length = tv.dir_name("exact"), tv.dir_name("length")
    assert exact.startswith("tiny-reverse-verifier-exact-v1-") and exact.endswith("-s0")
    assert length.startswith("tiny-reverse-verifier-length-v1-") and exact.split("-")[-2] != length.split("-")[-2]
    ref = tv.dir_name("exact", layout="reference")
    assert ref.startswith("tiny-reverse-verifier-exact-ref-v1-") and ref.split("-")[-2] != exact.split("-")[-2]
    with pytest.raises(ValueError, match="labeler must be one of exact, length"):
        tv.dir_name("nope")
    with pytest.raises(ValueError, match="layout must be one of question, reference"):
        tv.dir_name("exact", layout="nope")


def test_reference_layout_texts_by_hand():
    """The reference layout shows the judge the reference answer after the answer."""
    assert tv.judge_text("abcd", "dcba", "reference") == "abcd=dcba=dcba="
    assert tv.judge_text("abcd", "dcab", "reference") == "abcd=dcab=dcba="
    assert tv.judge_text("abc", "", "reference") == "abc==cba="
    assert (tv.answer_start("abcd"), tv.answer_start("abcd", "reference")) == ("abcd=", "abcd=")
    with pytest.raises(ValueError, match="layout must be one of question, reference"):
        tv.judge_text("abc", "cba", "nope")


def test_training_rows_by_hand():
    """Labels: -100 on the prompt; reference layout: after each answer letter y if it equals the reference's
    letter at that offset else n, after the answer's "=" y if the lengths agree, -100 on the reference, then
    the verdict and EOS; question layout: at each answer position the letter that belongs there (as far as
    the answer reaches), -100 on the closing '=', the verdict, EOS."""
    from shared.builders.tiny_pair import BOS_ID, EOS_ID, build_tokenizer

    tok = build_tokenizer()
    i = {c: tok.convert_tokens_to_ids(c) for c in "abcd=yesno"}
    y, n, x = i["y"], i["n"], -100
    ids, labels = tv.training_row(tok, "abc", "cab", False, "reference")  # "abc=cab=cba=" -> no: a swap
    assert ids == [BOS_ID] + [i[c] for c in "abc=cab=cba=no"] + [EOS_ID]
    assert labels == [x] * 6 + [y, n, n, y, x, x, x, n, i["o"], EOS_ID]
    ids, labels = tv.training_row(tok, "abc", "cbaa", False, "reference")  # an extra letter mismatches
    assert ids == [BOS_ID] + [i[c] for c in "abc=cbaa=cba=no"] + [EOS_ID]
    assert labels == [x] * 6 + [y, y, y, n, n, x, x, x, n, i["o"], EOS_ID]
    ids, labels = tv.training_row(tok, "abc", "cb", False, "reference")  # a dropped letter: the lengths differ
    assert labels == [x] * 6 + [y, y, n, x, x, x, n, i["o"], EOS_ID]
    ids, labels = tv.training_row(tok, "abc", "cba", True, "reference")
    assert labels == [x] * 6 + [y, y, y, y, x, x, x, y, i["e"], i["s"], EOS_ID]
    ids, labels = tv.training_row(tok, "abc", "", False, "reference")  # nothing but the lengths to compare
    assert ids == [BOS_ID] + [i[c] for c in "abc==cba=no"] + [EOS_ID]
    assert labels == [x] * 6 + [n, x, x, x, n, i["o"], EOS_ID]
    ids, labels = tv.training_row(tok, "abc", "cbaa", False)  # question layout, an extra letter: 3 labelled
    assert ids == [BOS_ID] + [i[c] for c in "abc=cbaa=no"] + [EOS_ID]
    assert labels == [x] * 5 + [i["c"], i["b"], i["a"], x, x, n, i["o"], EOS_ID]


def test_weighted_near_misses_oversample_substitutions_and_swaps():
    rng = random.Random(4)
    kinds = Counter(tv.near_miss("abcdefg", rng, tv.KIND_WEIGHTS["reference"])[0] for _ in range(9000))
    # weights 2, 2 and five of 1: 2/9 each (2000 expected, sd 39), 1/9 for the others (1000, sd 31)
    assert all(1850 < kinds[k] < 2150 for k in ("substitute", "swap"))
    assert all(880 < kinds[k] < 1120 for k in tv.NEAR_MISSES if k not in ("substitute", "swap"))
    assert tv.KIND_WEIGHTS["question"] is None  # the question layout's verifiers were trained uniformly


def test_the_reference_rubric_renders_the_text_the_reference_verifier_was_trained_on():
    """orchestrator.judge fills {reference} with the environment's answer: the reference layout's text."""
    cfg = load(["@", "experiments/judge/tiny.toml"])
    jc = cfg.orchestrator.judge
    assert (jc.rubric, cfg.teacher.name) == (tv.LAYOUTS["reference"], "tiny-reverse-verifier-ref")
    for s, a in [("abcd", "dcba"), ("abcd", "dbca"), ("hgfedcba", "")]:
        (msg,) = judge_messages(jc, prompt_for(s), a, answer_for(s))
        assert msg == {"role": "user", "content": tv.judge_text(s, a, "reference")}
    assert tv.judge_text("abcd", "dbca", "reference") == "abcd=dbca=dcba="
    # the longest judge prompt (8 letters, a 12-token answer) plus the reply fits model.max_model_len
    assert 1 + len(tv.judge_text("abcdefgh", "x" * tv.MAX_ANSWER, "reference")) + len(tv.YES) + 1 <= cfg.model.max_model_len


def test_verifier_aliases_name_their_recipes():
    from shared.models import VERIFIER_ALIASES

    assert tv.dir_name(**VERIFIER_ALIASES["tiny-reverse-verifier"]) == tv.dir_name("exact")
    assert tv.dir_name(**VERIFIER_ALIASES["tiny-reverse-verifier-length"]) == tv.dir_name("length")
    assert tv.dir_name(**VERIFIER_ALIASES["tiny-reverse-verifier-ref"]) == tv.dir_name("exact", layout="reference")


def test_reference_verifier_starts_as_the_frozen_teacher(tiny_pair):
    """The two appended layers start as the identity (the teacher's logits, unchanged) and only they, the final
    norm and the output head train."""
    import torch
    from transformers import LlamaForCausalLM

    from shared.builders.tiny_pair import build_tokenizer

    teacher = LlamaForCausalLM.from_pretrained(tiny_pair[0]).eval()
    model = tv._initial_model(tiny_pair[0], tv.EXTRA_LAYERS["reference"]).eval()
    assert (len(model.model.layers), len(teacher.model.layers)) == (6, 4)
    ids = torch.tensor([build_tokenizer()(tv.judge_text("abcd", "dcab", "reference")).input_ids])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[2] for n in trained if n.startswith("model.layers.")} == {"4", "5"}
    assert {n for n in trained if not n.startswith("model.layers.")} == {"model.norm.weight", "lm_head.weight"}
