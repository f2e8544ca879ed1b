from __future__ import annotations

import random

from orchestrator.data import Prompt
from orchestrator.environments.base import Environment


class ReverseText(Environment):
    """Reverse a short string: prompt ``"abcd="``, answer ``"dcba"``; reward 1 for an exact match."""

    name = "reverse_text"

    def generate(self, rng: random.Random) -> Prompt:
        from shared import tiny_pair

        s = tiny_pair.make_string(rng)
        return Prompt(text=tiny_pair.prompt_for(s), answer=tiny_pair.answer_for(s))

    def eval_prompts(self, n: int) -> list[Prompt]:
        from shared import tiny_pair

        return [Prompt(text=tiny_pair.prompt_for(s), answer=tiny_pair.answer_for(s)) for s in tiny_pair.heldout_strings(n)]

    def score(self, prompt: Prompt, completion: str) -> float:
        return float(prompt.answer is not None and completion.strip() == prompt.answer)
