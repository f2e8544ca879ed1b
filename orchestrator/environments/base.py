from __future__ import annotations

import random

from orchestrator.data import Prompt, load_jsonl
from shared.config import Config


class Environment:
    """Yields training prompts (cycling with a seeded shuffle), held-out eval prompts, and scores.

    ``orchestrator.dataset.path`` replaces the generated training prompts with a JSONL file.
    """

    name = "base"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.bad_rows = 0
        self.dataset: list[Prompt] | None = None
        if cfg.orchestrator.dataset.path:
            self.dataset, self.bad_rows = load_jsonl(cfg.orchestrator.dataset.path, cfg.orchestrator.dataset.on_bad_row)
        self.position = 0  # prompts handed out so far (for resume)

    def generate(self, rng: random.Random) -> Prompt:
        raise NotImplementedError

    def eval_prompts(self, n: int) -> list[Prompt]:
        raise NotImplementedError

    def score(self, prompt: Prompt, completion: str) -> float:
        raise NotImplementedError

    def next_prompts(self, n: int) -> list[Prompt]:
        out = []
        for _ in range(n):
            if self.dataset is not None:
                epoch, i = divmod(self.position, len(self.dataset))
                order = list(range(len(self.dataset)))
                random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
                out.append(self.dataset[order[i]])
            else:
                out.append(self.generate(self.rng))
            self.position += 1
        return out
