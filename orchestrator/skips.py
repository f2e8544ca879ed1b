"""What a run left out, counted where the user looks: the console at start, ``metrics.jsonl`` and ``report.md``.

Two kinds of skip:

- dataset rows, decided once before the run (``orchestrator.dataset.on_bad_row = "skip"``): malformed rows
  (``load_jsonl``) and rows whose prompt leaves no room for ``inference.max_tokens`` (``launcher.
  check_prompt_lengths``). The launcher prints one line for each kind, the plan carries the counts
  (``RunPlan.skipped``) and the step-0 row of ``metrics.jsonl`` holds them as ``data/skipped_<kind>``;
- per step (:data:`STEP_COUNTS`): rollouts and steps the loop dropped, each a counter in the step's row. The
  report sums each over the run's final rows (a restarted step counts once: its earlier rows were cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SHOWN = 5  # line numbers named in the start-up line (the count is always complete)

# Per-step counters: metrics key -> what it counts.
STEP_COUNTS = {
    "rollouts/empty": "empty rollouts (no completion token)",
    "rollouts/too_long": "rollouts not sampled: prompt + inference.max_tokens longer than model.max_model_len",
    "async/dropped_rollouts": "rollouts dropped: staler than max_async_level",
    "teacher/score_failed": "rollouts dropped: the teacher could not score them",
    "judge/unparseable": "judge replies without a verdict",
    "skipped_step": "training steps skipped (non-finite, or no usable samples)",
}
DATA_KINDS = {"malformed": "malformed", "too_long": "too long for model.max_model_len - inference.max_tokens"}


def rows_line(path: str, skipped: int, total: int, lines: Sequence[int], why: str) -> str:
    """The console line for dataset rows skipped at start, e.g. ``dataset: 3 of 28 rows skipped (malformed):
    data.jsonl:4, data.jsonl:9, data.jsonl:17 ...``; ``lines`` are 1-based line numbers (the first
    :data:`SHOWN` are named)."""
    named = ", ".join(f"{path}:{n}" for n in list(lines)[:SHOWN])
    more = f" and {skipped - SHOWN} more" if skipped > SHOWN else ""
    return f"dataset: {skipped} of {total} rows skipped ({why}): {named}{more} (orchestrator.dataset.on_bad_row = \"skip\")"


def data_metrics(skipped: dict[str, int]) -> dict[str, float]:
    """The step-0 row's entries: ``data/skipped_<kind>`` for each kind of dataset row skipped at start."""
    return {f"data/skipped_{kind}": float(n) for kind, n in sorted(skipped.items())}


def totals(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """``(key, meaning, total)`` of every skip counter present in ``rows`` (metrics.jsonl's final rows): the
    dataset rows of the step-0 row, then each per-step counter summed over the training rows."""
    out: list[tuple[str, str, float]] = []
    for kind, meaning in DATA_KINDS.items():
        key = f"data/skipped_{kind}"
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            out.append((key, f"dataset rows skipped ({meaning})", float(values[0])))
    train = [r for r in rows if "teacher_kl" in r]
    for key, meaning in STEP_COUNTS.items():
        values = [r[key] for r in train if isinstance(r.get(key), (int, float))]
        if values:
            out.append((key, meaning, float(sum(values))))
    return out


def report_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report's "Skipped" section: one table row per counter with its total (0 included: counted, none)."""
    found = totals(rows)
    if not found:
        return []
    lines = ["## Skipped", "", "| what | metric | total |", "|---|---|---|"]
    lines += [f"| {meaning} | `{key}` | {total:g} |" for key, meaning, total in found]
    return lines + [""]


def fitting(lengths: Sequence[int], max_model_len: int, max_tokens: int) -> list[int]:
    """Indices of the prompts (``lengths``: tokens of each prompt's longest view, the student's or the teacher's
    with its context) that leave room for ``max_tokens`` of completion within ``max_model_len``: ``L + max_tokens
    <= max_model_len``. The others are dropped before sampling and counted (``rollouts/too_long``): a vLLM engine
    refuses a prompt longer than its context, and the teacher scores prompt + completion in one pass."""
    return [i for i, n in enumerate(lengths) if n + max_tokens <= max_model_len]


def scorable(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
             max_model_len: int) -> list[int]:
    """Indices of the (prompt, completion) pairs whose ``len(prompt) + len(completion) <= max_model_len``: the
    only ones a scoring engine is asked for (the others come back unscored, dropped and counted as
    ``teacher/score_failed``)."""
    return [i for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)) if len(p) + len(c) <= max_model_len]
