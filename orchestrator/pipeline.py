"""The asynchronous pipeline's bookkeeping: which rollouts are too old, and how busy each role was.

``orchestrator.max_async_level = k``: the rollouts trained at step ``n`` may have been sampled with the
adapter of any step ``a >= n - 1 - k``.  Their *staleness* is ``(n - 1) - a``, the optimizer steps between
the policy that sampled them and the one the trainer updates: 0 in the synchronous loop (``k = 0``),
``k`` in an asynchronous loop's steady state (sampling of step ``n + k`` starts while step ``n`` trains).
The importance ratio ``exp(logp_trainer - logp_inference)`` in the policy loss corrects for that lag;
rollouts staler than ``k`` (e.g. a buffer restored under a smaller ``k``) are dropped and counted.

:class:`Timeline` records when each role was busy (a remote call from submission until the orchestrator
saw its result), so a step's row can say how much of its wall time each role worked and how much of
that overlapped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from orchestrator.data import Prompt
from shared.wire import Rollout


@dataclass
class Batch:
    """One step's prompts and rollouts; with ``max_async_level`` k > 0 sampled and scored up to k steps
    ahead of the training step that uses them."""

    step: int
    prompts: list[Prompt]
    base: int  # global index of the first prompt (sampling seeds follow it)
    stream: Any = None  # the prompt stream's state before these prompts were drawn (checkpoint.state_of)
    envs: list[int] | None = None  # a replay mix: each prompt's environment (0 = main, 1.. = cores)
    replayed: int = 0
    prompt_ids: list[list[int]] = field(default_factory=list)
    teacher_ids: list[list[int]] = field(default_factory=list)
    sample_refs: list = field(default_factory=list)
    score_refs: list = field(default_factory=list)
    score_parts: list[list[int]] = field(default_factory=list)
    rollouts: list[Rollout] | None = None  # the non-empty ones, by prompt index
    adapter_steps: dict[int, int] = field(default_factory=dict)  # prompt index -> adapter step that sampled it
    empty: int = 0
    teacher_lp: list[list[float] | None] | None = None  # set once scored: the batch is complete
    t_sampled: float = 0.0
    t_scored: float = 0.0

    def state(self) -> dict[str, Any]:
        """A complete batch as plain data for a checkpoint (msgpack keeps the floats exact)."""
        return {"step": self.step, "prompts": msgspec.to_builtins(self.prompts), "base": self.base,
                "envs": self.envs, "replayed": self.replayed, "rollouts": msgspec.to_builtins(self.rollouts),
                "adapter_steps": self.adapter_steps, "empty": self.empty, "teacher_lp": self.teacher_lp}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> Batch:
        return cls(step=s["step"], prompts=msgspec.convert(s["prompts"], list[Prompt]), base=s["base"],
                   envs=s["envs"], replayed=s["replayed"], rollouts=msgspec.convert(s["rollouts"], list[Rollout]),
                   adapter_steps={int(k): v for k, v in s["adapter_steps"].items()}, empty=s["empty"],
                   teacher_lp=s["teacher_lp"])


def staleness(step: int, adapter_step: int) -> int:
    """Optimizer steps between the adapter that sampled a rollout and the weights step ``step`` updates."""
    return (step - 1) - adapter_step


def split_stale(step: int, adapter_steps: dict[int, int], max_async_level: int) -> tuple[set[int], list[int]]:
    """``(dropped, kept_staleness)``: the prompt indices whose rollouts are staler than ``max_async_level``
    (``adapter_steps``: prompt index -> the adapter step that sampled its group), and the staleness of
    each prompt kept.  Whole groups go together, so a task baseline never sees half a group."""
    dropped = {i for i, a in adapter_steps.items() if staleness(step, a) > max_async_level}
    kept = [staleness(step, a) for i, a in sorted(adapter_steps.items()) if i not in dropped]
    return dropped, kept


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _clip(intervals: Iterable[tuple[float, float]], t0: float, t1: float) -> list[tuple[float, float]]:
    return [(max(s, t0), min(e, t1)) for s, e in intervals if min(e, t1) > max(s, t0)]


class Timeline:
    """Busy intervals per role (seconds on one clock, e.g. ``time.perf_counter``)."""

    def __init__(self) -> None:
        self.intervals: dict[str, list[tuple[float, float]]] = {}

    def add(self, role: str, start: float, end: float) -> None:
        if end > start:
            self.intervals.setdefault(role, []).append((start, end))

    def busy(self, t0: float, t1: float) -> dict[str, float]:
        """Seconds of ``[t0, t1]`` in which each role had at least one call in flight."""
        return {role: sum(e - s for s, e in _union(_clip(iv, t0, t1))) for role, iv in self.intervals.items()}

    def overlap(self, t0: float, t1: float, roles: Iterable[str] | None = None) -> float:
        """Seconds of ``[t0, t1]`` in which two or more of ``roles`` (default: all) were busy at once."""
        events = []
        chosen = self.intervals if roles is None else {r: self.intervals.get(r, []) for r in roles}
        for iv in chosen.values():
            for s, e in _union(_clip(iv, t0, t1)):
                events += [(s, 1), (e, -1)]
        events.sort()
        total, depth, last = 0.0, 0, t0
        for t, delta in events:
            if depth >= 2:
                total += t - last
            depth, last = depth + delta, t
        return total

    def forget(self, before: float) -> None:
        """Drop intervals that ended before ``before`` (a finished step's)."""
        for role, iv in self.intervals.items():
            self.intervals[role] = [(s, e) for s, e in iv if e >= before]

    def metrics(self, t0: float, t1: float, roles: Iterable[str]) -> dict[str, float]:
        """``busy/<role>`` (fraction of the window) for ``roles`` and ``time/overlap`` (seconds)."""
        wall = max(t1 - t0, 1e-9)
        busy = self.busy(t0, t1)
        roles = list(roles)
        row = {f"busy/{role}": busy.get(role, 0.0) / wall for role in roles}
        row["time/overlap"] = self.overlap(t0, t1, roles)
        return row
