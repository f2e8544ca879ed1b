"""The teacher as a reward model (RLAIF): the judge's prompt, and its reply parsed into a reward.

Engine-free: :func:`judge_messages` gives the chat messages for one ``(question, answer)`` pair (the
caller renders them with the teacher's chat template and asks the teacher role to generate), and
:func:`judge_reward` turns the judge's reply into ``(reward | None, unparseable)``.

Verdict grammar (both modes; matching is case-insensitive, line by line, after the markdown characters
``* _ ` # > ~ [ ] ( ) " ' | “ ” ‘ ’`` are replaced by spaces; **the last verdict in the reply wins**):

``binary`` mode (reward +1 / -1)
    *keyed verdict*: a key, an optional separator, a verdict word::

        key       := "verdict" | "judgement" | "judgment" | "decision"
                   | "final" ("verdict" | "answer" | "judgement" | "judgment" | "decision")
        separator := ["is"] [":" | "=" | "-" | "–" | "—"]      (optional; whitespace around it is free)
        positive  := pass | passed | passes | yes | correct | right | true | accept | accepted
        negative  := fail | failed | fails | no | incorrect | wrong | false | reject | rejected

    e.g. ``VERDICT: PASS``, ``**Verdict:** fail``, ``Final answer = yes``, ``| Verdict | PASS |``.
    *bare verdict*: a line that is only a verdict word, optionally after a list marker (``-``, ``1.``)
    and before ``.``/``!`` (``**PASS**``, ``Yes.``, ``- FAIL``).
    An echoed alternative is no verdict: ``VERDICT: PASS/FAIL``, ``VERDICT: PASS or VERDICT: FAIL``
    (both words are dropped).  Negations are not interpreted: ``Verdict: not correct`` is no verdict.

``graded`` mode (reward ``-1 + 2 (s - scale_min) / (scale_max - scale_min)``)
    *keyed score*: ``key separator? number (("/" | "out of") denominator)?`` with
    ``key := "score" | "rating" | "grade" | "final" ("score" | "rating" | "grade")`` and numbers written
    ``[-+]?digits(.digits)?``: ``SCORE: 7/10``, ``**Rating:** 4 out of 5``, ``score = 8.5``.
    *bare score*: a line that is only ``number`` or ``number/denominator`` (``**7/10**``).
    An echoed range (``SCORE: 0-10``, ``score: 1 to 5``) is no score.  A score outside
    ``[scale_min, scale_max]``, or with a denominator other than ``scale_max``, is unparseable.

``verdict = "loglik"`` reads no reply: the judge's log-likelihoods of the replies ``yes`` and ``no``
(one forward pass each, :func:`loglik_verdict`) give the reward, so a small judge that cannot follow a
verdict grammar still grades; its built-in rubric asks for a one-word reply.

No verdict → ``None``; the caller applies ``orchestrator.judge.on_unparseable`` with
:func:`apply_unparseable` and counts it.  Nothing here raises on any input text.
"""

from __future__ import annotations

import math
import re

from shared.config import JUDGE_PLACEHOLDERS, ConfigError, JudgeConfig, check_template

# ------------------------------------------------------------------------------------------------
# Prompt

_BODY_WITH_REFERENCE = (
    "You are a strict grader. Judge the answer below.\n\n"
    "Question:\n{question}\n\n"
    "Reference (a correct answer, or what a good answer must do):\n{reference}\n\n"
    "Answer to judge:\n{answer}\n\n"
    "Compare the answer with the reference and explain briefly."
)
_BODY_WITHOUT_REFERENCE = (
    "You are a strict grader. Judge the answer below.\n\n"
    "Question:\n{question}\n\n"
    "Answer to judge:\n{answer}\n\n"
    "Decide whether the answer is correct and helpful, and explain briefly."
)


def _num(x: float) -> str:
    return f"{x:g}"


def builtin_rubric(cfg: JudgeConfig, with_reference: bool) -> str:
    """The rubric used when ``orchestrator.judge.rubric`` is empty (placeholders still unfilled)."""
    body = _BODY_WITH_REFERENCE if with_reference else _BODY_WITHOUT_REFERENCE
    if cfg.verdict == "loglik":  # no reasoning is read: the first word of the reply is the verdict
        body = body.rsplit("\n\n", 1)[0]
        return body + f"\n\nIs the answer correct? Reply with exactly one word: {cfg.yes} or {cfg.no}."
    if cfg.mode == "binary":
        tail = " Then end your reply with one line that is exactly \"VERDICT: PASS\" or exactly \"VERDICT: FAIL\"."
    else:
        lo, hi = _num(cfg.scale_min), _num(cfg.scale_max)
        tail = (
            f" Then rate it from {lo} (worst) to {hi} (best) and end your reply with one line of the form "
            f"\"SCORE: <number>/{hi}\"."
        )
    return body + tail


def judge_messages(
    cfg: JudgeConfig, question: str, answer: str, reference: str | None = None
) -> list[dict[str, str]]:
    """The judge's chat messages for ``(question, answer)``.

    ``reference`` is the prompt's ground-truth answer; without one, ``cfg.target_spec`` stands in.  With
    neither, the built-in rubric drops its reference section, and a custom rubric that uses
    ``{reference}`` is a :class:`ConfigError` (naming ``orchestrator.judge.rubric``).
    """
    ref = reference if reference else cfg.target_spec
    if cfg.rubric:
        check_template("orchestrator.judge.rubric", cfg.rubric, JUDGE_PLACEHOLDERS, ("question", "answer"))
        rubric = cfg.rubric
        if not ref and "{reference}" in rubric.replace("{{", "").replace("}}", ""):
            raise ConfigError(
                "orchestrator.judge.rubric: uses {reference}, but this prompt has no answer and "
                "orchestrator.judge.target_spec is empty"
            )
    else:
        rubric = builtin_rubric(cfg, with_reference=bool(ref))
    content = rubric.format_map({"question": question, "answer": answer, "reference": ref or ""})
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return messages + [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------------------------
# Parsing

_MARKDOWN = re.compile(r"[*_`#>~\[\]()\"'|“”‘’]")
_POSITIVE = ("pass", "passed", "passes", "yes", "correct", "right", "true", "accept", "accepted")
_NEGATIVE = ("fail", "failed", "fails", "no", "incorrect", "wrong", "false", "reject", "rejected")
_WORD = "(?:" + "|".join(sorted(_POSITIVE + _NEGATIVE, key=len, reverse=True)) + ")"
_SEP = r"\s*(?:is\b\s*)?(?:[:=\-–—]\s*)?"  # each part starts with a non-space: linear time
_KEYED_VERDICT = re.compile(
    r"\b(?:final\s+(?:verdict|answer|judge?ment|decision)|verdict|judge?ment|decision)"
    + _SEP + r"(?P<word>" + _WORD + r")\b",
    re.IGNORECASE,
)
_ALTERNATIVE = re.compile(
    r"\s*(?:/|or\b)\s*(?:(?:final\s+)?verdict" + _SEP + r")?" + _WORD + r"\b", re.IGNORECASE
)
_BARE_VERDICT = re.compile(r"(?:[-+•]|\d+[.)])?\s*(?P<word>" + _WORD + r")\s*[.!]*", re.IGNORECASE)

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_OUT_OF = r"(?:\s*(?:/|out\s+of)\s*(?P<den>" + _NUMBER + r"))?"
_KEYED_SCORE = re.compile(
    r"\b(?:final\s+)?(?:score|rating|grade)" + _SEP + r"(?>(?P<num>" + _NUMBER + r")" + _OUT_OF + r")(?!\w|\.\d)",
    re.IGNORECASE,
)
_RANGE = re.compile(r"\s*(?:-|–|—|to\b)\s*" + _NUMBER, re.IGNORECASE)
_BARE_SCORE = re.compile(r"(?P<num>" + _NUMBER + r")" + _OUT_OF + r"\s*\.?", re.IGNORECASE)


def _binary_verdicts(line: str) -> list[float]:
    found: list[float] = []
    skip_until = -1
    for m in _KEYED_VERDICT.finditer(line):
        if m.start() < skip_until:  # the second half of "PASS or VERDICT: FAIL"
            continue
        alt = _ALTERNATIVE.match(line, m.end())
        if alt is not None:  # an echoed choice ("PASS/FAIL"), not a verdict
            skip_until = alt.end()
            continue
        found.append(1.0 if m.group("word").lower() in _POSITIVE else -1.0)
    if not found:
        m = _BARE_VERDICT.fullmatch(line.strip())
        if m is not None:
            found.append(1.0 if m.group("word").lower() in _POSITIVE else -1.0)
    return found


def _graded_scores(line: str) -> list[tuple[float, float | None]]:
    found: list[tuple[float, float | None]] = []
    for m in _KEYED_SCORE.finditer(line):
        if m.group("den") is None and _RANGE.match(line, m.end()):
            continue  # "SCORE: 0-10" echoes the scale
        found.append((float(m.group("num")), float(m.group("den")) if m.group("den") else None))
    if not found:
        m = _BARE_SCORE.fullmatch(line.strip())
        if m is not None:
            found.append((float(m.group("num")), float(m.group("den")) if m.group("den") else None))
    return found


def parse_verdict(text: str, mode: str = "binary", scale_min: float = 0.0, scale_max: float = 10.0) -> float | None:
    """The reward in the judge's reply ``text`` (grammar: see the module docstring), or None.

    ``binary``: +1.0 or -1.0.  ``graded``: the last score mapped linearly from
    ``[scale_min, scale_max]`` to ``[-1, 1]``; None when out of range or over another denominator.
    """
    if mode not in ("binary", "graded"):
        raise ValueError(f"mode must be 'binary' or 'graded', got {mode!r}")
    if not isinstance(text, str):
        return None
    lines = _MARKDOWN.sub(" ", text).splitlines()
    if mode == "binary":
        verdicts = [v for line in lines for v in _binary_verdicts(line)]
        return verdicts[-1] if verdicts else None
    scores = [s for line in lines for s in _graded_scores(line)]
    if not scores:
        return None
    score, den = scores[-1]
    if den is not None and den != scale_max:
        return None
    if not (scale_min <= score <= scale_max) or not math.isfinite(score) or scale_max <= scale_min:
        return None
    return (2.0 * score - scale_min - scale_max) / (scale_max - scale_min)  # exact at both ends and the middle


def loglik_verdict(logp_yes: float, logp_no: float, mode: str = "binary") -> float | None:
    """The reward from the judge's log-likelihoods of replying ``yes`` and ``no`` (``verdict = "loglik"``).

    ``binary``: +1 when ``logp_yes > logp_no``, else -1.  ``graded``: ``2 p - 1`` with
    ``p = P(yes | yes or no) = sigmoid(logp_yes - logp_no)``, i.e. ``tanh((logp_yes - logp_no) / 2)``, in
    (-1, 1) (±1 only when one reply is impossible).  None when either is NaN or both are -inf.
    """
    if mode not in ("binary", "graded"):
        raise ValueError(f"mode must be 'binary' or 'graded', got {mode!r}")
    if math.isnan(logp_yes) or math.isnan(logp_no) or (logp_yes == logp_no == -math.inf):
        return None
    if mode == "binary":
        return 1.0 if logp_yes > logp_no else -1.0
    if math.isinf(logp_yes) or math.isinf(logp_no):  # one impossible (or +inf): the other decides outright
        return 1.0 if logp_yes > logp_no else -1.0
    return math.tanh((logp_yes - logp_no) / 2.0)


UNPARSEABLE_REWARD = {"zero": 0.0, "negative": -1.0, "skip": None}


def apply_unparseable(reward: float | None, policy: str) -> tuple[float | None, bool]:
    """``(reward, False)`` for a parsed reward; otherwise ``(the policy's reward, True)``:
    ``zero`` → 0.0, ``negative`` → -1.0, ``skip`` → None (drop the sample).  The caller counts the flag."""
    if policy not in UNPARSEABLE_REWARD:
        raise ValueError(f"on_unparseable must be one of {', '.join(UNPARSEABLE_REWARD)}, got {policy!r}")
    if reward is not None:
        return reward, False
    return UNPARSEABLE_REWARD[policy], True


def judge_reward(text: str, cfg: JudgeConfig) -> tuple[float | None, bool]:
    """:func:`parse_verdict` with the config's mode and scale, then :func:`apply_unparseable`."""
    return apply_unparseable(parse_verdict(text, cfg.mode, cfg.scale_min, cfg.scale_max), cfg.on_unparseable)
