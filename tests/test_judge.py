"""The RLAIF judge: rubric rendering, placeholder validation at config load, verdict parsing (engine-free)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.judge import (apply_unparseable, builtin_rubric, judge_messages, judge_reward, loglik_verdict,
                               parse_verdict)
from shared.config import ConfigError, JudgeConfig, load

# ------------------------------------------------------------------------------------------------
# Binary verdicts: (judge reply, expected reward or None)

BINARY = [
    ("VERDICT: PASS", 1.0),
    ("VERDICT: FAIL", -1.0),
    ("verdict: pass", 1.0),
    ("Verdict:fail", -1.0),
    ("  VERDICT :   PASS  ", 1.0),
    ("The answer names Paris, which matches the reference.\n\nVERDICT: PASS", 1.0),
    ("The answer says 5 but the reference is 4.\nVERDICT: FAIL\n", -1.0),
    ("**Verdict:** PASS", 1.0),
    ("**VERDICT: FAIL**", -1.0),
    ("### Verdict\n**PASS**", 1.0),  # heading, then a bare bold verdict line
    ("Verdict: `PASS`", 1.0),
    ("> VERDICT: FAIL", -1.0),
    ("| Criterion | Result |\n|---|---|\n| Verdict | PASS |", 1.0),
    ("Verdict = FAIL", -1.0),
    ("Verdict - pass", 1.0),
    ("The verdict is: correct.", 1.0),
    ("Final verdict: incorrect", -1.0),
    ("Final answer: Yes", 1.0),
    ("Final answer: no.", -1.0),
    ("Judgement: wrong", -1.0),
    ("Judgment: right", 1.0),
    ("Decision: reject", -1.0),
    ("Decision: accepted", 1.0),
    ("Verdict: [FAIL]", -1.0),
    ("Verdict: \"PASS\"", 1.0),
    ("Verdict: True", 1.0),
    ("Verdict: false", -1.0),
    ("Yes", 1.0),
    ("No.", -1.0),
    ("Is the answer correct?\n\nYes.", 1.0),
    ("The answer is correct.\n- FAIL", -1.0),  # only the bare line is a verdict
    ("Reasoning...\n1. PASS", 1.0),
    ("PASS!", 1.0),
    # the last verdict wins
    ("VERDICT: PASS\nOn reflection the date is wrong.\nVERDICT: FAIL", -1.0),
    ("VERDICT: FAIL\nWait, I misread.\nVERDICT: PASS", 1.0),
    ("Verdict: pass, verdict: fail", -1.0),
    ("No.\nVERDICT: PASS", 1.0),
    ("VERDICT: PASS\nNo", -1.0),  # a bare verdict line counts too, and it is the later one
    # echoed alternatives are no verdict
    ("VERDICT: PASS/FAIL", None),
    ("I must end with \"VERDICT: PASS\" or \"VERDICT: FAIL\".", None),
    ("I must end with VERDICT: PASS or VERDICT: FAIL.\nVERDICT: FAIL", -1.0),
    ("Verdict: yes or no", None),
    # no verdict at all
    ("", None),
    ("   \n\n", None),
    ("The answer looks fine to me.", None),
    ("The answer is correct.", None),  # "is correct" has no key
    ("Verdict: not correct", None),  # negations are not interpreted
    ("Verdict: unclear", None),
    ("The decision is not easy.", None),
    ("Verdicts: pass", None),
    ("VERDICT: PASSABLE", None),
    ("Yes, mostly.", None),  # not a bare verdict line
    ("SCORE: 7/10", None),
]


@pytest.mark.parametrize("text,expected", BINARY, ids=[repr(t)[:40] for t, _ in BINARY])
def test_parse_binary(text, expected):
    assert parse_verdict(text, "binary") == expected


# ------------------------------------------------------------------------------------------------
# Graded scores on the default 0..10 scale: reward = (2 s - 0 - 10) / 10

GRADED = [
    ("SCORE: 7/10", 0.4),
    ("Score: 10/10", 1.0),
    ("SCORE: 0/10", -1.0),
    ("SCORE: 5", 0.0),
    ("score = 8.5", 0.7),
    ("**Score:** 3 / 10", -0.4),
    ("Rating: 9 out of 10", 0.8),
    ("Grade - 6", 0.2),
    ("Final score: 2.5/10.", -0.5),
    ("The answer is partly right.\n\nSCORE: 6/10", 0.2),
    ("SCORE: 2/10\nActually it is better than that.\nSCORE: 8/10", 0.6),  # the last score wins
    ("Reasoning...\n**7/10**", 0.4),  # a bare score line
    ("Reasoning...\n7", 0.4),
    ("The score is 4.", -0.2),
    ("Score: 7/10 because the answer is incomplete", 0.4),
    # unparseable
    ("SCORE: 12/10", None),  # above the scale
    ("SCORE: -1", None),  # below it
    ("SCORE: 4/5", None),  # another denominator
    ("SCORE: 0-10", None),  # the scale echoed
    ("Give a score from 0 to 10.", None),
    ("SCORE: N/10", None),
    ("SCORE: 7/10x", None),
    ("The answer is good.", None),
    ("VERDICT: PASS", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", GRADED, ids=[repr(t)[:40] for t, _ in GRADED])
def test_parse_graded(text, expected):
    got = parse_verdict(text, "graded", 0.0, 10.0)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_graded_other_scale():
    # scale 1..5: reward = (2 s - 6) / 4
    assert parse_verdict("Rating: 4/5", "graded", 1, 5) == 0.5
    assert parse_verdict("Rating: 1", "graded", 1, 5) == -1.0
    assert parse_verdict("Rating: 3 out of 5", "graded", 1, 5) == 0.0
    assert parse_verdict("Rating: 0", "graded", 1, 5) is None
    assert parse_verdict("Rating: 70/100", "graded", 0, 100) == pytest.approx(0.4)


def test_parse_verdict_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        parse_verdict("VERDICT: PASS", "ternary")


# ------------------------------------------------------------------------------------------------
# Unparseable policy


@pytest.mark.parametrize(
    "reward,policy,expected",
    [
        (1.0, "zero", (1.0, False)),
        (-1.0, "skip", (-1.0, False)),
        (0.4, "negative", (0.4, False)),
        (None, "zero", (0.0, True)),
        (None, "negative", (-1.0, True)),
        (None, "skip", (None, True)),
    ],
)
def test_apply_unparseable(reward, policy, expected):
    assert apply_unparseable(reward, policy) == expected


def test_apply_unparseable_rejects_unknown_policy():
    with pytest.raises(ValueError, match="on_unparseable"):
        apply_unparseable(None, "ignore")


def test_judge_reward_uses_the_config():
    graded = JudgeConfig(mode="graded", scale_min=1, scale_max=5, on_unparseable="negative")
    assert judge_reward("Rating: 5/5", graded) == (1.0, False)
    assert judge_reward("no idea", graded) == (-1.0, True)
    assert judge_reward("no idea", JudgeConfig()) == (None, True)  # default: skip
    assert judge_reward("VERDICT: FAIL", JudgeConfig(on_unparseable="zero")) == (-1.0, False)


# ------------------------------------------------------------------------------------------------
# Rubric rendering


def test_builtin_rubric_with_reference():
    msgs = judge_messages(JudgeConfig(), "What is 2+2?", "5", reference="4")
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    text = msgs[0]["content"]
    assert "What is 2+2?" in text and "\n5\n" in text and "\n4\n" in text
    assert "VERDICT: PASS" in text and "VERDICT: FAIL" in text
    assert "{" not in text


def test_builtin_rubric_falls_back_to_target_spec_then_to_none():
    cfg = JudgeConfig(target_spec="Answers in French.")
    assert "Answers in French." in judge_messages(cfg, "Q?", "A")[0]["content"]
    # the prompt's own answer takes precedence over the spec
    assert "Answers in French." not in judge_messages(cfg, "Q?", "A", reference="R")[0]["content"]
    no_ref = judge_messages(JudgeConfig(), "Q?", "A")[0]["content"]
    assert "Reference" not in no_ref and "Q?" in no_ref and "A" in no_ref


def test_builtin_graded_rubric_states_the_scale():
    text = builtin_rubric(JudgeConfig(mode="graded", scale_min=1, scale_max=5), with_reference=True)
    assert "from 1 (worst) to 5 (best)" in text and "SCORE: <number>/5" in text
    # the rendered instruction is itself parseable once filled in: the judge's reply format round-trips
    assert parse_verdict("SCORE: 4/5", "graded", 1, 5) == 0.5


def test_custom_rubric_system_and_literal_braces():
    cfg = JudgeConfig(
        rubric='Q: {question}\nA: {answer}\nRef: {reference}\nReply as JSON {{"ok": true}}.', system="Be terse."
    )
    msgs = judge_messages(cfg, "Why?", "Because {x}.", reference="Ref {y}")
    assert msgs[0] == {"role": "system", "content": "Be terse."}
    assert msgs[1]["content"] == 'Q: Why?\nA: Because {x}.\nRef: Ref {y}\nReply as JSON {"ok": true}.'


def test_custom_rubric_with_reference_placeholder_needs_a_reference():
    cfg = JudgeConfig(rubric="{question} {answer} {reference}")
    with pytest.raises(ConfigError, match=r"^orchestrator\.judge\.rubric: uses \{reference\}"):
        judge_messages(cfg, "Q", "A")
    # a rubric that only mentions {{reference}} literally does not need one
    assert judge_messages(JudgeConfig(rubric="{question} {answer} {{reference}}"), "Q", "A")[0]["content"] == (
        "Q A {reference}"
    )


# ------------------------------------------------------------------------------------------------
# Placeholder validation at config load


@pytest.mark.parametrize(
    "rubric,message",
    [
        ("{question} {answers}", "orchestrator.judge.rubric: unknown placeholder {answers} (allowed: {question}, {answer}, {reference})"),
        ("{question}", "orchestrator.judge.rubric: must contain the placeholder {answer}"),
        ("{answer}", "orchestrator.judge.rubric: must contain the placeholder {question}"),
        ("{question} {answer} {}", "orchestrator.judge.rubric: unknown placeholder {}"),
        ("{question} {answer} {0}", "orchestrator.judge.rubric: unknown placeholder {0}"),
        ("{question} {answer!r}", "orchestrator.judge.rubric: unknown placeholder {answer!r}"),
        ("{question:>10} {answer}", "orchestrator.judge.rubric: unknown placeholder {question:>10}"),
        ("{question.__class__} {answer}", "orchestrator.judge.rubric: unknown placeholder {question.__class__}"),
        ('{question} {answer} JSON {"ok": 1}', "orchestrator.judge.rubric: unknown placeholder"),
        ("{question} {answer} {", "orchestrator.judge.rubric: malformed placeholder"),
        ("{question} {answer} }", "orchestrator.judge.rubric: malformed placeholder"),
        ("{question} {answer} {a\nb}", 'orchestrator.judge.rubric: unknown placeholder {"a\\nb"}'),
    ],
)
def test_rubric_placeholders_are_validated_at_load(rubric, message):
    with pytest.raises(ConfigError) as e:
        load(["--orchestrator.judge.rubric", rubric])
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_rubric_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "judge.toml"
    path.write_text('[orchestrator.judge]\nrubric = """\nGrade {answr} for {question}.\n"""\n')
    assert main(["@", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: orchestrator.judge.rubric: unknown placeholder {answr}") and err.count("\n") == 1


def test_judge_config_defaults_and_other_checks():
    cfg = load([])
    j = cfg.orchestrator.judge
    assert (j.rubric, j.mode, j.scale_min, j.scale_max, j.on_unparseable, j.max_tokens, j.temperature) == (
        "", "binary", 0.0, 10.0, "skip", 256, 0.0
    )
    assert cfg.orchestrator.workflow == "distill"
    good = load(["--orchestrator.judge.rubric", "Q {question} A {answer} R {reference} {{x}}", "--orchestrator.judge.mode", "graded"])
    assert good.orchestrator.judge.mode == "graded"
    with pytest.raises(ConfigError, match=r"^orchestrator\.judge\.scale_min: must be below"):
        load(["--orchestrator.judge.scale_min", "10"])
    with pytest.raises(ConfigError, match=r'^orchestrator\.judge\.on_unparseable: expected one of "zero", "negative", "skip"'):
        load(["--orchestrator.judge.on_unparseable", "drop"])
    with pytest.raises(ConfigError, match=r'^orchestrator\.workflow: expected one of "distill", "judge", "comparator"'):
        load(["--orchestrator.workflow", "rlhf"])


# ------------------------------------------------------------------------------------------------
# Never raises


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(["binary", "graded"]))
def test_parse_verdict_never_raises(text, mode):
    got = parse_verdict(text, mode)
    assert got is None or -1.0 <= got <= 1.0


_PIECES = st.sampled_from(
    ["VERDICT", "verdict", ":", " ", "\n", "PASS", "FAIL", "/", " or ", "yes", "no", "**", "|", "SCORE", "score",
     "7", "10", "/10", "-", "out of", ".", "0.5", "999999999999999999999999999", "final", "`", "#", "is"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=30).map("".join), st.sampled_from(["binary", "graded"]))
def test_parse_verdict_never_raises_on_verdict_like_text(text, mode):
    got = parse_verdict(text, mode)
    assert got is None or -1.0 <= got <= 1.0
    if mode == "binary":
        assert got in (None, 1.0, -1.0)


def test_parse_verdict_is_fast_on_long_whitespace():
    import time

    start = time.monotonic()
    for mode in ("binary", "graded"):
        parse_verdict("verdict" + " " * 100_000 + "x", mode)
        parse_verdict("score" + " " * 100_000 + "7" + " " * 100_000 + "/", mode)
    assert time.monotonic() - start < 2.0


# ------------------------------------------------------------------------------------------------
# verdict = "loglik": the judge's log-likelihoods of replying yes / no


@pytest.mark.parametrize("ly, ln, mode, expected", [
    (-0.1, -2.5, "binary", 1.0),
    (-2.5, -0.1, "binary", -1.0),
    (-1.0, -1.0, "binary", -1.0),  # a tie is not a yes
    # graded: 2 sigmoid(ly - ln) - 1 = tanh((ly - ln) / 2); ly - ln = ln 3 -> p = 3/4 -> 0.5
    (math.log(3.0) - 2.0, -2.0, "graded", 0.5),
    (-2.0, math.log(3.0) - 2.0, "graded", -0.5),
    (-0.7, -0.7, "graded", 0.0),
    (-1.0, -math.inf, "graded", 1.0),  # "no" impossible
    (-math.inf, -3.0, "graded", -1.0),
    (-math.inf, -math.inf, "binary", None),
    (math.nan, -1.0, "graded", None),
    (-1.0, math.nan, "binary", None),
])
def test_loglik_verdict_by_hand(ly, ln, mode, expected):
    got = loglik_verdict(ly, ln, mode)
    assert got == (None if expected is None else pytest.approx(expected, abs=1e-12))


def test_loglik_verdict_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be"):
        loglik_verdict(-1.0, -2.0, "scores")


def test_loglik_rubric_asks_for_one_word_and_config_checks():
    cfg = JudgeConfig(verdict="loglik", yes="Oui", no="Non")
    rubric = builtin_rubric(cfg, with_reference=True)
    assert rubric.endswith("Reply with exactly one word: Oui or Non.") and "{reference}" in rubric
    assert "explain" not in rubric  # no reasoning is read
    with pytest.raises(ConfigError, match=r'^orchestrator\.judge\.no: must differ from orchestrator\.judge\.yes$'):
        load(["--orchestrator.judge.verdict", "loglik", "--orchestrator.judge.no", "Yes"])
    with pytest.raises(ConfigError, match=r'^orchestrator\.judge\.yes: must not be empty with verdict = "loglik"$'):
        load(["--orchestrator.judge.verdict", "loglik", "--orchestrator.judge.yes", " "])
    with pytest.raises(ConfigError, match=r"^orchestrator\.judge\.verdict: "):
        load(["--orchestrator.judge.verdict", "logits"])
