"""The long-horizon task for the tiny running-sum pair: ``"3 1 4 1 5 ="`` -> ``"3314481954"`` (16 digits in use).

Each step copies the next digit and writes the running total mod 10, so an early wrong step makes every later
total wrong; answers are 32 tokens (``shared/builders/tiny_long.py`` has the task, its scores and the pair).
The reward is the exact match (``orchestrator.env_args.running_sum.reward = "exact"``, the verifiable reward),
or the partial credit (``"partial"``: the fraction of steps right before the first wrong one).  Evaluations
log both, whichever is the reward: ``eval/running_sum/avg`` (the reward) and ``eval/running_sum/exact`` and
``eval/running_sum/partial``.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

from orchestrator.data import Prompt
from orchestrator.environments.base import Environment
from shared.builders import tiny_long


def _prompt(digits: str) -> Prompt:
    return Prompt(text=tiny_long.prompt_for(digits), answer=tiny_long.answer_for(digits))


class RunningSum(Environment):
    name = "running_sum"
    needs_answer = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reward = cfg.orchestrator.env_args.running_sum.reward

    def generate(self, rng: random.Random) -> Prompt:
        return _prompt(tiny_long.training_digits(rng))

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [_prompt(s) for s in tiny_long.heldout_digits(n)]

    def grade(self, prompt: Prompt, completion: str) -> float:
        score = tiny_long.partial_score if self.reward == "partial" else tiny_long.exact_score
        return score(prompt.answer or "", completion)

    def eval_metrics(self, scored: Sequence[tuple[Prompt, str]]) -> dict[str, float]:
        return {"exact": statistics.fmean(tiny_long.exact_score(p.answer or "", t) for p, t in scored),
                "partial": statistics.fmean(tiny_long.partial_score(p.answer or "", t) for p, t in scored)}
