"""Environments: where prompts come from and how completions are scored.

=================  ===================================================  ===========================================
name               prompts                                              score (in [0, 1])
=================  ===================================================  ===========================================
``reverse_text``   ``"abcd="`` strings for the tiny pair                exact reversal
``arithmetic``     ``What is 37 + 12?`` (``env_args.arithmetic``)       last number in the completion = the answer
``format_check``   open questions                                       fraction of ``env_args.format_check.rules``
``reasoning_gym``  a reasoning-gym dataset (``env_args.reasoning_gym``)  the dataset's ``score_answer``
``exact_answer``   rows of ``orchestrator.dataset.path``                normalised exact match with the row's answer
``french``         open questions                                       the answer is in French
``running_sum``    ``"3 1 4 1 5 ="`` for the tiny running-sum pair      exact match (or ``env_args.running_sum``:
                                                                        steps right before the first wrong one)
=================  ===================================================  ===========================================

``reverse_text_long`` and ``reverse_text_short`` are ``reverse_text`` restricted to 7-8 and 3-5 letters
(a new skill and a core behaviour for continual learning; ``continual_tasks.py``).

Every environment is deterministic from ``cfg.seed`` and evaluates on held-out prompts that training
never draws.  ``orchestrator.env_args.answers`` constrains any of them to a fixed answer set (see
``shared/answers.py``).  A new environment subclasses :class:`Environment` (or
:class:`GeneratedEnvironment`) and is added to ``REGISTRY``.
"""

from __future__ import annotations

import random

from orchestrator.environments.arithmetic import Arithmetic
from orchestrator.environments.base import Environment, GeneratedEnvironment
from orchestrator.environments.continual_tasks import TASKS as CONTINUAL_TASKS
from orchestrator.environments.exact_answer import ExactAnswer
from orchestrator.environments.format_check import FormatCheck
from orchestrator.environments.questions import FrenchAnswers
from orchestrator.environments.reasoning_gym_env import ReasoningGym
from orchestrator.environments.reverse_text import ReverseText
from orchestrator.environments.running_sum import RunningSum
from shared.config import Config, ConfigError

REGISTRY: dict[str, type[Environment]] = {
    "reverse_text": ReverseText,
    "arithmetic": Arithmetic,
    "format_check": FormatCheck,
    "reasoning_gym": ReasoningGym,
    "exact_answer": ExactAnswer,
    "french": FrenchAnswers,
    "running_sum": RunningSum,
    **CONTINUAL_TASKS,  # reverse_text_long, reverse_text_short
}

__all__ = ["REGISTRY", "Environment", "GeneratedEnvironment", "make"]


def make(cfg: Config) -> Environment:
    """The configured environment, checked: it can draw a training prompt and has held-out prompts.

    Every problem (an unknown name, a bad dataset row by file:line, an exhausted prompt space) is a
    ConfigError naming the key or file, so a preflight that calls this reports it before anything starts.
    """
    name = cfg.orchestrator.environment
    if name not in REGISTRY:
        raise ConfigError(f"orchestrator.environment: unknown environment {name!r} (known: {', '.join(REGISTRY)})")
    env = REGISTRY[name](cfg)
    if env.dataset is None:
        env.generate(random.Random(cfg.seed))  # raises when every prompt drawn is held out
    if not env.eval_prompts(1):
        raise ConfigError(f"orchestrator.environment: {name}: no held-out prompts to evaluate on "
                          "(the prompt space is too small)")
    return env
