"""Where the time of a run goes: start-up, per-role throughput and busy fractions, from its metrics.

    python benchmarks/profile_run.py RUN_DIR [RUN_DIR ...] [--out benchmarks/results/profile.md]
    python benchmarks/profile_run.py --run experiments/context_distill/rl.toml [-- extra rl overrides]

``--run`` first runs the experiment (``rl @ TOML --output_dir benchmarks/results/<name>``) and then
profiles it. Everything is read from ``metrics.jsonl``; per-role throughput counts the completion tokens
of each step (the teacher also reads the prompts, so its figure is a lower bound of what it processes).
Steps 1..2 are left out of the step averages when a run has more than 4 (warm-up: first adapter load,
allocator growth).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared.metrics import read_metrics  # noqa: E402

ROLES = ("inference", "teacher", "trainer")


def profile(run: Path) -> dict:
    """:func:`summarize` of a run directory's ``metrics.jsonl`` (a torn last line of a killed run is skipped)."""
    return summarize(read_metrics(run / "metrics.jsonl"), run.name)


def step_rows(rows: list[dict]) -> list[dict]:
    """The :func:`steady` training steps of a run's rows (evaluation rows carry no ``time/step``)."""
    return steady([r for r in rows if "time/step" in r and r.get("step", 0) > 0])


def steady(steps: list) -> list:
    """The steps that count for averages: all of them, less steps 1..2 (warm-up) when there are more than 4."""
    return steps[2:] if len(steps) > 4 else steps


def overlap(step_s: float, role_s: dict[str, float]) -> dict[str, float]:
    """A step's time against perfect overlap (``max`` of the role times) and none (their ``sum``).

    ``realised`` is the fraction of the possible saving achieved: ``(sum - step) / (sum - max)`` (1 = the
    step took only as long as its slowest role, 0 = as long as all roles one after another; it can leave
    [0, 1] when the step also holds work outside the roles, e.g. loading the adapter, or roles slow each
    other down). NaN when there is nothing to save (a single busy role).
    """
    ideal, total = max(role_s.values()), sum(role_s.values())
    return {"ideal_overlap_s": ideal, "no_overlap_s": total,
            "step_over_ideal": step_s / ideal if ideal else float("nan"),
            "step_over_sum": step_s / total if total else float("nan"),
            "overlap_realised": (total - step_s) / (total - ideal) if total > ideal else float("nan")}


def summarize(rows: list[dict], name: str = "run") -> dict:
    """Start-up, per-role busy seconds, tokens/s and busy fractions, and the overlap figures of a run's rows.

    Step rows are those with ``time/step`` and ``step > 0`` (evaluation rows carry no ``time/step``);
    averages are over :func:`steady` steps. A role's tokens/s is the step's completion tokens over the
    role's busy seconds; its busy fraction is its busy seconds over the step time.
    """
    steps = step_rows(rows)
    start = next((r for r in rows if "time/startup_inference" in r), {})
    out: dict = {"run": name, "steps": len(steps)}
    for role in ROLES:
        out[f"startup_{role}_s"] = start.get(f"time/startup_{role}", float("nan"))
    if not steps:
        return out
    step_s = statistics.fmean(r["time/step"] for r in steps)
    tokens = statistics.fmean(r.get("tokens/step", 0.0) for r in steps)
    out["step_s"] = step_s
    out["tokens_per_step"] = tokens
    for role in ROLES:
        busy = statistics.fmean(r.get(f"time/{role}", 0.0) for r in steps)
        out[f"{role}_s"] = busy
        out[f"{role}_tok_s"] = tokens / busy if busy else float("nan")
        out[f"{role}_busy"] = busy / step_s
    out["weight_update_s"] = statistics.fmean(r.get("time/weight_update", 0.0) for r in steps)
    out["overlap_s"] = statistics.fmean(r.get("time/overlap", 0.0) for r in steps)
    out.update(overlap(step_s, {role: out[f"{role}_s"] for role in ROLES}))
    out["slowest_role"] = max(ROLES, key=lambda role: out[f"{role}_s"])
    return out


# Where a synchronous step's time goes (orchestrator.max_async_level = 0: the stages run one after another).
# Each stage's time/<role> is split into what happens inside the role (the engine's own seconds, logged by the
# engines; the trainer's forward/backward/optimizer and its adapter write) and the rest of that stage: Ray's
# calls, (de)serialization of the batch, and the orchestrator's own work before the call (rendering, advantages).
BREAKDOWN = (
    ("sampling: vLLM (student engine, incl. an adapter's first load)", "time/inference_engine", None),
    ("sampling: Ray call, (de)serialization, orchestrator", "time/inference", "time/inference_engine"),
    ("scoring: vLLM prompt_logprobs (teacher engine)", "time/teacher_engine", None),
    ("scoring: Ray call, (de)serialization, orchestrator", "time/teacher", "time/teacher_engine"),
    ("training: forward, backward, optimizer", "time/trainer_compute", None),
    ("training: adapter gathered (and written to broadcast/step_N unless sent from memory)", "time/adapter_save",
     None),
    ("training: samples built, Ray call, (de)serialization", "time/trainer", ("time/trainer_compute", "time/adapter_save")),
    ("weight update: the engines told to serve the new adapter", "time/weight_update", None),
)


def breakdown(rows: list[dict]) -> list[tuple[str, float]]:
    """(component, mean seconds per step) over :func:`steady` synchronous steps, plus ``rest of the step`` (what
    time/step holds beyond its stages) and ``step``: the parts add up to the step. Empty when the run has no
    engine timings (older runs) or ran asynchronously (its stages overlap: no sum to split)."""
    steps = step_rows(rows)
    if not steps or any("time/inference_engine" not in r or r.get("time/overlap", 0.0) > 0 for r in steps):
        return []

    def part(r: dict, key: str, minus) -> float:
        subtract = (minus,) if isinstance(minus, str) else (minus or ())
        return r.get(key, 0.0) - sum(r.get(k, 0.0) for k in subtract)

    out = [(label, statistics.fmean(part(r, key, minus) for r in steps)) for label, key, minus in BREAKDOWN]
    stages = ("time/inference", "time/teacher", "time/trainer", "time/weight_update")
    out.append(("rest of the step (orchestrator: metrics, stale checks)",
                statistics.fmean(r["time/step"] - sum(r.get(k, 0.0) for k in stages) for r in steps)))
    out.append(("step", statistics.fmean(r["time/step"] for r in steps)))
    return out


def breakdown_markdown(parts: list[tuple[str, float]]) -> str:
    step = parts[-1][1]
    lines = ["| where the time goes | ms per step | share |", "|---|---|---|"]
    for label, seconds in parts:
        bold = "**" if label == "step" else ""
        lines.append(f"| {bold}{label}{bold} | {bold}{1000 * seconds:.0f}{bold} | {100 * seconds / step:.0f}% |")
    return "\n".join(lines) + "\n"


def rl_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """The ``rl`` command line of this checkout (``python -m orchestrator.cli``, so the code next to this
    script runs, not an installed copy) and its environment."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    return [sys.executable, "-m", "orchestrator.cli", *args], env


def run_rl(out_dir: Path, *args: str) -> float:
    """``rl *args --output_dir out_dir`` from the repository root (an old ``out_dir`` is removed first); its
    wall seconds. A failed run raises RuntimeError with its last line of stderr."""
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    cmd, env = rl_command(*args, "--output_dir", str(out_dir))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"rl {' '.join(args)}: exit {proc.returncode}: {tail} (logs in {out_dir}/logs)")
    return time.monotonic() - t0


def output_args(ap: argparse.ArgumentParser, name: str) -> None:
    """``--out`` (the committed results) and ``--work`` (the runs' own output folders) of a benchmark."""
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the .md/.png/.json")
    ap.add_argument("--work", type=Path, default=Path(f"outputs/bench_{name}"), help="folder for the run outputs")


def write_results(out: Path, stem: str, title: str, text: str, data: dict, fig) -> Path:
    """``out/stem.md`` (``# title`` then ``text``), ``.json`` (``data``) and ``.png`` (the matplotlib ``fig``)."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(f"# {title}\n\n{text}")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=list))
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=100)
    plt.close(fig)
    return out / stem


def ratio_stats(ratios: list[float]) -> dict[str, float]:
    """``min``/``median``/``max`` of paired ratios; each must be positive and finite (a ValueError names the
    first that is not: a ratio of a failed or empty measurement must not slip into a table)."""
    if not ratios:
        raise ValueError("no ratios")
    for i, r in enumerate(ratios):
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise ValueError(f"ratio {i} is {r!r}, not a positive finite number")
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios), "n": len(ratios)}


def machine() -> str:
    """One line: date (UTC), architecture, usable cores, memory, GPU (none here)."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {platform.machine()}, {_cores()} cores, "
            f"{mem:.0f} GiB, no GPU, Python {platform.python_version()}")


def loadavg() -> float:
    """The 1-minute load average (``uptime``'s first figure)."""
    return os.getloadavg()[0]


def markdown(profiles: list[dict]) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {_cores()} cores, Python "
        f"{platform.python_version()}.",
        "",
        "| run | steps | engine start student / teacher (s) | trainer setup (s) | step (s) | completion tokens/step "
        "| student sampling tok/s | teacher scoring tok/s | trainer tok/s | busy: student / teacher / trainer "
        "| ideal overlap (s) | slowest role |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        if "step_s" not in p:
            lines.append(f"| {p['run']} | 0 | | | | | | | | | | |")
            continue
        lines.append(
            f"| {p['run']} | {p['steps']} | {p['startup_inference_s']:.0f} / {p['startup_teacher_s']:.0f} "
            f"| {p['startup_trainer_s']:.0f} | {p['step_s']:.2f} | {p['tokens_per_step']:.0f} "
            f"| {p['inference_tok_s']:.0f} | {p['teacher_tok_s']:.0f} | {p['trainer_tok_s']:.0f} "
            f"| {p['inference_busy']:.2f} / {p['teacher_busy']:.2f} / {p['trainer_busy']:.2f} "
            f"| {p['ideal_overlap_s']:.2f} | {p['slowest_role']} |"
        )
    return "\n".join(lines) + "\n"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run directories (output_dir of finished runs)")
    ap.add_argument("--run", help="run this experiment TOML first, then profile it")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    args, extra = ap.parse_known_args(argv)
    runs = list(args.runs)
    if args.run:
        out_dir = Path("benchmarks/results") / Path(args.run).parent.name
        cmd, env = rl_command("@", args.run, "--output_dir", str(out_dir), *extra)
        print("running:", " ".join(cmd), flush=True)
        if subprocess.call(cmd, env=env) != 0:
            print(f"error: the run failed; see {out_dir}/logs", file=sys.stderr)
            return 1
        runs.append(out_dir)
    missing = [r for r in runs if not (r / "metrics.jsonl").is_file()]
    if not runs or missing:
        print(f"error: no metrics.jsonl in {', '.join(map(str, missing)) or 'any run given'}", file=sys.stderr)
        return 2
    table = markdown([profile(r) for r in runs])
    for r in runs:  # a synchronous run's step, split into its parts
        rows = read_metrics(r / "metrics.jsonl")
        parts = breakdown(rows)
        if parts:
            table += (f"\n{r.name}: where a synchronous step's time goes (mean over {len(step_rows(rows))} "
                      f"steps)\n\n{breakdown_markdown(parts)}")
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
