"""The weight update from disk against from memory: ``trainer.weight_transfer = "filesystem"`` (rank 0 writes
``broadcast/step_N`` inside the training call, the engines read and merge it) against ``"memory"`` (the engines
merge rank 0's tensors, passed through Ray's object store; the file is written afterwards, while the next batch
is sampled).

    python benchmarks/weight_transfer.py [--pairs 3] [--steps 20] [--out benchmarks/results]

Each run is the tiny pair's synchronous job with the adapter merged (``rl @ experiments/reverse_text/rl.toml
--inference.lora_mode merge``, evaluation only at the start and end, W&B off). The two sides alternate within
each pair (filesystem first in even pairs), so load from other jobs hits both alike. Per run, the medians over
its steady steps (``profile_run.steady``) of ``time/step``, ``time/weight_update`` (the engines' load, as the
orchestrator waits for it) and ``time/adapter_save`` (inside the training call: gathering the adapter, and
with files writing it); the table gives each run and the ratios memory / filesystem of the per-pair values.
Every run must leave ``broadcast/step_N`` complete for every step (checked: the memory side writes them too).
Writes ``weight_transfer_<date>[tag].md`` and ``.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_run import loadavg, machine, output_args, ratio_stats, run_rl, step_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shared.metrics import read_metrics  # noqa: E402

SIDES = ("filesystem", "memory")
KEYS = (("time/step", "step (s)"), ("time/weight_update", "weight update (s)"),
        ("time/adapter_save", "adapter gathered / written in the training call (s)"))
JOB = ("@", "experiments/reverse_text/rl.toml", "--inference.lora_mode", "merge", "--wandb.mode", "disabled",
       "--orchestrator.eval.interval", "0", "--orchestrator.eval.num_prompts", "32")


def run_summary(rows: list[dict], steps: int) -> dict[str, float]:
    """The medians of :data:`KEYS` over a run's steady steps; a run that trained fewer steps is an error."""
    train = [r for r in rows if "time/step" in r and r.get("step", 0) > 0]
    if len(train) != steps:
        raise ValueError(f"the run trained {len(train)} steps, not {steps}")
    steady = step_rows(rows)
    return {key: statistics.median(r[key] for r in steady) for key, _ in KEYS}


def complete_adapters(run_dir: Path, steps: int) -> int:
    """How many of ``broadcast/step_1 .. step_<steps>`` carry the ``COMPLETE`` marker."""
    return sum((run_dir / "broadcast" / f"step_{s}" / "COMPLETE").exists() for s in range(1, steps + 1))


def markdown(command: str, runs: list[dict], ratios: dict[str, dict], steps: int) -> str:
    loads = [r["load"] for r in runs]
    lines = [f"`{command}` — {machine()}; load average (1 min) {min(loads):.1f}–{max(loads):.1f} at the runs' "
             f"starts.", "",
             f"The tiny pair's synchronous job, adapter merged, {steps} steps a run; medians over steps 3..{steps}. "
             "Ratios memory / filesystem of each pair's values (< 1: from memory is faster):", "",
             "| metric | min | median | max | pairs |", "|---|---|---|---|---|"]
    for key, label in KEYS:
        s = ratios[key]
        lines.append(f"| {label} | {s['min']:.2f} | {s['median']:.2f} | {s['max']:.2f} | {s['n']} |")
    header = " | ".join(label for _, label in KEYS)
    lines += ["", f"| pair | side | {header} | adapters on disk | run (s) | load |",
              "|---|---|" + "---|" * len(KEYS) + "---|---|---|"]
    for r in runs:
        cells = " | ".join(f"{r[key] * 1000:.0f} ms" for key, _ in KEYS)
        lines.append(f"| {r['pair']} | {r['side']} | {cells} | {r['adapters']}/{steps} | {r['run_s']:.0f} | "
                     f"{r['load']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3, help="pairs of runs (default 3)")
    ap.add_argument("--steps", type=int, default=20, help="steps per run (default 20)")
    ap.add_argument("--tag", default="", help="suffix of the results' file names (a second run on one date)")
    output_args(ap, "weight_transfer")
    args = ap.parse_args(argv)
    runs = []
    t0 = time.monotonic()
    for pair in range(args.pairs):
        for side in (SIDES if pair % 2 == 0 else SIDES[::-1]):
            load = loadavg()
            print(f"[{time.monotonic() - t0:5.0f} s] pair {pair + 1}/{args.pairs}: {side} (load {load:.1f})",
                  flush=True)
            out = args.work / f"{side}_p{pair}"
            seconds = run_rl(out, *JOB, "--max_steps", str(args.steps), "--seed", str(pair),
                             "--trainer.weight_transfer", side)
            runs.append({"pair": pair, "side": side, "load": load, "run_s": seconds,
                         "adapters": complete_adapters(out, args.steps),
                         **run_summary(read_metrics(out / "metrics.jsonl"), args.steps)})
    missing = [f"{r['side']} pair {r['pair']}" for r in runs if r["adapters"] != args.steps]
    if missing:
        raise SystemExit(f"error: broadcast/step_N incomplete after {', '.join(missing)}")
    by = {(r["pair"], r["side"]): r for r in runs}
    ratios = {key: ratio_stats([by[(p, "memory")][key] / by[(p, "filesystem")][key] for p in range(args.pairs)])
              for key, _ in KEYS}
    command = "python benchmarks/weight_transfer.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    stem = f"weight_transfer_{time.strftime('%Y-%m-%d', time.gmtime())}{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text("# Weight update: from disk against from memory\n\n"
                                         + markdown(command, runs, ratios, args.steps))
    (args.out / f"{stem}.json").write_text(json.dumps({"command": command, "runs": runs, "ratios": ratios},
                                                      indent=1))
    print(f"wrote {args.out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
