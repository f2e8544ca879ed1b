"""A fixed answer set (``orchestrator.env_args.answers``): the student's action space is a list of answers.

Two pieces live here, both pure functions, in ``shared/`` because two roles use them (the orchestrator's
environments match completions; the student engine draws answers, ``inference/answer_choice.py``):

- :func:`match_answer` maps a free-form completion to an allowed answer.  ``exact``: the stripped
  completion must be a member (else ``None``, which scores 0).  ``nearest``: a case- and
  punctuation-insensitive match; else the allowed answer mentioned last as a whole word
  ("not A, it is B" -> B); else the most similar one (difflib ratio, ties to the first listed).
  An empty completion matches nothing.
- :func:`choose_by_loglik` is the log-likelihood choice: given, for every allowed answer, the sum of
  the student's log-probs of that answer's tokens after the prompt, it returns the most likely one
  (the greedy draw of :func:`inference.answer_choice.answer_distribution`).

:meth:`Environment.score <orchestrator.environments.base.Environment.score>` applies
:func:`match_answer` before the environment's own grading whenever ``answers`` is non-empty.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence

_EDGE_PUNCT = " \t\r\n.,;:!?\"'`()[]{}<>*_"


def normalize(text: str) -> str:
    """Case-folded, inner whitespace collapsed, surrounding punctuation and spaces removed."""
    return " ".join(text.split()).casefold().strip(_EDGE_PUNCT)


def match_answer(completion: str, answers: Sequence[str], mode: str = "exact") -> str | None:
    """The allowed answer ``completion`` stands for, or ``None`` (see the module docstring)."""
    text = completion.strip()
    if not text or not answers:
        return None
    if text in answers:
        return text
    stripped = {a.strip(): a for a in answers}
    if text in stripped:
        return stripped[text]
    if mode == "exact":
        return None
    if mode != "nearest":
        raise ValueError(f"answer_match: unknown mode {mode!r}")
    norm = normalize(text)
    if not norm:
        return None
    for a in answers:
        if normalize(a) == norm:
            return a
    # The answer mentioned last (by where its mention ends; the longer one wins at the same end).
    best: tuple[int, int] | None = None
    chosen = None
    for a in answers:
        na = normalize(a)
        if not na:
            continue
        for m in re.finditer(rf"(?<!\w){re.escape(na)}(?!\w)", norm):
            key = (m.end(), len(na))
            if best is None or key > best:
                best, chosen = key, a
    if chosen is not None:
        return chosen
    ratios = [difflib.SequenceMatcher(None, norm, normalize(a)).ratio() for a in answers]
    return answers[max(range(len(answers)), key=lambda i: (ratios[i], -i))]


def choose_by_loglik(answer_logprob_sums: dict[str, float]) -> str:
    """The answer with the highest log-likelihood under the student.

    ``answer_logprob_sums`` maps each allowed answer to ``sum_t log p(answer token t | prompt, earlier
    answer tokens)``.  Sums favour short answers; when the answers differ in token length, pass
    per-token means instead (the choice is the arg-max of whatever is given).  NaN counts as -inf;
    ties (and all -inf) go to the answer listed first.  Raises ``ValueError`` for an empty dict.
    """
    if not answer_logprob_sums:
        raise ValueError("choose_by_loglik: no answers")
    best, best_lp = None, -math.inf
    for answer, lp in answer_logprob_sums.items():
        lp = -math.inf if math.isnan(lp) else lp
        if best is None or lp > best_lp:
            best, best_lp = answer, lp
    return best  # type: ignore[return-value]
