"""Throughput and overlap: tokens/s and busy fraction of each role, with max_async_level 0 and 1, alternated.

    python benchmarks/throughput.py            # tiny pair + SmolLM2 (~12 min on 2 quiet cores)
    python benchmarks/throughput.py --quick    # tiny pair, 2 steps per run: checks the results are well-formed

Each setup starts its roles once (``orchestrator.api.Session`` on its TOML, with the overrides below that keep
it short) and runs it with ``orchestrator.max_async_level`` K = 0 and K = 1 alternated (0, 1, 1, 0, ...), so a
load that drifts during the benchmark lands on both and the engines' start-up is paid once per setup (each run
still starts from the base student with a fresh adapter and optimizer). Every
figure comes from the run's ``metrics.jsonl`` through ``profile_run.summarize``: per-role busy seconds per
step, completion tokens per busy second, busy fractions, and the step time against the ideal of perfect
overlap (``max`` of the role times) and no overlap (their ``sum``). The load average is recorded before and
after every run. Writes ``throughput_<date>.md``, ``.png`` and ``.json`` into ``--out`` (default
``benchmarks/results``); the run folders (and each session's actor logs) go to ``--work`` (default
``outputs/bench_throughput``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_run  # noqa: E402
from profile_run import (ROLES, loadavg, machine, output_args, ratio_stats, summarize,  # noqa: E402
                         write_results)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from shared.metrics import read_metrics  # noqa: E402


@dataclass(frozen=True)
class Setup:
    name: str
    toml: str
    overrides: dict  # dotted keys, as orchestrator.api takes them
    rounds: int  # pairs of runs (one with K = 0, one with K = 1)


COMMON = {"wandb.mode": "disabled", "orchestrator.eval.interval": 0}
FULL = (
    Setup("tiny pair (reverse_text, 32 x 4 per step, 30 steps)", "experiments/reverse_text/rl.toml",
          {"max_steps": 30, "orchestrator.eval.num_prompts": 16}, rounds=1),
    # 2 prompts x 4 answers instead of 8 x 4, 5 steps, no baseline evaluation: one run at a time (~11 GB)
    Setup("SmolLM2-135M (context_distill, 2 x 4 per step, 5 steps)", "experiments/context_distill/rl.toml",
          {"max_steps": 5, "orchestrator.batch_size": 2, "orchestrator.eval_baseline": False,
           "orchestrator.eval.num_prompts": 4}, rounds=1),
)
QUICK = (
    Setup("tiny pair (reverse_text, 8 x 4 per step, 2 steps)", "experiments/reverse_text/rl.toml",
          {"max_steps": 2, "orchestrator.batch_size": 8, "orchestrator.eval.num_prompts": 4}, rounds=1),
)


def schedule(rounds: int) -> list[int]:
    """The K of each run: 0, 1, 1, 0, 0, 1, ... (each pair reversed after the last, so neither K always goes first)."""
    return [k for r in range(rounds) for k in ((0, 1) if r % 2 == 0 else (1, 0))]


def run_setup(setup: Setup, work: Path, t0: float) -> tuple[list[dict], dict[str, float]]:
    """The runs of ``setup`` (K as :func:`schedule` orders them) on one start of its roles; (each run's summary
    with its wall time and the load average before and after, the roles' start-up seconds)."""
    import shutil

    from orchestrator.api import Session

    name = Path(setup.toml).parent.name
    work = work.resolve()
    shutil.rmtree(work / f"{name}_session", ignore_errors=True)
    runs = []
    with Session(REPO / setup.toml, overrides={**setup.overrides, **COMMON},
                 output_dir=str(work / f"{name}_session")) as session:
        for i, k in enumerate(schedule(setup.rounds)):
            print(f"[{time.monotonic() - t0:5.0f} s] {setup.name}: K = {k} (load {loadavg():.1f})", flush=True)
            out_dir = work / f"{name}_k{k}_{i}"
            shutil.rmtree(out_dir, ignore_errors=True)
            load_before, start = loadavg(), time.monotonic()
            session.run(overrides={"orchestrator.max_async_level": k}, output_dir=str(out_dir))
            wall = time.monotonic() - start
            s = summarize(read_metrics(out_dir / "metrics.jsonl"), out_dir.name)
            if not s.get("step_s"):
                raise RuntimeError(f"{out_dir}: no step rows in metrics.jsonl")
            runs.append({**s, "setup": setup.name, "k": k, "wall_s": wall, "load_before": load_before,
                         "load_after": loadavg()})
        startup = dict(session.startup)
    return runs, startup


def aggregate(runs: list[dict]) -> dict:
    """The runs of one (setup, K): means of their per-run figures, overlap recomputed from the mean times."""
    keys = ["step_s", "tokens_per_step", "weight_update_s", "overlap_s", "wall_s",
            *(f"{r}_{x}" for r in ROLES for x in ("s", "tok_s", "busy"))]
    out = {key: statistics.fmean(r[key] for r in runs) for key in keys}
    out.update(profile_run.overlap(out["step_s"], {role: out[f"{role}_s"] for role in ROLES}))
    out["setup"], out["k"], out["runs"] = runs[0]["setup"], runs[0]["k"], len(runs)
    out["steps"] = sum(r["steps"] for r in runs)
    out["load"] = (min(min(r["load_before"], r["load_after"]) for r in runs),
                   max(max(r["load_before"], r["load_after"]) for r in runs))
    return out


def paired_speedups(runs: list[dict]) -> dict[str, list[float]]:
    """Per setup, step time K=0 over K=1 within each consecutive pair of runs (> 1: overlapping was faster)."""
    out: dict[str, list[float]] = {}
    by_setup: dict[str, list[dict]] = {}
    for r in runs:
        by_setup.setdefault(r["setup"], []).append(r)
    for name, rs in by_setup.items():
        for a, b in zip(rs[::2], rs[1::2]):
            k0, k1 = (a, b) if a["k"] == 0 else (b, a)
            out.setdefault(name, []).append(k0["step_s"] / k1["step_s"])
    return out


def markdown(rows: list[dict], speedups: dict[str, list[float]], command: str,
             startup: dict[str, dict[str, float]] | None = None) -> str:
    starts = "; ".join(f"{name}: " + " / ".join(f"{v:.0f} s" for v in times.values())
                       for name, times in (startup or {}).items())
    lines = [
        f"`{command}` — {machine()}; load average (1 min) {_load_span(rows)} over the runs.",
        *([f"One start of the roles per setup (student / teacher / trainer start-up): {starts}."] if starts else []),
        "",
        "| setup | K | runs × steps | step (s) | ideal max (s) | sum (s) | step / ideal | step / sum "
        "| overlap realised "
        "| student sampling tok/s | teacher scoring tok/s | trainer tok/s | busy: student / teacher / trainer "
        "| roles overlapping (s/step) | adapter load (s/step) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in rows:
        lines.append(
            f"| {a['setup']} | {a['k']} | {a['runs']} × {a['steps'] // a['runs']} | {a['step_s']:.3f} "
            f"| {a['ideal_overlap_s']:.3f} | {a['no_overlap_s']:.3f} | {a['step_over_ideal']:.2f} "
            f"| {a['step_over_sum']:.2f} | {_fmt(a['overlap_realised'])} | {a['inference_tok_s']:.0f} "
            f"| {a['teacher_tok_s']:.0f} | {a['trainer_tok_s']:.0f} "
            f"| {a['inference_busy']:.2f} / {a['teacher_busy']:.2f} / {a['trainer_busy']:.2f} "
            f"| {a['overlap_s']:.3f} | {a['weight_update_s']:.3f} | {a['load'][0]:.1f}–{a['load'][1]:.1f} |"
        )
    lines += ["", "| setup | pairs | step time K=0 / K=1: min | median | max |", "|---|---|---|---|---|"]
    for name, ratios in speedups.items():
        st = ratio_stats(ratios)
        lines.append(f"| {name} | {st['n']} | {st['min']:.2f} | {st['median']:.2f} | {st['max']:.2f} |")
    return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def _load_span(rows: list[dict]) -> str:
    return f"{min(r['load'][0] for r in rows):.1f}–{max(r['load'][1] for r in rows):.1f}"


def plot(rows: list[dict]):
    """Per setup: each role's busy seconds stacked (their sum: no overlap) beside the measured step time, with
    the ideal (the slowest role) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(r["setup"] for r in rows))
    fig, axes = plt.subplots(1, len(setups), figsize=(5.5 * len(setups), 4), squeeze=False)
    for ax, name in zip(axes[0], setups):
        rs = [r for r in rows if r["setup"] == name]
        xs = range(len(rs))
        bottom = [0.0] * len(rs)
        for role, colour in zip(ROLES, ("tab:blue", "tab:orange", "tab:green")):
            vals = [r[f"{role}_s"] for r in rs]
            ax.bar([x - 0.2 for x in xs], vals, 0.35, bottom=bottom, color=colour, label=f"{role} busy")
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.bar([x + 0.2 for x in xs], [r["step_s"] for r in rs], 0.35, color="0.3", label="step (measured)")
        ax.scatter([x + 0.2 for x in xs], [r["ideal_overlap_s"] for r in rs], marker="_", s=900, color="red",
                   zorder=3, label="ideal = max(role)")
        ax.set_xticks(list(xs), [f"K = {r['k']}" for r in rs])
        ax.set_ylabel("seconds per step")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny pair only, 2 steps per run, one pair of runs")
    ap.add_argument("--rounds", type=int, help="pairs of runs (K = 0 and 1) per setup (default 1)")
    ap.add_argument("--only", choices=("tiny", "smollm2"), help="run only this setup of the full benchmark")
    output_args(ap, "throughput")
    args = ap.parse_args(argv)
    setups = QUICK if args.quick else FULL
    if args.only:
        setups = tuple(s for s in setups if s.name.lower().startswith(args.only[:4]))
    if args.rounds:
        setups = tuple(Setup(s.name, s.toml, s.overrides, args.rounds) for s in setups)
    from orchestrator.orchestrator import RoleFailure
    from shared.config import ConfigError

    t0 = time.monotonic()
    runs, startup = [], {}
    for setup in setups:
        try:
            setup_runs, startup[setup.name] = run_setup(setup, args.work, t0)
        except (RuntimeError, ConfigError, RoleFailure) as e:
            print(f"error: {setup.name}: {e}", file=sys.stderr)
            return 1
        runs += setup_runs
    rows = [aggregate([r for r in runs if r["setup"] == s.name and r["k"] == k]) for s in setups for k in (0, 1)]
    flags = [f for f, on in (("--quick", args.quick), (f"--only {args.only}", args.only),
                              (f"--rounds {args.rounds}", args.rounds)) if on]
    command = " ".join(["python benchmarks/throughput.py", *flags])
    table = markdown(rows, paired_speedups(runs), command, startup)
    suffix = "_quick" if args.quick else f"_{args.only}" if args.only else ""
    stem = f"throughput_{time.strftime('%Y-%m-%d')}{suffix}"
    path = write_results(args.out, stem, "Throughput and overlap", table, {"runs": runs, "rows": rows, "startup_s": startup},
                         plot(rows))
    print(table)
    print(f"wrote {path}.md/.png/.json in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
