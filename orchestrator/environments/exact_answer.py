"""Question/answer rows from ``orchestrator.dataset.path`` (required), scored by exact match.

About one row in five (by a stable hash of its prompt, as the generated environments split) is held
out for evaluation and never trained on.  A completion scores 1 when it equals the row's ``answer``
ignoring case, surrounding whitespace and punctuation (``"Paris."`` = ``"paris"``).  With a fixed
answer set (``orchestrator.env_args.answers``), every row's answer must be one of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.data import DatasetError, Prompt
from orchestrator.environments.base import Environment
from shared.answers import normalize


class ExactAnswer(Environment):
    name = "exact_answer"
    needs_answer = True
    split_heldout = True

    def __init__(self, cfg):
        super().__init__(cfg)
        path = cfg.orchestrator.dataset.path
        if self.dataset is None:
            raise DatasetError("orchestrator.dataset.path: the exact_answer environment reads its rows from a file")
        self.train, self.heldout = self.dataset.select(0), self.dataset.select(1)  # tagged by is_heldout
        if not self.train or not self.heldout:
            raise DatasetError(
                f"{path}: {len(self.dataset)} rows give {len(self.train)} for training and {len(self.heldout)} "
                "held out for evaluation; exact_answer needs both (add rows)"
            )

    def training_rows(self) -> Sequence[Prompt]:
        return self.train

    def eval_prompts(self, n: int) -> list[Prompt]:
        return self.heldout[:n]

    def grade(self, prompt: Prompt, completion: str) -> float:
        return float(prompt.answer is not None and normalize(completion) == normalize(prompt.answer))
