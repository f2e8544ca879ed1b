"""Length bands of ``reverse_text``: a new skill and a core behaviour for continual learning on the tiny pair.

The tiny pair was trained on strings of 3 to 8 letters (``shared/builders/tiny_pair.py``); the partly trained
student reverses short strings far more often than long ones.  Splitting the task by length gives two
behaviours with the same scoring and no new vocabulary:

==========================  ===============  ==============================================
name                        string lengths   role in ``experiments/continual/rl.toml``
==========================  ===============  ==============================================
``reverse_text_long``       7-8              the new skill being trained
``reverse_text_short``      3-5              the core behaviour to keep (replayed, gated)
==========================  ===============  ==============================================

Training prompts are drawn from the reverse_text stream restricted to the band (held-out strings
skipped as in ``reverse_text``); evaluation uses the band's members of the tiny pair's held-out strings.
"""

from __future__ import annotations

import random

from orchestrator.data import Prompt
from orchestrator.environments.reverse_text import ReverseText, _prompt
from shared.builders import tiny_pair


class ReverseTextBand(ReverseText):
    """``reverse_text`` restricted to strings with ``min_len <= len <= max_len``."""

    min_len, max_len = tiny_pair.MIN_LEN, tiny_pair.MAX_LEN

    def generate(self, rng: random.Random) -> Prompt:
        while True:  # a band of k of the 6 lengths: 6/k draws on average
            p = super().generate(rng)
            if self.min_len <= len(p.answer or "") <= self.max_len:
                return p

    def eval_prompts(self, n: int) -> list[Prompt]:
        band = [s for s in tiny_pair.heldout_strings(self.heldout_n) if self.min_len <= len(s) <= self.max_len]
        return [_prompt(s) for s in band[:n]]


class ReverseTextLong(ReverseTextBand):
    name = "reverse_text_long"
    min_len, max_len = 7, 8


class ReverseTextShort(ReverseTextBand):
    name = "reverse_text_short"
    min_len, max_len = 3, 5


TASKS = {c.name: c for c in (ReverseTextLong, ReverseTextShort)}
