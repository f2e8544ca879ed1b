"""Environments: where prompts come from and how completions are scored."""

from __future__ import annotations

from orchestrator.environments.base import Environment
from orchestrator.environments.questions import FrenchAnswers
from orchestrator.environments.reverse_text import ReverseText
from shared.config import Config, ConfigError

REGISTRY: dict[str, type[Environment]] = {"reverse_text": ReverseText, "french": FrenchAnswers}


def make(cfg: Config) -> Environment:
    name = cfg.orchestrator.environment
    if name not in REGISTRY:
        raise ConfigError(f"orchestrator.environment: unknown environment {name!r} (known: {', '.join(REGISTRY)})")
    return REGISTRY[name](cfg)
