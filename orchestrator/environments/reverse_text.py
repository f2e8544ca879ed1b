from __future__ import annotations

import random

from orchestrator.data import Prompt
from orchestrator.environments.base import Environment
from shared.builders import tiny_pair


def _prompt(s: str) -> Prompt:
    return Prompt(text=tiny_pair.prompt_for(s), answer=tiny_pair.answer_for(s))


class ReverseText(Environment):
    """Reverse a short string: prompt ``"abcd="``, answer ``"dcba"``; reward 1 for an exact match.

    Evaluation uses the tiny pair's held-out strings; training skips the first
    ``max(HELDOUT_EXCLUDED, eval.num_prompts)`` of them (as the tiny teacher's own training did), so
    ``eval_prompts(n)`` never meets a training prompt for ``n`` up to that many.
    """

    name = "reverse_text"
    needs_answer = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.heldout_n = max(tiny_pair.HELDOUT_EXCLUDED, cfg.orchestrator.eval.num_prompts)
        self._excluded: set[str] | None = None  # built on the first generated prompt

    def generate(self, rng: random.Random) -> Prompt:
        if self._excluded is None:
            self._excluded = set(tiny_pair.heldout_strings(self.heldout_n))
        while True:  # ~19M strings, a few thousand excluded: a handful of draws at most
            s = tiny_pair.make_string(rng)
            if s not in self._excluded:
                return _prompt(s)

    def eval_prompts(self, n: int) -> list[Prompt]:
        if n > self.heldout_n:
            raise ValueError(f"reverse_text: at most {self.heldout_n} held-out prompts (asked for {n})")
        return [_prompt(s) for s in tiny_pair.heldout_strings(n)]

    def grade(self, prompt: Prompt, completion: str) -> float:
        return float(prompt.answer is not None and completion.strip() == prompt.answer)
