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
    rows = read_metrics(run / "metrics.jsonl")  # skips a torn last line of a killed run
    steps = [r for r in rows if "time/step" in r and r.get("step", 0) > 0]
    if len(steps) > 4:
        steps = steps[2:]
    start = next((r for r in rows if "time/startup_inference" in r), {})
    out: dict = {"run": run.name, "steps": len(steps)}
    for role in ROLES:
        out[f"startup_{role}_s"] = start.get(f"time/startup_{role}", float("nan"))
    if not steps:
        return out
    step_s = statistics.fmean(r["time/step"] for r in steps)
    tokens = statistics.fmean(r.get("tokens/step", 0.0) for r in steps)
    out["step_s"] = step_s
    out["tokens_per_step"] = tokens
    total_busy = 0.0
    for role in ROLES:
        busy = statistics.fmean(r.get(f"time/{role}", 0.0) for r in steps)
        total_busy += busy
        out[f"{role}_s"] = busy
        out[f"{role}_tok_s"] = tokens / busy if busy else float("nan")
        out[f"{role}_busy"] = busy / step_s
    out["weight_update_s"] = statistics.fmean(r.get("time/weight_update", 0.0) for r in steps)
    out["ideal_overlap_s"] = max(out[f"{role}_s"] for role in ROLES)
    out["no_overlap_s"] = total_busy
    out["slowest_role"] = max(ROLES, key=lambda role: out[f"{role}_s"])
    return out


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
    import os

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
        cmd = [str(Path(sys.executable).parent / "rl"), "@", args.run, "--output_dir", str(out_dir), *extra]
        print("running:", " ".join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            print(f"error: the run failed; see {out_dir}/logs", file=sys.stderr)
            return 1
        runs.append(out_dir)
    missing = [r for r in runs if not (r / "metrics.jsonl").is_file()]
    if not runs or missing:
        print(f"error: no metrics.jsonl in {', '.join(map(str, missing)) or 'any run given'}", file=sys.stderr)
        return 2
    table = markdown([profile(r) for r in runs])
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
