"""A fixed answer set as the student's action space: answers drawn by the student's log-likelihood.

With ``orchestrator.env_args.answers = [...]`` and ``answer_choice = "loglik"``, the student engine does
not decode free text. For each prompt it scores every allowed answer ``a`` (its tokens, then EOS) with
the served student, ``L(a) = sum_t log p(a_t | prompt, a_<t)``, and draws the group's answers from

    pi(a) = exp(L(a) / T) / sum_b exp(L(b) / T)        (T = the sampling temperature)

so a step's rollouts are on-policy samples of the student restricted to the answer set; at ``T = 0``
(greedy evaluation) every draw is the arg-max, :func:`shared.answers.choose_by_loglik`.
Each rollout carries the per-token log-probs of its answer, the same quantity the trainer recomputes,
so the importance ratio and every loss term apply unchanged. (REINFORCE on ``log p(a)`` rather than
``log pi(a)`` differs by ``grad log Z``, whose expectation under a group baseline is zero.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from shared.answers import choose_by_loglik


def answer_distribution(loglik: Sequence[float], temperature: float) -> list[float]:
    """``pi(a)`` above for the answers' summed log-likelihoods; ``temperature = 0``: one-hot on the
    arg-max (the first listed on ties). NaN counts as ``-inf``; if every answer is ``-inf`` the first
    one gets all the mass."""
    lls = [-math.inf if math.isnan(x) else float(x) for x in loglik]
    if not lls:
        raise ValueError("answer_distribution: no answers")
    if temperature <= 0 or all(x == -math.inf for x in lls):
        best = choose_by_loglik({str(i): x for i, x in enumerate(lls)})
        return [1.0 if str(i) == best else 0.0 for i in range(len(lls))]
    top = max(lls)
    w = [math.exp((x - top) / temperature) if x > -math.inf else 0.0 for x in lls]
    z = sum(w)
    return [x / z for x in w]


def draw_answers(loglik: Sequence[float], n: int, temperature: float, seed: int) -> list[int]:
    """``n`` answer indices drawn from :func:`answer_distribution` with ``random.Random(seed)``."""
    probs = answer_distribution(loglik, temperature)
    if temperature <= 0:
        return [probs.index(1.0)] * n
    return random.Random(seed).choices(range(len(probs)), weights=probs, k=n)


def answer_token_ids(tokenizer, answers: Sequence[str]) -> list[list[int]]:
    """Each answer's completion tokens: its text (no special tokens) followed by EOS."""
    eos = tokenizer.eos_token_id
    return [list(tokenizer.encode(a, add_special_tokens=False)) + ([eos] if eos is not None else [])
            for a in answers]
