"""The asynchronous pipeline's bookkeeping: which rollouts are too old, and how busy each role was.

``orchestrator.max_async_level = k``: the rollouts trained at step ``n`` may have been sampled with the
adapter of any step ``a >= n - 1 - k``.  Their *staleness* is ``(n - 1) - a``, the optimizer steps between
the policy that sampled them and the one the trainer updates: 0 in the synchronous loop (``k = 0``),
``k`` in an asynchronous loop's steady state (sampling of step ``n + k`` starts while step ``n`` trains).
The importance ratio ``exp(logp_trainer - logp_inference)`` in the policy loss corrects for that lag;
rollouts staler than ``k`` (e.g. a buffer restored under a smaller ``k``) are dropped and counted.

:class:`Pipeline` keeps the batches sampled ahead and every remote call in flight (the loop asks it for a step's
batch and hands it the trainer's and the engines' calls to track).  :class:`Timeline` records when each role was busy (a remote call from submission until the orchestrator
saw its result), so a step's row can say how much of its wall time each role worked and how much of
that overlapped.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import ray

from orchestrator import checkpoint, skips
from orchestrator.data import Prompt
from orchestrator.failures import get
from orchestrator.roles import Roles, rollouts_of, scores_of
from shared.config import topk_in_loss
from shared.wire import Rollout


@dataclass
class Batch:
    """One step's prompts and rollouts; with ``max_async_level`` k > 0 sampled and scored up to k steps
    ahead of the training step that uses them."""

    step: int
    prompts: list[Prompt]
    base: int  # global index of the first prompt (sampling seeds follow it)
    stream: Any = None  # the prompt stream's state before these prompts were drawn (checkpoint.state_of)
    prompt_ids: list[list[int]] = field(default_factory=list)  # the student's view of each prompt
    teacher_ids: list[list[int]] = field(default_factory=list)  # the teacher's (with its context, if any)
    sample_refs: list = field(default_factory=list)
    score_refs: list = field(default_factory=list)
    score_parts: list[list[int]] = field(default_factory=list)
    rollouts: list[Rollout] | None = None  # the non-empty ones, by prompt index
    adapter_steps: dict[int, int] = field(default_factory=dict)  # prompt index -> adapter step that sampled it
    empty: int = 0
    too_long: int = 0  # rollouts not sampled: their prompt leaves no room for inference.max_tokens
    teacher_lp: list[list[float] | None] | None = None  # set once scored: the batch is complete
    t_sampled: float = 0.0
    t_scored: float = 0.0
    engine_seconds: dict[str, float] = field(default_factory=dict)  # role -> its engines' own time on the batch

    def state(self) -> dict[str, Any]:
        """A complete batch as plain data for a checkpoint (msgpack keeps the floats exact)."""
        return {"step": self.step, "prompts": msgspec.to_builtins(self.prompts), "base": self.base,
                "rollouts": msgspec.to_builtins(self.rollouts),
                "adapter_steps": self.adapter_steps, "empty": self.empty, "too_long": self.too_long,
                "teacher_lp": self.teacher_lp}

    def view(self, role: str) -> list[list[int]]:
        """The prompts as ``role`` sees them: the student engines' view, or the teacher's."""
        return self.teacher_ids if role == "teacher" else self.prompt_ids

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> Batch:
        return cls(step=s["step"], prompts=msgspec.convert(s["prompts"], list[Prompt]), base=s["base"],
                   rollouts=msgspec.convert(s["rollouts"], list[Rollout]),
                   adapter_steps={int(k): v for k, v in s["adapter_steps"].items()}, empty=s["empty"],
                   too_long=s.get("too_long", 0), teacher_lp=s["teacher_lp"])


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


CALLS = {"inference": "generate", "teacher": "score (or generate)", "trainer": "train_step",
         "weight_update": "load_adapter", "persist": "persist"}  # what a tracked call of each label asked
ROLE_OF = {"weight_update": "inference", "persist": "trainer"}  # the role of a label that is not one


class Pipeline:
    """The batches of the next ``k = max_async_level`` steps, sampled and scored while the trainer works, and
    every remote call in flight (:meth:`submit` / :meth:`wait`).

    A batch moves sampled -> scoring submitted -> scored as its calls finish (:meth:`advance`, never blocking);
    ``sampler`` is the role whose engines write the completions, ``scores`` whether the teacher scores them
    (otherwise their log-probs stand in for the teacher's: a KL of 0, reported as NaN by the loop)."""

    def __init__(self, cfg: Any, roles: Roles, source: Any, render: Callable[[Prompt, bool], list[int]],
                 has_context: bool, sampler: str, scores: bool, adapter_base: int):
        self.cfg, self.roles, self.source, self.render = cfg, roles, source, render
        self.has_context, self.sampler, self.scores, self.adapter_base = has_context, sampler, scores, adapter_base
        self.inflight: dict[Any, tuple[str, float]] = {}  # ref -> (role, submitted at)
        self.step = 0  # the training step the loop is at (for a deadline's message)
        self.last_reply: dict[str, float] = {}  # role -> when it last answered a call
        self.results: dict[Any, Any] = {}
        self.timeline = Timeline()
        self.queue: deque[Batch] = deque()
        self.next_draw = 1  # the step whose prompts are drawn next
        self.too_long = 0  # rollouts of the last batch not sampled (prompt too long)
        self.teacher_row: dict[str, float] = {}  # the last batch's per-teacher entries (TeacherBackend.batch_metrics)

    # -- calls in flight ---------------------------------------------------------------------------
    def submit(self, role: str, refs: list) -> list:
        """Track ``refs`` (calls just made to ``role``): their results are collected by :meth:`poll`."""
        now = time.perf_counter()
        self.inflight.update(dict.fromkeys(refs, (role, now)))
        return refs

    def poll(self) -> None:
        """Block until at least one tracked call finishes; collect every finished one (a failed call raises
        RoleFailure at once, naming its role, even if it was work for a later step). A call that outlives its
        deadline (``orchestrator/deadlines.py``) raises RoleFailure naming the role, the actor and the call."""
        assert self.inflight, "nothing in flight to wait for"
        deadlines = self.roles.deadlines
        while True:
            now = time.perf_counter()
            left = {ref: start + deadlines.limit(label) - now for ref, (label, start) in self.inflight.items()}
            ref, soonest = min(left.items(), key=lambda kv: kv[1])
            if soonest <= 0:  # hung: no answer within the deadline of its kind
                label, start = self.inflight[ref]
                role = ROLE_OF.get(label, label)
                raise deadlines.expired(role, self.roles.owner.get(ref, role), CALLS[label], self.step, now - start,
                                        deadlines.limit(label))
            if ray.wait(list(self.inflight), num_returns=1, timeout=soonest)[0]:
                break
        ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        now = time.perf_counter()
        for ref in ready:
            label, start = self.inflight.pop(ref)
            actor = self.roles.owner.pop(ref, "")
            self.timeline.add(label, start, now)
            deadlines.record(label, now - start)
            role = ROLE_OF.get(label, label)
            self.results[ref] = get(role, ref, actor=actor)
            self.last_reply[role] = now

    def heartbeat(self) -> dict[str, float]:
        """``heartbeat/<role>``: seconds since each role last answered a call of the pipeline."""
        now = time.perf_counter()
        return {f"heartbeat/{role}": now - t for role, t in sorted(self.last_reply.items())}

    def wait(self, refs: list) -> list:
        """The results of tracked ``refs``, in order; queued batches move on (sampled -> scored) meanwhile."""
        while True:
            self.advance()
            if all(r in self.results for r in refs):
                return [self.results.pop(r) for r in refs]
            self.poll()

    def drain(self, timeout: float) -> int:
        """Wait at most ``timeout`` seconds for the calls in flight, then cancel the rest; how many were
        cancelled.  Never raises: a failed call's result is simply not used."""
        deadline = time.perf_counter() + timeout
        while self.inflight and time.perf_counter() < deadline:
            ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight),
                                timeout=max(0.0, deadline - time.perf_counter()))
            for ref in ready:
                self.inflight.pop(ref)
            if not ready:
                break
        left = list(self.inflight)
        for ref in left:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        self.inflight.clear()
        self.results.clear()
        return len(left)

    # -- batches -------------------------------------------------------------------------------------
    def render_batch(self, batch: Batch) -> None:
        batch.prompt_ids = [self.render(p, False) for p in batch.prompts]
        # the teacher's view differs where a context applies: the run-wide one or the prompt's own (prompts.py)
        batch.teacher_ids = [self.render(p, True) if self.has_context or p.teacher_context else ids
                             for p, ids in zip(batch.prompts, batch.prompt_ids)]

    def _start(self, step: int) -> Batch:
        """Draw the prompts of ``step`` and submit their sampling (with whatever adapter the engines serve)."""
        oc = self.cfg.orchestrator
        stream = checkpoint.state_of(self.source)  # before the draw: a checkpoint can rewind to here
        prompts = self.source.next_prompts(oc.batch_size)
        base = self.source.position - len(prompts)  # rollouts carry global prompt indices (seeds follow them)
        batch = Batch(step=step, prompts=prompts, base=base, stream=stream)
        self.render_batch(batch)
        # a prompt too long for the context (a teacher-written question; a generator checked on a sample only)
        # is not sampled: dropped and counted, never a failed engine call
        keep = skips.fitting([max(len(s), len(t)) for s, t in zip(batch.prompt_ids, batch.teacher_ids)],
                             self.cfg.model.max_model_len, self.cfg.inference.max_tokens)
        batch.too_long = (len(prompts) - len(keep)) * oc.group_size
        view = batch.view(self.sampler)
        batch.sample_refs = self.submit(self.sampler, self.roles.sample_refs(
            self.sampler, [view[i] for i in keep], base, oc.group_size, self.cfg.inference.temperature,
            indices=[base + i for i in keep]))
        return batch

    def advance(self) -> None:
        """Move every queued batch whose calls have finished to its next stage.  Never blocks."""
        for b in self.queue:
            if b.rollouts is None and all(r in self.results for r in b.sample_refs):
                rollouts, b.adapter_steps, b.engine_seconds[self.sampler] = rollouts_of(
                    [self.results.pop(r) for r in b.sample_refs], self.adapter_base)
                if self.sampler != "inference":  # no student adapter sampled them: never stale
                    b.adapter_steps = {}
                b.empty = sum(1 for r in rollouts if not r.completion_ids)
                b.rollouts = [r for r in rollouts if r.completion_ids]
                b.t_sampled = time.perf_counter()
                if self.scores:
                    topk = self.cfg.trainer.loss.teacher_topk if topk_in_loss(self.cfg) else 0  # trainer/topk.py
                    teachers = self.roles.teacher.route([b.prompts[r.prompt_index - b.base] for r in b.rollouts])
                    refs, b.score_parts = self.roles.score_refs([b.teacher_ids[r.prompt_index - b.base] for r in b.rollouts],
                                                                [r.completion_ids for r in b.rollouts], teachers,
                                                                topk=topk)
                    b.score_refs = self.submit("teacher", refs)
                else:  # nothing to score: the sampler's own log-probs stand in (a KL of 0, logged as NaN)
                    b.teacher_lp = [list(r.logprobs) for r in b.rollouts]
                    b.t_scored = b.t_sampled
            if b.rollouts is not None and b.teacher_lp is None and all(r in self.results for r in b.score_refs):
                scores = scores_of(b.score_parts, [self.results.pop(r) for r in b.score_refs], len(b.rollouts))
                b.teacher_lp = self.roles.teacher_logprobs(scores, [r.completion_ids for r in b.rollouts],
                                                           [r.logprobs for r in b.rollouts])
                scores.attach_topk(b.rollouts)  # the top-k estimator's teacher side, if asked for
                b.engine_seconds["teacher"] = b.engine_seconds.get("teacher", 0.0) + scores.seconds  # + its sampling (sft)
                b.t_scored = time.perf_counter()

    def next_batch(self, step: int) -> Batch:
        """The batch of ``step``, sampled and scored: its sampling starts now (``k = 0``) or started ``k`` steps
        ago; the batches of steps ``step + 1 .. step + k`` are queued behind it."""
        self.step = step
        k = self.cfg.orchestrator.max_async_level
        while len(self.queue) <= k and self.next_draw <= self.cfg.max_steps:
            self.queue.append(self._start(self.next_draw))
            self.next_draw += 1
        batch = self.queue[0]
        while True:
            self.advance()
            if batch.teacher_lp is not None:
                break
            self.poll()
        self.too_long = batch.too_long
        # several named teachers: each one's counts and KL over this batch (none for one teacher)
        self.teacher_row = self.roles.teacher.batch_metrics(
            [batch.prompts[r.prompt_index - batch.base] for r in batch.rollouts], batch.rollouts,
            batch.teacher_lp) if self.scores else {}
        return self.queue.popleft()

    def counts(self) -> dict[str, float]:
        """The last batch's skip counters that no workflow sees (``orchestrator/skips.py``)."""
        return {"rollouts/too_long": float(self.too_long), **self.teacher_row}

    def settle(self, timeout: float) -> tuple[list[dict[str, Any]], Any]:
        """For a checkpoint: wait (at most ``timeout`` s) for the queued batches to be scored; the complete ones
        as plain data, and the prompt stream's state after the last of them (a resumed run draws the rest
        again)."""
        deadline = time.perf_counter() + timeout
        while self.inflight and any(b.teacher_lp is None for b in self.queue) and time.perf_counter() < deadline:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if ready:
                self.poll()
            self.advance()
        buffer, stream = [], checkpoint.state_of(self.source)
        for b in self.queue:
            if b.teacher_lp is None:  # not ready in time: a resumed run draws these prompts again
                stream = b.stream
                break
            buffer.append(b.state())
        return buffer, stream

    def load(self, buffer: list[dict[str, Any]], step: int) -> None:
        """Queue a checkpoint's complete batches again (after ``step``)."""
        for saved in buffer:
            batch = Batch.from_state(saved)
            self.render_batch(batch)
            self.queue.append(batch)
        self.next_draw = step + 1 + len(self.queue)
