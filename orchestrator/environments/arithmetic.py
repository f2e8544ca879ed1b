"""Integer arithmetic with exact answers: ``What is 37 + 12 * 4?`` -> ``85``.

Operands are drawn uniformly from ``[min_operand, max_operand]`` (negative ones written in
parentheses), operators from ``operators``; ``*`` binds tighter than ``+`` and ``-``
(``orchestrator.env_args.arithmetic``).  The score is 1 when the last number in the completion equals
the answer: ``"37 + 12 = 49"``, ``"The answer is 49."``, ``"1,234"`` and ``"49.0"`` all read as
numbers; a completion with no number, or whose last number differs, scores 0.  With a dataset file,
every row needs an integer ``answer``.

``teacher_context = "solution"`` gives each generated prompt its worked solution as the teacher's own
context (``Prompt.teacher_context``; :func:`solution`), so the teacher can be the student's own base
model seeing the answer (self-distillation with privileged information).
"""

from __future__ import annotations

import random
import re

from orchestrator.data import Prompt
from orchestrator.environments.base import GeneratedEnvironment
from shared.config import ConfigError

# A number whose minus sign is not a binary minus ("5-3" reads 5 and 3); thousands separators; decimals.
_NUMBER = re.compile(r"(?<![\w.])([-−]?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?![\d])")


def last_integer(text: str) -> int | None:
    """The last number in ``text`` if it is an integer (``"49.0"`` is 49, ``"4.5"`` is None), else None."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    sign, digits, frac = matches[-1].groups()
    if (frac and frac.strip("0")) or len(digits) > 4000:  # int() refuses > 4300 digits
        return None
    value = int(digits.replace(",", ""))
    return -value if sign else value


def evaluate(operands: list[int], operators: list[str]) -> int:
    """``operands[0] op0 operands[1] op1 ...`` with ``*`` before ``+``/``-``."""
    terms, signs = [operands[0]], []
    for op, x in zip(operators, operands[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return terms[0] + sum(s * t for s, t in zip(signs, terms[1:]))


def solution(operands: list[int], operators: list[str]) -> str:
    """The expression evaluated one operation at a time, products first, then sums left to right:
    ``37 + 12 * 4`` -> ``"37 + 12 * 4 = 37 + 48 = 85. The answer is 85."``"""
    xs, ops = list(operands), list(operators)
    steps = [expression(xs, ops)]
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, b, op = xs[i], xs[i + 1], ops.pop(i)
        xs[i:i + 2] = [a * b if op == "*" else a + b if op == "+" else a - b]
        steps.append(expression(xs, ops))
    return f"{' = '.join(steps)}. The answer is {xs[0]}."


def expression(operands: list[int], operators: list[str]) -> str:
    parts = [str(operands[0]) if operands[0] >= 0 else f"({operands[0]})"]
    for op, x in zip(operators, operands[1:]):
        parts += [op, str(x) if x >= 0 else f"({x})"]
    return " ".join(parts)


class Arithmetic(GeneratedEnvironment):
    name = "arithmetic"
    needs_answer = True
    config_key = "orchestrator.env_args.arithmetic"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.args = cfg.orchestrator.env_args.arithmetic
        if self.args.teacher_context == "solution" and self.dataset is not None:
            raise ConfigError(f"{self.config_key}.teacher_context: \"solution\" is made for generated prompts; "
                              "with orchestrator.dataset.path give each row its own \"teacher_context\"")

    def row_problem(self, prompt: Prompt) -> str | None:
        problem = super().row_problem(prompt)
        answer = (prompt.answer or "").strip()
        if problem is None and (_NUMBER.fullmatch(answer) is None or last_integer(answer) is None):
            problem = "'answer' must be an integer (the arithmetic environment compares numbers)"
        return problem

    def sample(self, rng: random.Random) -> Prompt:
        a = self.args
        operands = [rng.randint(a.min_operand, a.max_operand) for _ in range(a.terms)]
        operators = [rng.choice(a.operators) for _ in range(a.terms - 1)]
        context = solution(operands, operators) if a.teacher_context == "solution" else None
        return Prompt(text=f"What is {expression(operands, operators)}?", answer=str(evaluate(operands, operators)),
                      teacher_context=context)

    def grade(self, prompt: Prompt, completion: str) -> float:
        want = last_integer(prompt.answer or "")
        return float(want is not None and last_integer(completion) == want)
