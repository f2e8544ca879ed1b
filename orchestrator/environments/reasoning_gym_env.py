"""Verifiable reasoning prompts from `reasoning-gym <https://github.com/open-thought/reasoning-gym>`_.

Procedural and offline: ``orchestrator.env_args.reasoning_gym.dataset`` names one of its datasets
(``leg_counting``, ``chain_sum``, ``basic_arithmetic``, ...), ``options`` its config (difficulty:
``{min_terms = 2, max_terms = 3}`` for ``chain_sum``).  A prompt is the dataset's question followed
by ``instruction`` (by default: the answer goes between ``<answer>`` tags).  The entry that scores it
travels in ``Prompt.meta["entry"]``.

Scoring: the text inside the last ``<answer>...</answer>`` of the completion (the whole stripped
completion when there is none) goes to the dataset's own ``score_answer`` with the entry: 1 for the
exact answer; many datasets give partial credit (e.g. ``len(answer) / len(completion)`` when the
answer is only contained in it).  A dataset-file row has no entry: its ``answer`` must match exactly.
"""

from __future__ import annotations

import random
from typing import Any

from orchestrator.data import Prompt
from orchestrator.environments.base import GeneratedEnvironment
from shared.config import ConfigError, reasoning_gym_datasets

INDEX_SPACE = 2**31 - 1  # entries are indexed (deterministically) in [0, INDEX_SPACE)


def extract(completion: str) -> str:
    """The answer a completion gives: inside its last ``<answer>`` tags, else the whole stripped text."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(completion)
    return tagged if tagged is not None else completion.strip()


class ReasoningGym(GeneratedEnvironment):
    name = "reasoning_gym"
    needs_answer = True  # a dataset-file row is scored by exact match against its answer
    config_key = "orchestrator.env_args.reasoning_gym"

    def __init__(self, cfg):
        super().__init__(cfg)
        rg = cfg.orchestrator.env_args.reasoning_gym
        datasets = reasoning_gym_datasets()
        if rg.dataset not in datasets:
            raise ConfigError(f"{self.config_key}.dataset: unknown dataset {rg.dataset!r}")
        dataset_cls, config_cls = datasets[rg.dataset]
        try:
            self.source: Any = dataset_cls(config=config_cls(**rg.options, seed=0, size=INDEX_SPACE))
        except Exception as e:  # normally caught by config validation already
            raise ConfigError(f"{self.config_key}.options: {' '.join(str(e).split()) or type(e).__name__}") from None
        self.instruction = rg.instruction.strip()

    def sample(self, rng: random.Random) -> Prompt:
        entry = self.source[rng.randrange(INDEX_SPACE)]
        question = str(entry["question"]).rstrip()
        answer = entry.get("answer")
        return Prompt(
            text=f"{question}\n\n{self.instruction}" if self.instruction else question,
            answer=answer if isinstance(answer, str) else None,
            meta={"entry": entry},
        )

    def grade(self, prompt: Prompt, completion: str) -> float:
        given = extract(completion)
        entry = (prompt.meta or {}).get("entry")
        if entry is None:
            return float(prompt.answer is not None and given == prompt.answer.strip())
        try:
            return float(self.source.score_answer(given, entry))
        except Exception:  # a dataset's scorer choking on an odd answer: that answer is wrong
            return 0.0
