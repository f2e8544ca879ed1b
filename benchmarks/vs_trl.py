"""Ours against TRL's on-policy distillation, alternating runs, as ratios ours/TRL.

    python benchmarks/vs_trl.py                    # tiny pair: 3 triples of 20-step runs (~5 min on 2 quiet cores)
    python benchmarks/vs_trl.py --setup smollm2    # SmolLM2 context distillation: 3 triples of 10-step runs
    python benchmarks/vs_trl.py --quick            # 1 pair of 2-step runs (ours synchronous): checks the results

Setups (``SETUPS``):

- ``tiny``: the tiny reverse-text pair; ours is ``rl @ experiments/reverse_text/rl.toml``, TRL's is
  ``DistillationTrainer`` with ``beta = 1`` (reverse KL). The same prompts (drawn by our ``reverse_text``
  environment with the run's seed, each sampled ``group_size`` times), completion length, temperature, batch
  (32 prompts x 4 = 128 completions per optimizer step, micro-batches of 64), LoRA shape (rank 32, alpha 64),
  learning rate and schedule, gradient clip, and held-out prompts and grade (greedy, exact reversal). Ours
  runs twice per seed, synchronous and with one step of asynchrony, as below.
- ``smollm2``: the main job's context distillation (``experiments/context_distill/rl.toml``: SmolLM2-135M-
  Instruct, the teacher the same model with "Answer in French." before the question), 8 prompts x 32 new
  tokens a step, LoRA r16 on q/k/v/o, float32; TRL's peer is ``SDFTTrainer`` (self-distillation with the
  context as privileged information, the base model as the teacher, the sampled-token reverse KL). Ours runs
  twice per seed, synchronous and with one step of asynchrony (``orchestrator.max_async_level = 1``). Both
  sides' held-out answers (32 questions, sampled at the eval temperature) are graded by our ``french``
  environment, so "held-out accuracy" is the French rate.

What cannot be the same is listed in ``DIFFERENCES``. Within a pair (or triple) the order rotates, so a
drifting load lands on every side. Each side's achieved model FLOP/s (``model_flops``) is set against a
float32 matrix multiply measured on the same cores at the start and end of the run (``matmul_peak``).
TRL runs in its own environment (``benchmarks/trl_env.py``: created on first use, the project's pins
untouched). Writes ``vs_trl_<date>[_smollm2].md``, ``.png`` and ``.json`` into ``--out``.
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
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trl_env  # noqa: E402
from profile_run import loadavg, machine, output_args, ratio_stats, run_rl, steady, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from shared.engines import cpu_threads, omp_env  # noqa: E402
from shared.metrics import read_metrics  # noqa: E402

COMMON = ("--wandb.mode", "disabled", "--orchestrator.eval.interval", "0")


class Setup(NamedTuple):
    toml: str
    eval_key: str  # our metrics.jsonl key of held-out accuracy
    trl_mode: str  # trl_side.py's trainer: "distillation" or "sdft"
    full: dict  # steps, pairs, overrides (on top of COMMON)
    quick: dict
    variants: dict  # our runs per seed: name -> extra overrides (--quick: the first alone)


SETUPS = {
    "tiny": Setup(
        "experiments/reverse_text/rl.toml", "eval/reverse_text/avg", "distillation",
        full={"steps": 20, "pairs": 3,
              "overrides": ("--orchestrator.eval.num_prompts", "100", "--inference.lora_mode", "merge")},
        quick={"steps": 2, "pairs": 1,
               "overrides": ("--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "32",
                             "--inference.lora_mode", "merge")},
        variants={"ours": (), "ours_async": ("--orchestrator.max_async_level", "1")}),
    "smollm2": Setup(
        "experiments/context_distill/rl.toml", "eval/french/avg", "sdft",
        full={"steps": 10, "pairs": 3,
              "overrides": ("--orchestrator.batch_size", "8", "--orchestrator.group_size", "1",
                            "--inference.max_tokens", "32", "--orchestrator.eval.num_prompts", "32",
                            "--orchestrator.eval_baseline", "false")},
        quick={"steps": 2, "pairs": 1,
               "overrides": ("--orchestrator.batch_size", "2", "--orchestrator.group_size", "1",
                             "--inference.max_tokens", "8", "--orchestrator.eval.num_prompts", "4",
                             "--orchestrator.eval_baseline", "false")},
        variants={"ours": (), "ours_async": ("--orchestrator.max_async_level", "1")}),
}
METRICS = (("step_s", "wall time per step (s)"), ("tok_s", "student tokens/s"),
           ("acc_after", "held-out accuracy after training"), ("run_s", "wall time of the whole run (s)"),
           ("flop_s", "achieved model FLOP/s"))

DIFFERENCES = """\
- Sampling: ours samples with vLLM (CPU engine on every core, the newest LoRA merged into its weights after
  every step: `inference.lora_mode = "merge"`, about twice as fast as vLLM's CPU LoRA kernels on the tiny
  pair: benchmarks/README.md) in its own process; TRL samples with `transformers.generate` on the training
  model (peft LoRA unmerged) in the training process. Both at temperature 1 with no top-k/top-p, up to 12
  tokens, stopping at EOS.
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
- Threads: TRL's process runs with as many torch threads as ours (`--trl-threads`, default: every core, as
  our engines and trainer rank use). Before 2026-12-02 17:00 UTC our engines ran on one thread (Ray's
  `OMP_NUM_THREADS=1` for actors that reserve no CPU) and TRL was given 1 to match; results of that date
  before that hour say so in their command (`--trl-threads 1`). Under heavy load from other jobs, 2
  threads on 2 cores can be far slower than 1 (OpenMP threads waiting on each other: `generate` of
  32 x 12 tokens on the tiny student took 7.1 s against 0.09 s at a load average of 16), so time on a quiet
  machine. Both sides run with `OMP_WAIT_POLICY=PASSIVE`, as every role of ours does (`shared/engines.py`).
- Prompts: TRL has no groups; each of our 32 prompts appears 4 times in a row in TRL's unshuffled
  dataset, so a step sees the same 128 (prompt, sample) slots. TRL's default sampler is used otherwise.
- Learning rate: identical per step (TRL's scheduler is replaced by ours, `trainer/schedule.py`); both use
  torch's AdamW with the same rate, weight decay and gradient clip.
- Step time is measured by each side's own clock: ours from `time/step` in metrics.jsonl (sampling to
  adapter loaded), TRL's between consecutive `on_step_end` callbacks (generation, teacher forward, backward,
  optimizer step). Steps 1-2 are left out of the means on both sides (warm-up) when a run has more than 4.
"""

DIFFERENCES_SMOLLM2 = """\
- The setup `smollm2` differs from the above as follows. TRL's peer is `SDFTTrainer`
  (`trl.experimental.sdft`) with `teacher_model_kind = "base"` (the teacher is the student with its LoRA
  adapter switched off, in the training process) and `distillation_mode = "sampled_token"` (the sampled-token
  reverse KL, the same estimator as ours), its default importance-sampling clip 2.0; the teacher's prompt is
  `"{privileged_context} {prompt}"` in the user turn, the layout of our `context_mode = "user_prefix"`.
- Held-out accuracy is the French rate of 32 held-out questions' answers sampled at the eval temperature
  (0.8), graded by our `french` environment on both sides (TRL's side returns its texts).
"""

FLOPS_NOTE = """\
Model FLOP/s counts the same arithmetic for both sides from a step's tokens, for a model of N matmul
parameters (tied embeddings counted once, as the lm-head): 2N per prompt and completion token sampled
(prefill and decode), 2N per token the teacher reads (its prompt and the completion), and 4N per token
trained (forward and the backward through the frozen weights; the LoRA weights' own gradients and the
attention's sequence-squared terms are left out), divided by the step time. The peak beside it is a
float32 2048 x 2048 matrix multiply with all cores' threads, measured at the start and end of the run;
the ratio (model FLOP/s utilisation) says how far each side is from this machine's limit.
"""


def model_flops(n_params: int, prompt_tokens: float, teacher_prompt_tokens: float, completion_tokens: float) -> float:
    """Model FLOPs of one step (``FLOPS_NOTE``): sampling ``2N (P + C)``, teacher ``2N (P_t + C)``, training
    ``4N (P + C)``, for P prompt, P_t teacher-prompt and C completion tokens in the step."""
    return 2 * n_params * (prompt_tokens + completion_tokens) + 2 * n_params * (teacher_prompt_tokens + completion_tokens) \
        + 4 * n_params * (prompt_tokens + completion_tokens)


def count_params(model_dir: str) -> int:
    """Parameters stored in a model folder's safetensors files (read from their headers, nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    if not total:
        raise RuntimeError(f"{model_dir}: no safetensors weights to count")
    return total


def matmul_peak(threads: int, size: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a float32 ``size`` x ``size`` matrix multiply with ``threads`` torch threads, in a fresh
    process (the best of ``reps`` after one warm-up)."""
    code = (f"import time, torch; torch.set_num_threads({threads}); a = torch.randn({size}, {size}); "
            f"b = torch.randn({size}, {size}); a @ b; best = min((lambda t: (a @ b, time.perf_counter() - t)[1])"
            f"(time.perf_counter()) for _ in range({reps})); print(2 * {size} ** 3 / best)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def build_spec(setup: Setup, steps: int, seed: int, overrides: tuple[str, ...]) -> dict:
    """The TRL side's input, from our own config and environment: the prompts our run will draw, and each
    step's prompt-token counts for the FLOP count (``model_flops``)."""
    from transformers import AutoTokenizer

    from orchestrator.environments import make
    from orchestrator.prompts import Renderer
    from shared.config import load
    from shared.models import resolve
    from trainer.schedule import lr_multiplier

    cfg = load(["@", str(REPO / setup.toml), "--max_steps", str(steps), "--seed", str(seed), *overrides])
    oc, tc, lora = cfg.orchestrator, cfg.trainer, cfg.model.lora
    env = make(cfg)
    student = str(resolve(cfg.model.name, "model.name"))
    render = Renderer(AutoTokenizer.from_pretrained(student), cfg.model.chat_template, oc.teacher_model)
    drawn = [env.next_prompts(oc.batch_size) for _ in range(steps)]
    spec = {
        "mode": setup.trl_mode, "student": student, "teacher": str(resolve(cfg.teacher.name, "teacher.name")),
        "steps": steps, "max_tokens": cfg.inference.max_tokens, "temperature": cfg.inference.temperature,
        "seed": seed, "micro_batch_size": tc.micro_batch_size, "lr": tc.lr, "group_size": oc.group_size,
        "lr_multipliers": [lr_multiplier(i, tc.lr_schedule, total=cfg.max_steps, warmup=tc.warmup_steps,
                                         min_ratio=tc.min_lr_ratio) for i in range(steps)],
        "max_grad_norm": tc.max_grad_norm, "weight_decay": tc.weight_decay,
        "lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                 "target_modules": list(lora.target_modules)},
        "prompt_tokens": [oc.group_size * sum(len(render.ids(p)) for p in step) for step in drawn],
        "teacher_prompt_tokens": [oc.group_size * sum(len(render.ids(p, teacher=True)) for p in step)
                                  for step in drawn],
    }
    evals = env.eval_prompts(oc.eval.num_prompts)
    if setup.trl_mode == "sdft":
        spec.update(train_messages=[[[{"role": "user", "content": p.text}] for p in step] for step in drawn],
                    privileged_context=oc.teacher_model.context, eval_temperature=oc.eval.temperature,
                    eval_messages=[[{"role": "user", "content": p.text}] for p in evals],
                    eval_texts=[p.text for p in evals])
    else:
        spec.update(train_prompts=[[p.text for p in step for _ in range(oc.group_size)] for step in drawn],
                    eval=[[p.text, p.answer] for p in evals])
    return spec


def grade(setup: Setup, spec: dict, texts: list[str]) -> float:
    """Our environment's mean score of the held-out completions ``texts`` (TRL's side, ``sdft`` mode)."""
    from orchestrator.data import Prompt
    from orchestrator.environments import make
    from shared.config import load

    env = make(load(["@", str(REPO / setup.toml), "--seed", str(spec["seed"])]))
    return statistics.fmean(env.score(Prompt(text=q), t) for q, t in zip(spec["eval_texts"], texts, strict=True))


def side_summary(step_s: list[float], tokens: list[float], acc_before: float, acc_after: float, run_s: float,
                 flops: list[float] | None = None) -> dict:
    """One run's figures, computed the same way for both sides (means over the steady steps); ``flops``: each
    step's model FLOPs (``model_flops``), for ``flop_s``."""
    keep = steady(list(range(len(step_s))))
    s = statistics.fmean(step_s[i] for i in keep)
    tok = statistics.fmean(tokens[i] for i in keep)
    out = {"steps": len(step_s), "step_s": s, "tokens_per_step": tok, "tok_s": tok / s,
           "acc_before": acc_before, "acc_after": acc_after, "run_s": run_s}
    if flops is not None:
        out["flop_s"] = statistics.fmean(flops[i] for i in keep) / s
    return out


def step_flops(spec: dict, n_params: int, tokens: list[float]) -> list[float]:
    """Each step's model FLOPs from the spec's prompt-token counts and the side's completion tokens."""
    return [model_flops(n_params, p, pt, c) for p, pt, c in zip(spec["prompt_tokens"], spec["teacher_prompt_tokens"],
                                                                 tokens)]


def run_ours(setup: Setup, steps: int, seed: int, overrides: tuple[str, ...], work: Path, name: str = "ours",
             spec: dict | None = None, n_params: int = 0) -> dict:
    out_dir = (work / f"{name}_s{seed}").resolve()
    run_s = run_rl(out_dir, "@", setup.toml, "--max_steps", str(steps), "--seed", str(seed), *overrides, *COMMON)
    return ours_summary(setup, out_dir, run_s, name, seed, spec, n_params)


def ours_summary(setup: Setup, out_dir: Path, run_s: float, name: str = "ours", seed: int = 0,
                 spec: dict | None = None, n_params: int = 0) -> dict:
    """Our side's figures from its run's ``metrics.jsonl`` (``run_s``: the run's wall seconds)."""
    rows = read_metrics(out_dir / "metrics.jsonl")
    steps_rows = [r for r in rows if "time/step" in r and r.get("step", 0) > 0]
    evals = [r[setup.eval_key] for r in rows if setup.eval_key in r]
    if not steps_rows or len(evals) < 2:
        raise RuntimeError(f"{name} (seed {seed}): {out_dir}/metrics.jsonl has {len(steps_rows)} step rows and "
                           f"{len(evals)} evaluations")
    tokens = [r["tokens/step"] for r in steps_rows]
    flops = step_flops(spec, n_params, tokens) if spec and n_params else None
    return side_summary([r["time/step"] for r in steps_rows], tokens, evals[0], evals[-1], run_s, flops)


def run_trl(python: Path, spec: dict, work: Path, threads: int, setup: Setup | None = None, n_params: int = 0) -> dict:
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / f"trl_spec_s{spec['seed']}.json", work / f"trl_out_s{spec['seed']}.json"
    spec_path.write_text(json.dumps({**spec, "threads": threads}))
    out_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(threads), **omp_env(), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    t0 = time.monotonic()
    proc = subprocess.run([str(python), str(Path(__file__).with_name("trl_side.py")), str(spec_path), str(out_path)],
                          env=env, cwd=work, capture_output=True, text=True)
    run_s = time.monotonic() - t0
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"TRL (seed {spec['seed']}): exit {proc.returncode}: {tail}")
    return trl_summary(out_path, run_s, spec, setup, n_params)


def trl_summary(out_path: Path, run_s: float, spec: dict, setup: Setup | None = None, n_params: int = 0) -> dict:
    """TRL's figures from what ``trl_side.py`` wrote (``run_s``: the run's wall seconds)."""
    out = json.loads(out_path.read_text())
    if len(out["step_s"]) != spec["steps"]:
        raise RuntimeError(f"TRL (seed {spec['seed']}): {len(out['step_s'])} steps timed, expected {spec['steps']}")
    if "eval_after" in out:  # sdft: the held-out texts, graded here with our environment
        out["acc_before"], out["acc_after"] = grade(setup, spec, out["eval_before"]), grade(setup, spec, out["eval_after"])
    flops = step_flops(spec, n_params, out["tokens"]) if n_params else None
    return {**side_summary(out["step_s"], out["tokens"], out["acc_before"], out["acc_after"], run_s, flops),
            "losses": out["losses"]}


def pair_ratios(ours: dict, trl: dict) -> dict[str, float]:
    """ours / TRL for each metric of ``METRICS``; NaN where TRL's figure is 0 (e.g. an accuracy of 0) or
    either side lacks it."""
    return {key: ours[key] / trl[key] if trl.get(key) and key in ours else float("nan") for key, _ in METRICS}


def ratio_table(pairs: list[dict], variant: str = "ours") -> list[tuple[str, dict | None, int]]:
    """Per metric: its label, min/median/max of the defined ratios of ``variant`` / TRL (None when none is),
    and how many were undefined."""
    rows = []
    for key, label in METRICS:
        vals = [p.get("ratios", {}).get(variant, p.get("ratio")) [key] for p in pairs]
        ok = [v for v in vals if math.isfinite(v)]
        if key == "acc_after" and ok:  # ours 0 is a result (nothing learned), not a failed measurement
            stats = {"min": min(ok), "median": statistics.median(ok), "max": max(ok), "n": len(ok)}
        else:
            stats = ratio_stats(ok) if ok else None
        rows.append((label, stats, len(vals) - len(ok)))
    return rows


def side_names(pairs: list[dict]) -> list[str]:
    return [k for k in pairs[0]["ratios"]] if "ratios" in pairs[0] else ["ours"]


def markdown(pairs: list[dict], command: str, trl_python_versions: str, peaks: list[float] | None = None,
             title: str = "tiny reverse-text pair") -> str:
    lo = min(min(p["load_before"], p["load_after"]) for p in pairs)
    hi = max(max(p["load_before"], p["load_after"]) for p in pairs)
    n_steps = pairs[0]["trl"]["steps"]
    lines = [
        f"`{command}` — {machine()}; load average (1 min) {lo:.1f}–{hi:.1f} over the runs; {trl_python_versions}.",
        "",
    ]
    if peaks:
        lines += [f"Matrix-multiply peak on these cores (float32, all threads), start and end of the run: "
                  f"{' and '.join(f'{x / 1e9:.1f}' for x in peaks)} GFLOP/s.", ""]
    for variant in side_names(pairs):
        lines += [
            f"{title}: ratios {variant} / TRL over {len(pairs)} pair(s) of {n_steps}-step runs (> 1 for time: ours "
            "slower; > 1 for tokens/s, FLOP/s and accuracy: ours higher):",
            "",
            "| metric | min | median | max | pairs |",
            "|---|---|---|---|---|",
        ]
        for label, st, undefined in ratio_table(pairs, variant):
            if st is None:
                lines.append(f"| {label} | n/a | n/a | n/a | 0 (TRL's figure was 0 or missing in all) |")
                continue
            note = f" ({undefined} undefined: TRL's figure 0)" if undefined else ""
            lines.append(f"| {label} | {st['min']:.2f} | {st['median']:.2f} | {st['max']:.2f} | {st['n']}{note} |")
        lines.append("")
    peak = statistics.fmean(peaks) if peaks else 0.0
    lines += ["| pair (seed) | side | step (s) | completion tokens/step | student tok/s "
              "| accuracy before → after | model GFLOP/s | of peak "
              "| run (s) | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        for side in [*side_names(pairs), "trl"]:
            s = p[side]
            gf = s.get("flop_s", float("nan"))
            lines.append(f"| {p['seed']} | {'TRL' if side == 'trl' else side} | {s['step_s']:.3f} "
                         f"| {s['tokens_per_step']:.0f} | {s['tok_s']:.0f} "
                         f"| {s['acc_before']:.3f} → {s['acc_after']:.3f} "
                         f"| {gf / 1e9:.2f} | {gf / peak if peak else float('nan'):.1%} "
                         f"| {s['run_s']:.0f} | {p['load_before']:.1f}–{p['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(pairs: list[dict], title: str = "tiny reverse-text pair"):
    """Each pair's ratio ours/TRL per metric (log scale; the dashed line is parity), one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    variants = side_names(pairs)
    for v_i, variant in enumerate(variants):
        dx = (v_i - (len(variants) - 1) / 2) * 0.2
        for j, (key, label) in enumerate(METRICS):
            vals = [r[key] for p in pairs if math.isfinite((r := p.get("ratios", {}).get(variant, p.get("ratio")))[key])]
            ax.scatter([j + dx] * len(vals), vals, s=30, zorder=3, color=f"C{v_i}", label=variant if j == 0 else None)
            if vals:
                ax.hlines(statistics.median(vals), j + dx - 0.1, j + dx + 0.1, color="black")
    ax.axhline(1.0, ls="--", color="grey")
    ax.set_yscale("log")
    ax.set_xticks(range(len(METRICS)), [textwrap.fill(label.replace(" (s)", ""), 16) for _, label in METRICS],
                  fontsize=8)
    ax.set_ylabel("ours / TRL")
    ax.legend(fontsize=8)
    ax.set_title(f"{title}, {len(pairs)} alternating pair(s); bar = median", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", choices=tuple(SETUPS), default="tiny", help="which pair and job (module docstring)")
    ap.add_argument("--quick", action="store_true", help="one pair of 2-step runs with a small batch")
    ap.add_argument("--pairs", type=int, help="pairs of runs (default 3; --quick 1)")
    ap.add_argument("--steps", type=int, help="steps per run (default 20 tiny, 10 smollm2; --quick 2)")
    ap.add_argument("--trl-threads", type=int, default=0,
                    help="torch threads of the TRL process (default 0: every core, as ours; DIFFERENCES, 'Threads')")
    ap.add_argument("--tag", default="", help="suffix of the results' file names (a second run on one date)")
    output_args(ap, "vs_trl")
    args = ap.parse_args(argv)
    setup = SETUPS[args.setup]
    mode = setup.quick if args.quick else setup.full
    steps, n_pairs = args.steps or mode["steps"], args.pairs or mode["pairs"]
    variants = dict(list(setup.variants.items())[:1]) if args.quick else setup.variants
    t0 = time.monotonic()
    try:
        python = trl_env.ensure(log=lambda m: print(m, flush=True))
    except trl_env.TrlEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    env_s = time.monotonic() - t0
    cores = os.cpu_count() or 1
    args.trl_threads = args.trl_threads or cpu_threads()  # the count our engines get (shared/engines.py)
    peaks = [matmul_peak(cores)]
    pairs = []
    for i in range(n_pairs):
        seed = i
        spec = build_spec(setup, steps, seed, mode["overrides"])
        n_params = count_params(spec["student"])
        load_before = loadavg()
        sides = [*variants, "trl"]
        order = sides[i % len(sides):] + sides[:i % len(sides)]  # rotate: a drifting load lands on every side
        result = {}
        for side in order:
            print(f"[{time.monotonic() - t0:5.0f} s] pair {i + 1}/{n_pairs} (seed {seed}): {side} "
                  f"(load {loadavg():.1f})", flush=True)
            try:
                result[side] = (run_trl(python, spec, args.work, args.trl_threads, setup, n_params) if side == "trl"
                                else run_ours(setup, steps, seed, (*mode["overrides"], *variants[side]),
                                              args.work, side, spec, n_params))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        ratios = {v: pair_ratios(result[v], result["trl"]) for v in variants}
        pairs.append({"seed": seed, "order": order, **result, "ratio": ratios["ours"], "ratios": ratios,
                      "load_before": load_before, "load_after": loadavg()})
    peaks.append(matmul_peak(cores))
    flags = [f for f, on in ((f"--setup {args.setup}", args.setup != "tiny"), ("--quick", args.quick),
                              (f"--pairs {args.pairs}", args.pairs), (f"--steps {args.steps}", args.steps),
                              (f"--trl-threads {args.trl_threads}", True), (f"--tag {args.tag}", args.tag)) if on]
    command = " ".join(["python benchmarks/vs_trl.py", *flags])
    versions = "TRL environment: " + " ".join(trl_env.PINS)
    title = {"tiny": "tiny reverse-text pair", "smollm2": "SmolLM2-135M context distillation"}[args.setup]
    table = markdown(pairs, command, versions, peaks, title)
    diffs = DIFFERENCES + (DIFFERENCES_SMOLLM2 if args.setup == "smollm2" else "")
    suffix = ("" if args.setup == "tiny" else f"_{args.setup}") + ("_quick" if args.quick else "") + args.tag
    stem = f"vs_trl_{time.strftime('%Y-%m-%d')}{suffix}"
    path = write_results(args.out, stem, "Against TRL", f"{table}\nWhat differs:\n\n{diffs}\n{FLOPS_NOTE}",
                         {"setup": args.setup, "pairs": pairs, "env_s": env_s, "matmul_peak_flop_s": peaks,
                          "n_params": n_params}, plot(pairs, title))
    print(table)
    print(f"wrote {path}.md/.png/.json in {time.monotonic() - t0:.0f} s (TRL environment {env_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
