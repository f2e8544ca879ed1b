"""Process-level helpers shared by every role's actor: output redirection, thread counts, errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Written last into broadcast/step_N; a reader only trusts adapter directories that carry it.
ADAPTER_COMPLETE = "COMPLETE"


def redirect_output(log_path: str | None) -> None:
    """Send this process's stdout/stderr (including C-level writes from vLLM/torch) to ``log_path``
    (``None``: leave them alone, e.g. when a role runs inside a test process)."""
    if log_path is None:
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def first_line(exc: BaseException, limit: int = 400) -> str:
    """A one-line description of an exception (Ray wraps causes in long multi-line text)."""
    cause = exc
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:  # RayTaskError chain
        cause = cause.cause
    text = f"{type(cause).__name__}: {cause}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray's text ends with the original error; prefer the last line naming an Error/Exception.
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln[:limit]
    return (lines[-1] if lines else type(cause).__name__)[:limit]


def ray_env_defaults() -> None:
    """Environment for the Ray runtime we start: no token-auth warning, and workers run this very
    interpreter (Ray's `uv run` hook would otherwise re-resolve the project inside every worker)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
