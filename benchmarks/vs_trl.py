"""Ours against TRL's on-policy distillation on the tiny reverse-text pair, alternating runs, as ratios ours/TRL.

    python benchmarks/vs_trl.py            # 3 pairs of 20-step runs (~10 min on 2 quiet cores)
    python benchmarks/vs_trl.py --quick    # 1 pair of 2-step runs: checks the results are well-formed

Both sides get the same student and teacher (the tiny pair), the same prompts (drawn by our
``reverse_text`` environment with the run's seed, each sampled ``group_size`` times), the same completion
length, sampling temperature, batch (32 prompts x 4 = 128 completions per optimizer step, micro-batches of
64), step count, LoRA shape (rank 32, alpha 64, the same target modules), learning rate, warm-up and cosine
decay, gradient clip, and the same held-out prompts and grade (greedy, exact reversal). Ours is
``rl @ experiments/reverse_text/rl.toml`` with matching overrides; TRL's is ``DistillationTrainer`` with
``beta = 1`` (reverse KL), run by ``benchmarks/trl_side.py`` in its own environment
(``benchmarks/trl_env.py``: created on first use, the project's pins untouched). What cannot be the same
is listed in ``DIFFERENCES``. Within a pair the order alternates (ours first, then TRL first, ...), so
a drifting load lands on both. Writes ``vs_trl_<date>.md``, ``.png`` and ``.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trl_env  # noqa: E402
from profile_run import loadavg, machine, output_args, ratio_stats, run_rl, steady, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from shared.metrics import read_metrics  # noqa: E402

TOML = "experiments/reverse_text/rl.toml"
COMMON = ("--wandb.mode", "disabled", "--orchestrator.eval.interval", "0")
FULL = {"steps": 20, "pairs": 3, "overrides": ("--orchestrator.eval.num_prompts", "100")}
QUICK = {"steps": 2, "pairs": 1,
         "overrides": ("--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "32")}
EVAL_KEY = "eval/reverse_text/avg"
METRICS = (("step_s", "wall time per step (s)"), ("tok_s", "student tokens/s"),
           ("acc_after", "held-out accuracy after training"), ("run_s", "wall time of the whole run (s)"))

DIFFERENCES = """\
- Sampling: ours samples with vLLM (CPU engine, the newest LoRA loaded as a vLLM adapter after every step) in
  its own process; TRL samples with `transformers.generate` on the training model (peft LoRA unmerged) in the
  training process. Both at temperature 1 with no top-k/top-p, up to 12 tokens, stopping at EOS.
- Loss: ours is a policy gradient whose per-token advantage is the sampled reverse-KL term
  `logp_teacher(t) - logp_student(t)` (one-sample estimate, importance ratio and ratio masking as in
  `trainer/loss.py`); TRL's `beta = 1` is the exact reverse KL summed over the whole vocabulary at each
  sampled position (it needs the teacher's full logits; ours needs only the sampled token's log-prob). So
  the two optimise the same objective with different gradient estimators, and the same learning rate is not
  the same step size.
- Teacher: ours scores with a separate vLLM engine (`prompt_logprobs`) in its own process; TRL runs the
  teacher forward in the training process on every micro-batch.
- Processes: ours is four Ray actors (orchestrator, student engine, teacher engine, trainer with FSDP2 over
  gloo, one rank with 2 torch threads) sharing the 2 cores; TRL is one process. Ours pays the engine
  start-ups (in parallel; ~30 s on a quiet machine) before step 1; the per-step ratios leave start-up out,
  the whole-run ratio includes it (and both sides' two evaluations).
- Threads: TRL's process runs with 1 torch thread (`--trl-threads`). With torch's default of 2 (= the cores),
  at a load average of 16 from other jobs, `generate` of 32 x 12 tokens on the tiny student took 7.1 s
  against 0.09 s with 1 thread (OpenMP threads waiting on each other); that would have measured the load,
  not TRL. Ours runs as shipped.
- Prompts: TRL has no groups; each of our 32 prompts appears 4 times in a row in TRL's unshuffled
  dataset, so a step sees the same 128 (prompt, sample) slots. TRL's default sampler is used otherwise.
- Learning rate: identical per step (TRL's scheduler is replaced by ours, `trainer/schedule.py`); both use
  torch's AdamW with the same rate, weight decay and gradient clip.
- Step time is measured by each side's own clock: ours from `time/step` in metrics.jsonl (sampling to
  adapter loaded), TRL's between consecutive `on_step_end` callbacks (generation, teacher forward, backward,
  optimizer step). Steps 1-2 are left out of the means on both sides (warm-up) when a run has more than 4.
"""


def build_spec(steps: int, seed: int, overrides: tuple[str, ...]) -> dict:
    """The TRL side's input, from our own config and environment: the prompts our run will draw."""
    from orchestrator.environments import make
    from shared.config import load
    from shared.models import resolve
    from trainer.schedule import lr_multiplier

    cfg = load(["@", str(REPO / TOML), "--max_steps", str(steps), "--seed", str(seed), *overrides])
    oc, tc, lora = cfg.orchestrator, cfg.trainer, cfg.model.lora
    env = make(cfg)
    train = [[p.text for p in env.next_prompts(oc.batch_size) for _ in range(oc.group_size)] for _ in range(steps)]
    return {
        "student": str(resolve(cfg.model.name, "model.name")),
        "teacher": str(resolve(cfg.teacher.name, "teacher.name")),
        "train_prompts": train, "eval": [[p.text, p.answer] for p in env.eval_prompts(oc.eval.num_prompts)],
        "steps": steps, "max_tokens": cfg.inference.max_tokens, "temperature": cfg.inference.temperature,
        "seed": seed, "micro_batch_size": tc.micro_batch_size, "lr": tc.lr,
        "lr_multipliers": [lr_multiplier(i, tc.lr_schedule, total=cfg.max_steps, warmup=tc.warmup_steps,
                                         min_ratio=tc.min_lr_ratio) for i in range(steps)],
        "max_grad_norm": tc.max_grad_norm, "weight_decay": tc.weight_decay,
        "lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                 "target_modules": list(lora.target_modules)},
    }


def side_summary(step_s: list[float], tokens: list[float], acc_before: float, acc_after: float, run_s: float) -> dict:
    """One run's figures, computed the same way for both sides (means over the steady steps)."""
    keep = steady(list(range(len(step_s))))
    s = statistics.fmean(step_s[i] for i in keep)
    tok = statistics.fmean(tokens[i] for i in keep)
    return {"steps": len(step_s), "step_s": s, "tokens_per_step": tok, "tok_s": tok / s,
            "acc_before": acc_before, "acc_after": acc_after, "run_s": run_s}


def run_ours(steps: int, seed: int, overrides: tuple[str, ...], work: Path) -> dict:
    out_dir = (work / f"ours_s{seed}").resolve()
    run_s = run_rl(out_dir, "@", TOML, "--max_steps", str(steps), "--seed", str(seed), *overrides, *COMMON)
    rows = read_metrics(out_dir / "metrics.jsonl")
    steps_rows = [r for r in rows if "time/step" in r and r.get("step", 0) > 0]
    evals = [r[EVAL_KEY] for r in rows if EVAL_KEY in r]
    if not steps_rows or len(evals) < 2:
        raise RuntimeError(f"ours (seed {seed}): {out_dir}/metrics.jsonl has {len(steps_rows)} step rows and "
                           f"{len(evals)} evaluations")
    return side_summary([r["time/step"] for r in steps_rows], [r["tokens/step"] for r in steps_rows],
                        evals[0], evals[-1], run_s)


def run_trl(python: Path, spec: dict, work: Path, threads: int) -> dict:
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / f"trl_spec_s{spec['seed']}.json", work / f"trl_out_s{spec['seed']}.json"
    spec_path.write_text(json.dumps({**spec, "threads": threads}))
    out_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    t0 = time.monotonic()
    proc = subprocess.run([str(python), str(Path(__file__).with_name("trl_side.py")), str(spec_path), str(out_path)],
                          env=env, cwd=work, capture_output=True, text=True)
    run_s = time.monotonic() - t0
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"TRL (seed {spec['seed']}): exit {proc.returncode}: {tail}")
    out = json.loads(out_path.read_text())
    if len(out["step_s"]) != spec["steps"]:
        raise RuntimeError(f"TRL (seed {spec['seed']}): {len(out['step_s'])} steps timed, expected {spec['steps']}")
    return {**side_summary(out["step_s"], out["tokens"], out["acc_before"], out["acc_after"], run_s),
            "losses": out["losses"]}


def pair_ratios(ours: dict, trl: dict) -> dict[str, float]:
    """ours / TRL for each metric of ``METRICS``; NaN where TRL's figure is 0 (e.g. an accuracy of 0)."""
    return {key: ours[key] / trl[key] if trl[key] else float("nan") for key, _ in METRICS}


def ratio_table(pairs: list[dict]) -> list[tuple[str, dict | None, int]]:
    """Per metric: its label, min/median/max of the defined ratios (None when none is), and how many were undefined."""
    rows = []
    for key, label in METRICS:
        vals = [p["ratio"][key] for p in pairs]
        ok = [v for v in vals if math.isfinite(v)]
        rows.append((label, ratio_stats(ok) if ok else None, len(vals) - len(ok)))
    return rows


def markdown(pairs: list[dict], command: str, trl_python_versions: str) -> str:
    lo = min(min(p["load_before"], p["load_after"]) for p in pairs)
    hi = max(max(p["load_before"], p["load_after"]) for p in pairs)
    n_steps = pairs[0]["ours"]["steps"]
    lines = [
        f"`{command}` — {machine()}; load average (1 min) {lo:.1f}–{hi:.1f} over the runs; {trl_python_versions}.",
        "",
        f"Ratios ours / TRL over {len(pairs)} pair(s) of {n_steps}-step runs (> 1 for time: ours slower; > 1 for "
        "tokens/s and accuracy: ours higher):",
        "",
        "| metric | min | median | max | pairs |",
        "|---|---|---|---|---|",
    ]
    for label, st, undefined in ratio_table(pairs):
        if st is None:
            lines.append(f"| {label} | n/a | n/a | n/a | 0 (TRL's figure was 0 in all) |")
            continue
        note = f" ({undefined} undefined: TRL's figure 0)" if undefined else ""
        lines.append(f"| {label} | {st['min']:.2f} | {st['median']:.2f} | {st['max']:.2f} | {st['n']}{note} |")
    lines += ["", "| pair (seed) | side | step (s) | completion tokens/step | student tok/s "
              "| accuracy before → after "
              "| run (s) | load avg |", "|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        for side in ("ours", "trl"):
            s = p[side]
            lines.append(f"| {p['seed']} | {'ours' if side == 'ours' else 'TRL'} | {s['step_s']:.3f} "
                         f"| {s['tokens_per_step']:.0f} | {s['tok_s']:.0f} "
                         f"| {s['acc_before']:.3f} → {s['acc_after']:.3f} "
                         f"| {s['run_s']:.0f} | {p['load_before']:.1f}–{p['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(pairs: list[dict]):
    """Each pair's ratio ours/TRL per metric (log scale; the dashed line is parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for j, (key, label) in enumerate(METRICS):
        vals = [p["ratio"][key] for p in pairs if math.isfinite(p["ratio"][key])]
        ax.scatter([j] * len(vals), vals, s=30, zorder=3)
        if vals:
            ax.hlines(statistics.median(vals), j - 0.25, j + 0.25, color="black")
    ax.axhline(1.0, ls="--", color="grey")
    ax.set_yscale("log")
    ax.set_xticks(range(len(METRICS)), [textwrap.fill(label.replace(" (s)", ""), 20) for _, label in METRICS],
                  fontsize=8)
    ax.set_ylabel("ours / TRL")
    ax.set_title(f"tiny reverse-text pair, {len(pairs)} alternating pair(s); bar = median", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one pair of 2-step runs with 8 prompts x 4 per step")
    ap.add_argument("--pairs", type=int, help="pairs of runs (default 3; --quick 1)")
    ap.add_argument("--steps", type=int, help="steps per run (default 40; --quick 2)")
    ap.add_argument("--trl-threads", type=int, default=1,
                    help="torch threads of the TRL process (default 1: see DIFFERENCES, 'Threads')")
    output_args(ap, "vs_trl")
    args = ap.parse_args(argv)
    mode = QUICK if args.quick else FULL
    steps, n_pairs = args.steps or mode["steps"], args.pairs or mode["pairs"]
    t0 = time.monotonic()
    try:
        python = trl_env.ensure(log=lambda m: print(m, flush=True))
    except trl_env.TrlEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    env_s = time.monotonic() - t0
    pairs = []
    for i in range(n_pairs):
        seed = i
        spec = build_spec(steps, seed, mode["overrides"])
        load_before = loadavg()
        order = ("ours", "trl") if i % 2 == 0 else ("trl", "ours")
        result = {}
        for side in order:
            print(f"[{time.monotonic() - t0:5.0f} s] pair {i + 1}/{n_pairs} (seed {seed}): {side} "
                  f"(load {loadavg():.1f})", flush=True)
            try:
                result[side] = (run_ours(steps, seed, mode["overrides"], args.work) if side == "ours"
                                else run_trl(python, spec, args.work, args.trl_threads))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        pairs.append({"seed": seed, "order": order, **result, "ratio": pair_ratios(result["ours"], result["trl"]),
                      "load_before": load_before, "load_after": loadavg()})
    flags = [f for f, on in (("--quick", args.quick), (f"--pairs {args.pairs}", args.pairs),
                              (f"--steps {args.steps}", args.steps), (f"--trl-threads {args.trl_threads}",
                                                                      args.trl_threads != 1)) if on]
    command = " ".join(["python benchmarks/vs_trl.py", *flags])
    versions = "TRL environment: " + " ".join(trl_env.PINS)
    table = markdown(pairs, command, versions)
    stem = f"vs_trl_{time.strftime('%Y-%m-%d')}{'_quick' if args.quick else ''}"
    path = write_results(args.out, stem, "Against TRL", f"{table}\nWhat differs:\n\n{DIFFERENCES}",
                         {"pairs": pairs, "env_s": env_s}, plot(pairs))
    print(table)
    print(f"wrote {path}.md/.png/.json in {time.monotonic() - t0:.0f} s (TRL environment {env_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
