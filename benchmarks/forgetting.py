"""Forgetting on a real model: the same new behaviour taught by on-policy context distillation and by SFT on the
teacher's samples, and what each costs the behaviours the model had before.

    python benchmarks/forgetting.py                       # opd and sft, seeds 0 and 1, 8 steps
    python benchmarks/forgetting.py --seeds 0 1 --steps 10  # the result of 2026-12-02: ~50 min on 2 idle cores
    python benchmarks/forgetting.py --seeds 2 --steps 10    # one more seed of each
    python benchmarks/forgetting.py --seeds 0 --steps 1   # a pipeline check
    python benchmarks/forgetting.py --runs DIR ...        # again after a stop: the runs DIR holds finished are kept

The student is SmolLM2-135M-Instruct with a LoRA adapter; the new behaviour is answering in French
(``eval/french/avg``), which the teacher (the same model with "Answer in French." before the user turn) has
and the student does not.  Two methods, every other setting equal (``experiments/forgetting/``):

- ``opd``: on-policy context distillation (``opd.toml``): the student samples, the trainer follows the
  teacher's per-token log-probs of the student's samples (reverse KL);
- ``sft``: SFT on the teacher's samples (``opd.toml`` + ``sft.toml``): the teacher samples, the student fits
  them by NLL without the context.

Both see ``batch_size x group_size`` teacher-touched samples a step for the same steps: the same number of
teacher samples.  The core behaviours are the continual capability suite's (``[orchestrator.continual]``
with ``replay_ratio = 0`` and ``gate = false``: measured, not prevented), evaluated greedily at step 0 and at
the end: ``eval/core/<env>/avg``.  Per run: the gain on the new behaviour (after - before), each core's change,
and forgetting per unit of gain, ``(before - after) / gain`` (positive = forgot).  Per method over seeds: the
ratio of the mean drop to the mean gain.  All runs share one start of the roles (``orchestrator.api.Session``:
each run begins from the base student with an adapter and optimizer drawn from its seed); the methods
alternate within each seed so that a change in the machine's load falls on both.

Writes ``results/forgetting_<date>.md`` and ``.json`` (``--out`` elsewhere), again after every run, so that
a run cut short keeps the finished ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_efficiency import finite_json  # noqa: E402  (strict JSON: non-finite floats as null)

EXPERIMENT = ROOT / "experiments" / "forgetting"
METHODS: dict[str, tuple[Path, ...]] = {"opd": (), "sft": (EXPERIMENT / "sft.toml",)}  # layers on opd.toml


# ------------------------------------------------------------------------------------------------
# Pure analysis: metrics.jsonl rows in, numbers out


@dataclass
class Run:
    """One run's evaluations at its first and last evaluated step."""

    method: str
    seed: int
    steps: int  # the last evaluated step
    new: tuple[float, float]  # the new behaviour, (before, after)
    cores: dict[str, tuple[float, float]]  # each core behaviour, (before, after)
    wall_s: float = 0.0
    load: str = ""  # the 1/5/15-minute load averages at the run's end
    teacher_new: float = math.nan  # the teacher's score on the new behaviour (eval_baseline), when measured
    # the teacher's (with its context) on each core behaviour (eval_baseline), when measured: what a student that
    # became the teacher would score there, so a drop down to it is the new behaviour itself, not forgetting
    teacher_cores: dict[str, float] = field(default_factory=dict)

    @property
    def gain(self) -> float:
        return self.new[1] - self.new[0]

    def change(self, core: str) -> float:
        """``core``'s after - before (negative = forgot)."""
        before, after = self.cores[core]
        return after - before

    def drop(self, core: str) -> float:
        """How much ``core`` fell (positive = forgot, negative = improved)."""
        before, after = self.cores[core]
        return before - after

    def forgetting_per_gain(self, core: str) -> float:
        """``drop / gain``; NaN when the run gained nothing (no gain to weigh the forgetting against)."""
        return self.drop(core) / self.gain if self.gain > 0 else math.nan


def run_from_rows(rows: list[dict[str, Any]], new_env: str, cores: Sequence[str], method: str, seed: int,
                  wall_s: float = 0.0, load: str = "") -> Run:
    """A :class:`Run` from a run's metrics.jsonl rows: the first and last rows that carry ``eval/<new_env>/avg``
    (the start and the end evaluations), each core's ``eval/core/<name>/avg`` from the same rows."""
    key = f"eval/{new_env}/avg"
    evals = sorted((r for r in rows if key in r), key=lambda r: r["step"])
    if len(evals) < 2:
        raise ValueError(f"metrics.jsonl: {key} at fewer than two steps (found {len(evals)}); did the run finish?")
    first, last = evals[0], evals[-1]
    missing = [c for c in cores if f"eval/core/{c}/avg" not in first or f"eval/core/{c}/avg" not in last]
    if missing:
        raise ValueError(f"metrics.jsonl: no eval/core/{missing[0]}/avg at steps {first['step']} and {last['step']} "
                         "(orchestrator.continual.core_environments)")
    teacher = next((r[f"eval/{new_env}/baseline_teacher/avg"] for r in rows
                    if f"eval/{new_env}/baseline_teacher/avg" in r), math.nan)
    teacher_cores = {c: r[f"eval/core/{c}/baseline_teacher/avg"] for r in rows for c in cores
                     if f"eval/core/{c}/baseline_teacher/avg" in r}
    return Run(method, seed, last["step"], (first[key], last[key]),
               {c: (first[f"eval/core/{c}/avg"], last[f"eval/core/{c}/avg"]) for c in cores}, wall_s, load, teacher,
               teacher_cores)


@dataclass
class MethodSummary:
    method: str
    seeds: list[int]
    gain: float  # mean over seeds
    change: dict[str, float] = field(default_factory=dict)  # per core: mean (after - before)
    forgetting_per_gain: dict[str, float] = field(default_factory=dict)  # per core: mean drop / mean gain
    forgetting_per_gain_all: float = math.nan  # the mean over cores of the above


def summarize(runs: Sequence[Run]) -> list[MethodSummary]:
    """Per method (in order of first appearance): mean gain, mean change of each core, and forgetting per unit
    of gain as the ratio of means (mean drop / mean gain; NaN when the mean gain is not positive)."""
    out = []
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        gain = statistics.fmean(r.gain for r in mine)
        cores = list(mine[0].cores)
        drop = {c: statistics.fmean(r.drop(c) for r in mine) for c in cores}
        change = {c: statistics.fmean(r.change(c) for r in mine) for c in cores}
        per_gain = {c: drop[c] / gain if gain > 0 else math.nan for c in cores}
        out.append(MethodSummary(method, [r.seed for r in mine], gain, change, per_gain,
                                 statistics.fmean(per_gain.values()) if cores else math.nan))
    return out


def ratio(summaries: Sequence[MethodSummary], num: str = "opd", den: str = "sft") -> float:
    """``num``'s forgetting per unit of gain over ``den``'s (mean over cores); NaN unless both are defined and
    ``den``'s is positive (no forgetting to compare against)."""
    by = {s.method: s.forgetting_per_gain_all for s in summaries}
    a, b = by.get(num, math.nan), by.get(den, math.nan)
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def _num(x: float, fmt: str = "{:+.3f}") -> str:
    return fmt.format(x) if math.isfinite(x) else "n/a"


def markdown(runs: Sequence[Run], meta: dict[str, Any]) -> str:
    cores = list(runs[0].cores) if runs else []
    summaries = summarize(runs)
    lines = [f"# Forgetting on a real model ({meta['date']})", "",
             f"Machine: {meta['machine']}; load average before / after: {meta['load_before']} / {meta['load_after']}; "
             f"wall time {meta['wall_s']:.0f} s; command: `{meta['command']}`.", "",
             f"{meta['setup']}", "",
             "| method | seed | steps | French before → after (gain) | "
             + " | ".join(f"{c} before → after (change)" for c in cores) + " | "
             + " | ".join(f"{c} forgetting / gain" for c in cores) + " | s/run | load at end |",
             "|---|---|---|---|" + "---|" * (2 * len(cores)) + "---|---|"]
    for r in runs:
        lines.append(f"| {r.method} | {r.seed} | {r.steps} | {r.new[0]:.3f} → {r.new[1]:.3f} ({r.gain:+.3f}) | "
                     + " | ".join(f"{r.cores[c][0]:.3f} → {r.cores[c][1]:.3f} ({r.change(c):+.3f})" for c in cores)
                     + " | " + " | ".join(_num(r.forgetting_per_gain(c)) for c in cores)
                     + f" | {_num(r.wall_s, '{:.0f}')} | {r.load} |")
    teacher = next((r.teacher_new for r in runs if math.isfinite(r.teacher_new)), math.nan)
    if math.isfinite(teacher):
        lines += ["", f"The teacher (the base model with its context) scores {teacher:.3f} on the new behaviour "
                      "(eval_baseline, the first run)."]
    teacher_cores = next((r.teacher_cores for r in runs if r.teacher_cores), {})
    if teacher_cores:
        lines += ["", "On the core behaviours the teacher, with its context, scores "
                  + ", ".join(f"{c} {v:.3f}" for c, v in teacher_cores.items())
                  + ": a student that became the teacher would score that, so a drop down to it is the new "
                    "behaviour itself rather than forgetting."]
    lines += ["", "Per method (means over seeds; forgetting / gain = mean drop / mean gain, positive = forgot):", "",
              "| method | seeds | French gain | " + " | ".join(f"{c} change" for c in cores) + " | "
              + " | ".join(f"{c} forgetting / gain" for c in cores) + " | mean forgetting / gain |",
              "|---|---|---|" + "---|" * (2 * len(cores)) + "---|"]
    for s in summaries:
        lines.append(f"| {s.method} | {', '.join(map(str, s.seeds))} | {s.gain:+.3f} | "
                     + " | ".join(f"{s.change[c]:+.3f}" for c in cores) + " | "
                     + " | ".join(_num(s.forgetting_per_gain[c]) for c in cores)
                     + f" | {_num(s.forgetting_per_gain_all)} |")
    r = ratio(summaries)
    lines += ["", f"OPD's forgetting per unit of gain / SFT's (mean over cores): {_num(r, '{:.2f}')} "
              "(the goal of issue 19: at most 0.5; n/a when SFT did not forget on average, or a method gained "
              "nothing)."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, runs: Sequence[Run], meta: dict[str, Any]) -> Path:
    """``forgetting_<date>[<suffix>].md`` and ``.json`` in ``out`` (each written whole, then renamed); the table's
    path."""
    from shared.fsutil import atomic_write_text

    stem = f"forgetting_{meta['date']}{meta.get('suffix', '')}"
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(runs)
    atomic_write_text(out / f"{stem}.json", json.dumps(finite_json({
        "meta": meta, "runs": [{**asdict(r), "gain": r.gain} for r in runs],
        "summary": [asdict(s) for s in summaries], "opd_over_sft": ratio(summaries)}), indent=1, allow_nan=False)
        + "\n")
    atomic_write_text(out / f"{stem}.md", markdown(runs, meta))
    return out / f"{stem}.md"


def finished_run(out_dir: Path, new_env: str, cores: Sequence[str], method: str, seed: int,
                 steps: int) -> Run | None:
    """The run already in ``out_dir`` if it finished ``steps`` steps (its end evaluation is in metrics.jsonl),
    read as :func:`run_from_rows` does (its wall time is not known again: NaN; its load: "earlier"); else None.
    So a benchmark stopped part-way (``--runs DIR`` again) keeps the runs it finished."""
    from shared.metrics import read_metrics

    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    try:
        r = run_from_rows(read_metrics(path), new_env, cores, method, seed, math.nan, "earlier")
    except ValueError:
        return None
    return r if r.steps == steps else None


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------
# The runs


def setup_text(cfg: Any) -> str:
    """One paragraph naming what every run shared (from the loaded config)."""
    oc, ar = cfg.orchestrator, cfg.orchestrator.env_args.arithmetic
    return (f"{cfg.model.name} with LoRA r{cfg.model.lora.rank}, lr {cfg.trainer.lr:g}; new behaviour "
            f"`{oc.environment}` (teacher context {json.dumps(oc.teacher_model.context)}); {oc.batch_size} prompts x "
            f"{oc.group_size} samples a step, so {oc.batch_size * oc.group_size} teacher samples (sft) or "
            f"teacher-scored student samples (opd) a step; sampling temperature {cfg.inference.temperature:g}, "
            f"max_tokens {cfg.inference.max_tokens}. Core behaviours ({', '.join(oc.continual.core_environments)}): "
            f"arithmetic {'/'.join(ar.operators)} on operands {ar.min_operand}..{ar.max_operand}, format_check rules "
            f"{'+'.join(oc.env_args.format_check.rules)}; replay_ratio {oc.continual.replay_ratio:g}, gate "
            f"{'on' if oc.continual.gate else 'off'}. Evaluations: {oc.eval.num_prompts} held-out prompts per "
            f"behaviour, temperature {oc.eval.temperature:g} (0 = greedy), at step 0 and at the end; one prompt "
            f"moves a score by {1 / oc.eval.num_prompts:.3f}.")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per run (default 8)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the results go")
    ap.add_argument("--runs", type=Path, default=None, help="where the runs' outputs go (default: a temporary dir)")
    ap.add_argument("--suffix", default="", help="appended to the result files' stem (e.g. _seed1)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                    help="methods to run, in this order within each seed (default: all)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps: must be at least 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from orchestrator.api import Session, load_config
    from shared.metrics import read_metrics

    cfg = load_config(EXPERIMENT / "opd.toml")
    cores = list(cfg.orchestrator.continual.core_environments)
    runs_dir = args.runs or Path(tempfile.mkdtemp(prefix="forgetting_"))
    t0, load_before, runs = time.perf_counter(), _load(), []
    meta = {"date": time.strftime("%Y-%m-%d"), "suffix": args.suffix,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, {cfg.model.dtype}",
            "command": " ".join(["python benchmarks/forgetting.py", *(argv if argv is not None else sys.argv[1:])]),
            "setup": setup_text(cfg), "steps": args.steps, "seeds": args.seeds, "load_before": load_before}
    md = None
    with Session(EXPERIMENT / "opd.toml", output_dir=str(runs_dir / "session"), max_steps=args.steps) as session:
        meta["startup_s"] = dict(session.startup)
        for seed in args.seeds:
            for method in args.methods:
                out_dir = runs_dir / f"{method}_s{seed}"
                r = finished_run(out_dir, cfg.orchestrator.environment, cores, method, seed, args.steps)
                if r is None:
                    if out_dir.exists():  # a run cut short (a crash, a kill): it starts again from nothing
                        print(f"{method} seed {seed}: {out_dir} holds no finished run; starting it again",
                              file=sys.stderr, flush=True)
                        shutil.rmtree(out_dir)
                    t1 = time.perf_counter()
                    # the teacher's baselines (new and core behaviours) once, in the first run that measures them
                    result = session.run(*METHODS[method], seed=seed, max_steps=args.steps, output_dir=str(out_dir),
                                         orchestrator={"eval_baseline": not any(x.teacher_cores for x in runs)})
                    rows = read_metrics(result.output_dir / "metrics.jsonl")
                    r = run_from_rows(rows, cfg.orchestrator.environment, cores, method, seed,
                                      time.perf_counter() - t1, _load())
                runs.append(r)
                print(f"{method} seed {seed}: French {r.new[0]:.3f} -> {r.new[1]:.3f}; "
                      + "; ".join(f"{c} {b:.3f} -> {a:.3f}" for c, (b, a) in r.cores.items())
                      + f" ({_num(r.wall_s, '{:.0f}')} s, load {r.load})", file=sys.stderr, flush=True)
                md = write_results(args.out, runs, {**meta, "load_after": _load(),
                                                    "wall_s": time.perf_counter() - t0})
    print(md.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
