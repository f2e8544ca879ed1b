from __future__ import annotations

import random

from orchestrator.data import Prompt
from orchestrator.environments.base import Environment
from shared import tiny_pair


class ReverseText(Environment):
    """Reverse a short string: prompt ``"abcd="``, answer ``"dcba"``; reward 1 for an exact match."""

    name = "reverse_text"

    def generate(self, rng: random.Random) -> Prompt:
        s = tiny_pair.make_string(rng)
        return Prompt(text=tiny_pair.prompt_for(s), answer=tiny_pair.answer_for(s))

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [Prompt(text=tiny_pair.prompt_for(s), answer=tiny_pair.answer_for(s)) for s in tiny_pair.heldout_strings(n)]

    def score(self, prompt: Prompt, completion: str) -> float:
        return float(prompt.answer is not None and completion.strip() == prompt.answer)
