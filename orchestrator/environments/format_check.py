"""Instruction following that a rule can check: the open questions of ``questions.py``, scored by format.

A core behaviour for context distillation: give the teacher the rules' instruction as its context
(``orchestrator.teacher_model.context``, e.g. "Answer in uppercase.") and the student learns to follow
it without being told; or set ``orchestrator.env_args.format_check.instruct = true`` to put the
instruction into every prompt (plain instruction-following RL).  The score is the fraction of
``orchestrator.env_args.format_check.rules`` that a completion meets:

- ``uppercase``: every cased letter is uppercase, and there is at least one;
- ``lowercase``: every cased letter is lowercase, and there is at least one;
- ``period``: the stripped text ends with "." (and is more than the period);
- ``no_commas``: non-empty, with no comma ("," or the full-width "，").
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.environments.questions import OpenQuestions
from orchestrator.data import Prompt
from shared.config import FORMAT_RULES

RULES: dict[str, tuple[Callable[[str], bool], str]] = {  # rule -> (check, instruction)
    "uppercase": (lambda t: t.isupper(), "Write your whole answer in uppercase letters."),
    "lowercase": (lambda t: t.islower(), "Write your whole answer in lowercase letters."),
    "period": (lambda t: len(t.strip()) > 1 and t.strip().endswith("."), "End your answer with a period."),
    "no_commas": (lambda t: bool(t.strip()) and "," not in t and "，" not in t, "Do not use any commas."),
}
assert tuple(RULES) == FORMAT_RULES  # the config's list of names is this table's


def instruction(rules: list[str]) -> str:
    """The instruction that asks for ``rules`` (e.g. a teacher context)."""
    return " ".join(RULES[r][1] for r in rules)


def rule_score(rules: list[str], completion: str) -> float:
    """The fraction of ``rules`` that ``completion`` meets."""
    return sum(RULES[r][0](completion) for r in rules) / len(rules)


class FormatCheck(OpenQuestions):
    name = "format_check"

    def __init__(self, cfg):
        super().__init__(cfg)
        fc = cfg.orchestrator.env_args.format_check
        self.rules = list(fc.rules)
        self.suffix = instruction(self.rules) if fc.instruct else ""

    def grade(self, prompt: Prompt, completion: str) -> float:
        return rule_score(self.rules, completion)
