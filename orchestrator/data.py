"""Prompt datasets: JSONL files with one ``{"prompt": str, "answer"?: str}`` object per line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msgspec import Struct

from shared.config import ConfigError


class Prompt(Struct, kw_only=True):
    text: str
    answer: str | None = None
    meta: dict[str, Any] | None = None  # what an environment needs to score it (e.g. a reasoning-gym entry)
    env: str = ""  # the environment that drew it when it is not the run's own (a continual replay's core)


class DatasetError(ConfigError):
    """A dataset problem; the message names the file (and line)."""


def load_jsonl(
    path: str, on_bad_row: str = "error", check: Callable[[Prompt], str | None] | None = None
) -> tuple[list[Prompt], int]:
    """Rows of ``path`` and the number of bad rows skipped (always 0 with ``on_bad_row="error"``).

    ``check`` (an environment's own rule, e.g. "needs an answer") returns a problem for a row, or None.
    """
    p = Path(path)
    try:
        # split on "\n" only: str.splitlines() also breaks at U+2028/U+0085, which JSON allows inside strings
        lines = p.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise DatasetError(f"orchestrator.dataset.path: {path}: file not found") from None
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError, or a NUL byte in the path
        raise DatasetError(f"orchestrator.dataset.path: {path}: cannot read ({type(e).__name__}: {e})") from None
    prompts: list[Prompt] = []
    bad = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        problem = None
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # also: an integer of > 4300 digits, nesting too deep
            row, problem = None, f"not valid JSON ({getattr(e, 'msg', e)})"
        if problem is None:
            if not isinstance(row, dict):
                problem = f"expected a JSON object, got {type(row).__name__}"
            elif "prompt" not in row:
                problem = "missing field 'prompt'"
            elif not isinstance(row["prompt"], str) or not row["prompt"].strip():
                problem = "'prompt' must be a non-empty string"
            elif "answer" in row and row["answer"] is not None and not isinstance(row["answer"], str):
                problem = "'answer' must be a string"
        prompt = None
        if problem is None:
            prompt = Prompt(text=row["prompt"], answer=row.get("answer"))
            problem = check(prompt) if check is not None else None
        if problem is not None or prompt is None:
            if on_bad_row == "error":
                raise DatasetError(f"{path}:{lineno}: {problem} (set orchestrator.dataset.on_bad_row = \"skip\" to skip)")
            bad += 1
            continue
        prompts.append(prompt)
    if not prompts:
        raise DatasetError(f"{path}: no usable prompts ({bad} bad rows)")
    return prompts, bad
