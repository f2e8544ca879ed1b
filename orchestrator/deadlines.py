"""Deadlines on every call to a role, so that a hung role stops the run instead of stalling it.

A call's deadline is ``orchestrator.deadline.floor_s`` until ``after_calls`` calls of its kind have finished,
then ``max(floor_s, median_multiple * median)`` of their durations (a call that usually takes 2 s and has taken
600 s is hung; one that usually takes 100 s may take 1000). Start-up has its own ``startup_s``. On expiry the
run stops (or, with ``ckpt.on_failure = "restart"``, restarts every role from the last checkpoint) with one line
naming the role, the actor, the call, the step and the wait, and the last lines of that actor's log.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from orchestrator.failures import RoleFailure

LOG_TAIL_LINES = 5
HISTORY = 50  # durations kept per kind of call


class Deadlines:
    def __init__(self, cfg: Any, out: Path):
        self.dc, self.out = cfg.orchestrator.deadline, out
        self.seconds: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=HISTORY))

    def limit(self, call: str) -> float:
        """The deadline, in seconds, of the next call of kind ``call``."""
        done = self.seconds[call]
        if len(done) < self.dc.after_calls:
            return self.dc.floor_s
        return max(self.dc.floor_s, self.dc.median_multiple * statistics.median(done))

    def record(self, call: str, seconds: float) -> None:
        self.seconds[call].append(seconds)

    def expired(self, role: str, actor: str, call: str, step: int, waited: float, limit: float) -> RoleFailure:
        """The failure to raise: one line, and the tail of the actor's log as its detail."""
        where = f"step {step}" if step else "start-up"
        cause = (f"{actor} did not answer {call} in {where} within its deadline ({waited:.0f} s > {limit:.0f} s); "
                 f"see logs/{actor}.log")
        return RoleFailure(role, cause, log_tail(self.out / "logs" / f"{actor}.log"))


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of a log file ("" if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])
