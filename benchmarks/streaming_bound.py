"""What streaming within a synchronous step could save at best: each role's call timed on the whole batch and
on its halves and quarters, and the fastest chunked step those times allow.

    python benchmarks/streaming_bound.py                   # tiny pair (~1.5 min on 2 quiet cores)
    python benchmarks/streaming_bound.py --setup smollm2   # the main job's model (~6.5 min)
    python benchmarks/streaming_bound.py --quick           # 2 runs of 2 steps: checks the results are well-formed

Streaming a synchronous step cuts its batch of B sequences into c chunks: the student samples chunk 1; the
teacher scores chunk 1 while the student samples chunk 2; the trainer runs forward and backward on chunk 1
while chunk 2 is scored, and so on; AdamW steps once, after the last chunk. Its best case is a flow shop of
three machines and c identical jobs: with the stage times of one chunk (``s``, ``t``, ``r``: each role's call on
B/c sequences, Ray and serialization included, measured here by running the job with ``batch_size / c``) a
step takes at least ``s + t + r + (c - 1) * max(s, t, r)``, plus what a step does once whatever c is (the
optimizer, the adapter's gathering, the weight update and the orchestrator's own work, measured at c = 1;
the chunk's trainer time is taken without its optimizer). The bound is optimistic: it lets the three roles
run side by side without slowing each other, where 2 cores share three processes, and it charges no cost for
cutting the batch (more calls, an engine's batch refilled mid-flight). If even this bound is not below the
measured step at c = 1, streaming cannot make the synchronous step faster on these cores.

All runs share one start of the roles (``orchestrator.api.Session``), synchronous (``max_async_level = 0``),
adapter merged; each round runs c = 1, 2, 4 in an order that alternates between rounds, so load from other
jobs lands on every c alike. Per run, means over its steady steps (``profile_run.steady``); the ratios
bound / measured step are taken within a round and summarised as median (min–max) over rounds. Writes
``streaming_bound_<date>_<setup>[tag].md``, ``.json`` and ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_run import loadavg, machine, output_args, ratio_stats, step_rows, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from shared.metrics import read_metrics  # noqa: E402


class Setup(NamedTuple):
    label: str
    toml: str
    batch_size: int  # prompts per step at c = 1 (each sampled group_size times)
    group_size: int
    steps: int
    overrides: dict  # dotted keys on top of COMMON


COMMON = {"wandb.mode": "disabled", "orchestrator.eval.interval": 0, "orchestrator.eval_baseline": False,
          "orchestrator.max_async_level": 0, "inference.lora_mode": "merge"}
SETUPS = {
    "tiny": Setup("tiny pair (reverse_text, 32 prompts x 4 samples x 12 tokens)", "experiments/reverse_text/rl.toml",
                  32, 4, 14, {"orchestrator.eval.num_prompts": 16}),
    # vs_trl.py's SmolLM2 setup: 8 prompts x 32 new tokens, one answer each
    "smollm2": Setup("SmolLM2-135M (context_distill, 8 prompts x 1 sample x 32 tokens)",
                     "experiments/context_distill/rl.toml", 8, 1, 7,
                     {"inference.max_tokens": 32, "orchestrator.eval.num_prompts": 4}),
}
QUICK = Setup("tiny pair, quick (8 prompts x 4 samples)", "experiments/reverse_text/rl.toml", 8, 4, 2,
              {"orchestrator.eval.num_prompts": 4})
STAGES = ("inference", "teacher", "trainer")


def chunk_counts(setup: Setup, quick: bool) -> tuple[int, ...]:
    """The chunk counts c timed: 1, 2, 4 (1, 2 with --quick), each dividing the batch."""
    counts = (1, 2) if quick else (1, 2, 4)
    bad = [c for c in counts if setup.batch_size % c]
    if bad:
        raise ValueError(f"batch_size {setup.batch_size} does not split into {bad[0]} chunks")
    return counts


def order(counts: tuple[int, ...], round_: int) -> tuple[int, ...]:
    """The order of the chunk counts in a round: as given in even rounds, reversed in odd ones."""
    return counts if round_ % 2 == 0 else counts[::-1]


def stage_times(rows: list[dict]) -> dict[str, float]:
    """Means over a run's steady steps (seconds per step): ``s``, ``t``, ``r`` (each role's call; the trainer's
    without its optimizer and adapter work, which a chunked step does once), ``once`` (the optimizer, the
    adapter's gathering, the weight update and the rest of the step: what a step does whatever c is) and
    ``step``. A row without the timings of a synchronous step is a ValueError."""
    steps = step_rows(rows)
    if not steps:
        raise ValueError("no training steps in the run's metrics")
    need = ("time/step", "time/inference", "time/teacher", "time/trainer", "time/weight_update",
            "time/trainer_update", "time/adapter_save")
    for r in steps:
        missing = [k for k in need if k not in r]
        if missing:
            raise ValueError(f"step {r.get('step')}: no {missing[0]} in metrics.jsonl")
        if r.get("time/overlap", 0.0) > 0:
            raise ValueError(f"step {r.get('step')}: the roles overlapped (not a synchronous run)")

    def mean(f) -> float:
        return statistics.fmean(f(r) for r in steps)

    own = ("time/trainer_update", "time/adapter_save")
    return {
        "s": mean(lambda r: r["time/inference"]),
        "t": mean(lambda r: r["time/teacher"]),
        "r": mean(lambda r: r["time/trainer"] - sum(r[k] for k in own)),
        "once": mean(lambda r: r["time/step"] - r["time/inference"] - r["time/teacher"] - r["time/trainer"]
                     + sum(r[k] for k in own)),
        "step": mean(lambda r: r["time/step"]),
    }


def bound(chunk: dict[str, float], whole: dict[str, float], c: int) -> float:
    """The fastest step c chunks allow: the flow-shop makespan of c chunks with ``chunk``'s stage times, plus
    what the step does once (``whole``'s, measured at c = 1)."""
    stages = [chunk["s"], chunk["t"], chunk["r"]]
    return sum(stages) + (c - 1) * max(stages) + whole["once"]


def summarise(runs: list[dict], counts: tuple[int, ...]) -> dict[int, dict]:
    """Per c: the stage times (means over rounds), each stage's time against c = 1 in the same round, and the
    ratio bound / measured step at c = 1 within each round (``ratio_stats``)."""
    rounds = sorted({r["round"] for r in runs})
    by = {(r["round"], r["c"]): r for r in runs}
    out = {}
    for c in counts:
        mine = [by[(k, c)] for k in rounds]
        row = {key: statistics.fmean(r[key] for r in mine) for key in ("s", "t", "r", "once", "step")}
        row["scale"] = {key: ratio_stats([by[(k, c)][key] / by[(k, 1)][key] for k in rounds]) for key in "str"}
        row["bound"] = statistics.fmean(bound(by[(k, c)], by[(k, 1)], c) for k in rounds)
        row["ratio"] = ratio_stats([bound(by[(k, c)], by[(k, 1)], c) / by[(k, 1)]["step"] for k in rounds])
        out[c] = row
    return out


def markdown(command: str, setup: Setup, runs: list[dict], table: dict[int, dict]) -> str:
    loads = [x for r in runs for x in (r["load_before"], r["load_after"])]
    rounds = len({r["round"] for r in runs})
    ms = lambda x: f"{1000 * x:.0f}"  # noqa: E731
    band = lambda st: f"{st['median']:.2f} ({st['min']:.2f}–{st['max']:.2f})"  # noqa: E731
    lines = [f"`{command}` — {machine()}; load average (1 min) {min(loads):.1f}–{max(loads):.1f} over the runs.",
             "", f"{setup.label}, synchronous, adapter merged; {rounds} round(s) of c = "
             f"{', '.join(map(str, table))}, {setup.steps} steps a run, means over "
             f"{f'steps 3..{setup.steps}' if setup.steps > 4 else 'all its steps'}. One chunk of c is the job run with "
             f"`orchestrator.batch_size = {setup.batch_size} / c`.", "",
             "| c | sequences per chunk | sampling s (ms) | scoring t (ms) | training r, no optimizer (ms) "
             "| once per step (ms) | measured step (ms) | s / s at c=1 | t / t at c=1 | r / r at c=1 "
             "| best chunked step (ms) | best / measured at c=1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, row in table.items():
        lines.append(f"| {c} | {setup.batch_size * setup.group_size // c} | {ms(row['s'])} | {ms(row['t'])} | "
                     f"{ms(row['r'])} | {ms(row['once'])} | {ms(row['step'])} | {band(row['scale']['s'])} | "
                     f"{band(row['scale']['t'])} | {band(row['scale']['r'])} | {ms(row['bound'])} | "
                     f"**{band(row['ratio'])}** |")
    best = min((c for c in table if c > 1), key=lambda c: table[c]["ratio"]["median"], default=None)
    lines += ["", "Ratios are medians (min–max) of per-round values. \"best chunked step\": the flow-shop bound "
              "of the module docstring (optimistic: roles never slow each other, cutting costs nothing)."]
    if best is not None:
        r = table[best]["ratio"]["median"]
        verdict = ("streaming cannot make a synchronous step faster here" if r >= 1.0 else
                   f"streaming could at best take {100 * (1 - r):.0f}% off a synchronous step here")
        lines += ["", f"Best c = {best}: bound / measured step {r:.2f}; {verdict}."]
    lines += ["", "| round | c | load before | load after | steady steps | step (ms) | wall (s) |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['round']} | {r['c']} | {r['load_before']:.1f} | {r['load_after']:.1f} | {r['steps']} | "
                     f"{ms(r['step'])} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def figure(setup: Setup, table: dict[int, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    cs = list(table)
    x = range(len(cs))
    ax.bar([i - 0.2 for i in x], [1000 * table[1]["step"]] * len(cs), width=0.4, label="measured step at c = 1")
    ax.bar([i + 0.2 for i in x], [1000 * table[c]["bound"] for c in cs], width=0.4, label="best chunked step")
    ax.set_xticks(list(x), [f"c = {c}" for c in cs])
    ax.set_ylabel("ms per step")
    ax.set_title(setup.label, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> int:
    import shutil

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", choices=sorted(SETUPS), default="tiny")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of c = 1, 2, 4 (default 3)")
    ap.add_argument("--quick", action="store_true", help="one round of c = 1, 2 on 8 tiny prompts, 2 steps each")
    ap.add_argument("--tag", default="", help="suffix of the results' file names (a second run on one date)")
    output_args(ap, "streaming_bound")
    args = ap.parse_args(argv)
    setup = QUICK if args.quick else SETUPS[args.setup]
    rounds = 1 if args.quick else args.rounds
    counts = chunk_counts(setup, args.quick)

    from orchestrator.api import Session

    work = args.work.resolve()
    shutil.rmtree(work / "session", ignore_errors=True)
    runs = []
    t0 = time.monotonic()
    with Session(REPO / setup.toml, overrides={**setup.overrides, **COMMON, "orchestrator.batch_size": setup.batch_size,
                                               "orchestrator.group_size": setup.group_size},
                 output_dir=str(work / "session")) as session:
        for k in range(rounds):
            for c in order(counts, k):
                load_before = loadavg()
                print(f"[{time.monotonic() - t0:5.0f} s] round {k + 1}/{rounds}: c = {c} (load {load_before:.1f})",
                      flush=True)
                out_dir = work / f"r{k}_c{c}"
                shutil.rmtree(out_dir, ignore_errors=True)
                start = time.monotonic()
                session.run(max_steps=setup.steps, seed=k, output_dir=str(out_dir),
                            overrides={"orchestrator.batch_size": setup.batch_size // c})
                rows = read_metrics(out_dir / "metrics.jsonl")
                runs.append({"round": k, "c": c, "load_before": load_before, "load_after": loadavg(),
                             "wall_s": time.monotonic() - start, "steps": len(step_rows(rows)),
                             **stage_times(rows)})
    table = summarise(runs, counts)
    command = "python benchmarks/streaming_bound.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    name = "quick" if args.quick else args.setup
    stem = f"streaming_bound_{time.strftime('%Y-%m-%d', time.gmtime())}_{name}{args.tag}"
    path = write_results(args.out, stem, "The best a streamed synchronous step could do",
                         markdown(command, setup, runs, table),
                         {"command": command, "setup": setup._asdict(), "runs": runs,
                          "table": {str(c): row for c, row in table.items()}}, figure(setup, table))
    print(f"wrote {path}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
