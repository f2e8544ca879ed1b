"""Sample efficiency: on-policy distillation against RL, hybrid and SFT, at the same student, prompts and steps.

    python benchmarks/sample_efficiency.py            # both tasks, 4 methods x 3 seeds (< 20 min on 2 cores)
    python benchmarks/sample_efficiency.py --quick    # reverse_text, 4 methods x 2 seeds x 3 steps: checks the
                                                      # pipeline writes well-formed results (<= 2 min)

Methods (every other setting equal; ``shared/advantages.py`` has the algebra):

- ``opd``: on-policy distillation, the per-token reverse-KL advantage ``logp_T - logp_S`` (kl_coef 1);
- ``rl``: the task's verifiable reward only, ``A = R - mean of R over the prompt's group`` (adv_tau 1, kl 0);
- ``hybrid``: both (adv_tau 1, kl_coef 1);
- ``sft``: off-policy distillation, the NLL of the teacher's own samples (``orchestrator.workflow = "sft"``).

Tasks: ``reverse_text`` on the tiny reverse pair (``experiments/reverse_text/rl.toml``), and two-digit
addition (the ``arithmetic`` environment) on a tiny arithmetic pair built here on first use and cached
next to the reverse pair: the reverse pair's character vocabulary has no digits and no capitals, so it
cannot read ``What is 37 + 12?``, and SmolLM2-135M would take ~1 min a step (README), 24 runs far over
budget.  The pair is built the way ``shared/builders/tiny_pair.py`` builds its own: a teacher trained on the
environment's training split until it solves the held-out split, a smaller student stopped early.

All runs of a task share one start of the roles (``orchestrator.api.Session``): each run begins from the
base student with a LoRA adapter and optimizer drawn from its seed.  Per run the held-out accuracy
(greedy, 100 prompts) is read every ``eval_every`` steps; a method "reaches" the teacher at the first
evaluation with accuracy >= 0.9 x the teacher's.  Writes ``sample_efficiency_<date>.md`` (table, ratio),
``.json`` (every curve) and ``.png`` (accuracy against steps and against sampled tokens) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS: dict[str, dict[str, Any]] = {
    "opd": {"trainer.loss.adv_tau": 0.0, "trainer.loss.kl_coef": 1.0},
    "rl": {"trainer.loss.adv_tau": 1.0, "trainer.loss.kl_coef": 0.0},
    "hybrid": {"trainer.loss.adv_tau": 1.0, "trainer.loss.kl_coef": 1.0},
    "sft": {"trainer.loss.adv_tau": 0.0, "trainer.loss.kl_coef": 0.0, "orchestrator.workflow": "sft"},
}
TASKS = ("reverse_text", "arithmetic")
REACH = 0.9  # a run reaches the teacher at accuracy >= REACH x the teacher's
HALF = 0.5  # secondary target: the student's start plus HALF of its gap to the teacher


@dataclass(frozen=True)
class Budget:
    steps: int
    eval_every: int
    seeds: tuple[int, ...]
    eval_prompts: int = 100
    batch_size: int = 16
    group_size: int = 4
    lr: float = 2e-3  # as experiments/reverse_text/rl.toml; 5e-3 without warm-up collapsed every method (README)
    warmup_steps: int = 10  # then constant: steps-to-target does not depend on the budget


FULL = Budget(steps=60, eval_every=10, seeds=(0, 1, 2))  # every 5: +3 min, over the 20-minute budget on first use
QUICK = Budget(steps=3, eval_every=1, seeds=(0, 1), eval_prompts=16, batch_size=8, warmup_steps=0)


# ------------------------------------------------------------------------------------------------
# Pure analysis: curves in, numbers out


def steps_to_reach(steps: Sequence[int], accuracy: Sequence[float], target: float) -> int | None:
    """The first evaluated step whose accuracy is >= ``target`` (None: not reached within the curve)."""
    return next((s for s, a in zip(steps, accuracy) if a >= target), None)


def cumulative(values: Sequence[float]) -> list[float]:
    """Running sums: ``[v0, v0 + v1, ...]``."""
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def median_steps(per_seed: Sequence[int | None]) -> float:
    """Median over seeds, a seed that never reached counting as infinitely many steps (inf if half or more did not)."""
    return statistics.median(math.inf if s is None else float(s) for s in per_seed)


def step_ratio(rl: Sequence[int | None], opd: Sequence[int | None], budget: int) -> tuple[str, float]:
    """RL steps / OPD steps from the median steps-to-reach of each: ``("=", r)`` when both reached, ``(">", r)``
    (a lower bound: RL counted at the budget) when only OPD did, ``("<", r)`` when only RL did, ``("n/a", nan)``."""
    r, o = median_steps(rl), median_steps(opd)
    if math.isfinite(r) and math.isfinite(o):
        return "=", r / o
    if math.isfinite(o):
        return ">", budget / o
    if math.isfinite(r):
        return "<", r / budget
    return "n/a", math.nan


@dataclass
class Curve:
    """One run: held-out accuracy at evaluated steps, and the completion tokens sampled before each."""

    task: str
    method: str
    seed: int
    steps: list[int]
    accuracy: list[float]
    tokens: list[float]  # sampled completion tokens up to each evaluated step (the teacher's, for sft)
    wall_s: float = 0.0
    teacher_kl_last: float = math.nan


def curve_from_rows(rows: list[dict], env: str, task: str, method: str, seed: int, wall_s: float) -> Curve:
    """A :class:`Curve` from a run's metrics.jsonl rows (``eval/<env>/avg`` rows and per-step ``tokens/step``)."""
    key = f"eval/{env}/avg"
    train = sorted((r for r in rows if "tokens/step" in r), key=lambda r: r["step"])
    sums = dict(zip((r["step"] for r in train), cumulative([r["tokens/step"] for r in train])))
    evals = sorted((r["step"], r[key]) for r in rows if key in r)
    kl = [r["teacher_kl"] for r in train if r.get("teacher_kl") is not None]
    return Curve(task, method, seed, [s for s, _ in evals], [a for _, a in evals],
                 [max((v for k, v in sums.items() if k <= s), default=0.0) for s, _ in evals], wall_s,
                 statistics.fmean(kl[-3:]) if kl else math.nan)


# ------------------------------------------------------------------------------------------------
# The tiny arithmetic pair: "What is a + b?" -> "c" with a, b in 0..99


ARITH_ENV = {"environment": "arithmetic",
             "env_args": {"arithmetic": {"min_operand": 0, "max_operand": 99, "operators": ["+"], "terms": 2}}}
ARITH_CHARS = string.digits + string.ascii_letters + " +-*()=?.,"
ARITH_RECIPE = {"version": 1, "teacher": (128, 4, 4, 256), "student": (128, 2, 4, 256), "lr": 3e-3, "batch": 128,
                "steps": 4000, "teacher_stop": 0.97, "student_stop": 0.2, "env": ARITH_ENV}


def arith_tokenizer() -> Any:
    """A character tokenizer for the arithmetic prompts, with the reverse pair's special tokens and ids."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from shared.builders import tiny_pair as tp

    vocab = [*tp.SPECIAL_TOKENS, *ARITH_CHARS]
    vocab += [f"<extra_{i}>" for i in range(-len(vocab) % tp.VOCAB_MULTIPLE)]
    tok = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=tp.UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(tp.SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single=f"{tp.BOS_TOKEN} $A", special_tokens=[
        (tp.BOS_TOKEN, tp.BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=tp.BOS_TOKEN, eos_token=tp.EOS_TOKEN,
                                   pad_token=tp.PAD_TOKEN, unk_token=tp.UNK_TOKEN, model_max_length=tp.MAX_POSITIONS,
                                   clean_up_tokenization_spaces=False)


def _arith_env() -> Any:
    from orchestrator.api import load_config
    from orchestrator.environments import make

    return make(load_config({"orchestrator": ARITH_ENV}))


def _arith_accuracy(model: Any, tok: Any, prompts: list) -> float:
    """Greedy answers scored by the environment itself, over ``prompts`` (batched by prompt length: no padding)."""
    import torch

    from shared.builders import tiny_pair as tp

    env, right, by_len = _arith_env(), 0.0, {}
    for p in prompts:
        by_len.setdefault(len(tok(p.text).input_ids), []).append(p)
    model.eval()
    for group in by_len.values():
        ids = torch.tensor([tok(p.text).input_ids for p in group])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                 do_sample=False, eos_token_id=tp.EOS_ID, pad_token_id=tp.PAD_ID)
        for p, completion in zip(group, out[:, ids.shape[1]:]):
            right += env.score(p, tok.decode(completion, skip_special_tokens=True))
    model.train()
    return right / len(prompts)


def _train_arith(shape: tuple[int, int, int, int], stop_at: float, seed: int) -> tuple[Any, dict]:
    """Train a model of ``shape`` (hidden, layers, heads, mlp) on the training split until its accuracy on
    200 held-out prompts reaches ``stop_at`` (checked every 25 steps) or the schedule ends."""
    import torch
    from transformers import LlamaForCausalLM

    from shared.builders import tiny_pair as tp

    r = ARITH_RECIPE
    spec = tp.ModelSpec(hidden_size=shape[0], num_hidden_layers=shape[1], num_attention_heads=shape[2],
                        intermediate_size=shape[3])
    sched = tp.TrainSpec(lr=r["lr"], batch_size=r["batch"], warmup_steps=100, schedule_steps=r["steps"],
                         eval_every=25, stop_at_val_accuracy=stop_at)
    tok, env, rng = arith_tokenizer(), _arith_env(), random.Random(f"tiny-arith-{seed}")
    heldout = env.eval_prompts(200)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.config(len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=sched.lr, betas=sched.betas, weight_decay=sched.weight_decay)
    t0, acc, step = time.perf_counter(), 0.0, 0
    while step < sched.schedule_steps and acc < stop_at:
        rows = []
        for p in (env.generate(rng) for _ in range(sched.batch_size)):  # the training split only
            prompt, answer = tok(p.text).input_ids, tok(p.answer, add_special_tokens=False).input_ids + [tp.EOS_ID]
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([x + [tp.PAD_ID] * (width - len(x)) for x, _ in rows])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
        for g in opt.param_groups:
            g["lr"] = sched.lr_at(step)
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), sched.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % sched.eval_every == 0:
            acc = _arith_accuracy(model, tok, heldout)
            print(f"  step {step}: held-out accuracy {acc:.3f}", file=sys.stderr, flush=True)
    return model, {"train_steps": step, "heldout_accuracy": acc, "train_seconds": round(time.perf_counter() - t0, 1),
                   "n_params": sum(p.numel() for p in model.parameters())}


def build_arith_pair(root: Path | None = None) -> tuple[Path, Path]:
    """(teacher_dir, student_dir) of the tiny arithmetic pair, built once (~2-4 min) and cached."""
    import hashlib

    import torch

    from shared.builders import tiny_pair as tp

    root = root or tp.default_root()
    tag = hashlib.sha256(json.dumps(ARITH_RECIPE, sort_keys=True).encode()).hexdigest()[:8]
    dirs = [root / f"tiny-arith-{role}-{tag}" for role in ("teacher", "student")]
    if all((d / tp.BUILD_MARKER).is_file() for d in dirs):
        return dirs[0], dirs[1]
    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reverse pair: one thread keeps the weights machine-independent
    try:
        for d, role in zip(dirs, ("teacher", "student")):
            if (d / tp.BUILD_MARKER).is_file():  # built by an earlier, interrupted build
                continue
            print(f"building the tiny arithmetic {role} (cached in {d})", file=sys.stderr, flush=True)
            model, info = _train_arith(ARITH_RECIPE[role], ARITH_RECIPE[f"{role}_stop"], seed=0)
            if role == "teacher" and info["heldout_accuracy"] < 0.9:
                raise RuntimeError(f"arithmetic teacher reached only {info['heldout_accuracy']:.3f} held-out accuracy")
            tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-", dir=root))
            model.save_pretrained(tmp)
            arith_tokenizer().save_pretrained(tmp)
            (tmp / tp.BUILD_MARKER).write_text(json.dumps({"role": role, **info, "recipe": tag}, indent=1) + "\n")
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
    finally:
        torch.set_num_threads(threads)
    return dirs[0], dirs[1]


# ------------------------------------------------------------------------------------------------
# Running


def task_configs(budget: Budget, out: Path, tasks: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Task name -> (environment name, the session's config as a dict on top of the reverse_text experiment)."""
    common = {"max_steps": budget.steps, "wandb": {"mode": "disabled"},
              "orchestrator": {"batch_size": budget.batch_size, "group_size": budget.group_size,
                               "eval": {"interval": budget.eval_every, "num_prompts": budget.eval_prompts}},
              "trainer": {"lr": budget.lr, "lr_schedule": "constant", "warmup_steps": budget.warmup_steps}}
    configs = {"reverse_text": ("reverse_text", {**common, "output_dir": str(out / "reverse_text")})}
    if "arithmetic" in tasks:
        teacher, student = build_arith_pair()
        configs["arithmetic"] = ("arithmetic", {
            **common, "output_dir": str(out / "arithmetic"),
            "model": {"name": str(student), "max_model_len": 32}, "teacher": {"name": str(teacher)},
            "inference": {"max_tokens": 6},
            "orchestrator": {**common["orchestrator"], **ARITH_ENV}})
    return {task: configs[task] for task in tasks}


def run_task(task: str, env: str, base: dict[str, Any], budget: Budget) -> tuple[list[Curve], float, dict]:
    """Every method x seed of one task in one session; (curves, teacher accuracy, start-up seconds)."""
    from orchestrator.api import Session
    from shared.metrics import read_metrics

    experiment = ROOT / "experiments" / "reverse_text" / "rl.toml"
    curves, teacher = [], math.nan
    out = Path(base["output_dir"])
    with Session(experiment, base) as session:
        for seed in budget.seeds:
            for method, overrides in METHODS.items():
                first = not curves
                t0 = time.perf_counter()
                result = session.run(overrides=overrides, seed=seed, output_dir=str(out / f"{method}_s{seed}"),
                                     orchestrator={"eval_baseline": first})
                rows = read_metrics(result.output_dir / "metrics.jsonl")
                if first:
                    teacher = next(r[f"eval/{env}/baseline_teacher/avg"] for r in rows
                                   if f"eval/{env}/baseline_teacher/avg" in r)
                curves.append(curve_from_rows(rows, env, task, method, seed, time.perf_counter() - t0))
                c = curves[-1]
                print(f"{task} {method} seed {seed}: accuracy {c.accuracy[0]:.2f} -> {c.accuracy[-1]:.2f} "
                      f"({c.wall_s:.0f} s)", file=sys.stderr, flush=True)
        startup = dict(session.startup)
    return curves, teacher, startup


# ------------------------------------------------------------------------------------------------
# Reporting


def summarize(curves: list[Curve], teachers: dict[str, float], budget: Budget) -> list[dict[str, Any]]:
    """One row per task x method: start/final accuracy, steps and tokens to reach, per seed and median."""
    rows = []
    for task, teacher in teachers.items():
        target = REACH * teacher
        for method in METHODS:
            runs = [c for c in curves if c.task == task and c.method == method]
            if not runs:
                continue
            reached = [steps_to_reach(c.steps, c.accuracy, target) for c in runs]
            tokens = [None if s is None else c.tokens[c.steps.index(s)] for c, s in zip(runs, reached)]
            finals = [c.accuracy[-1] for c in runs]
            start = statistics.fmean(c.accuracy[0] for c in runs)
            half = start + HALF * (teacher - start)
            half_steps = [steps_to_reach(c.steps, c.accuracy, half) for c in runs]
            rows.append({
                "task": task, "method": method, "teacher": teacher, "target": target, "start": start,
                "half_target": half, "half_steps": half_steps, "median_half_steps": median_steps(half_steps),
                "final_mean": statistics.fmean(finals), "final_sd": statistics.pstdev(finals),
                "steps": reached, "median_steps": median_steps(reached),
                "median_tokens": median_steps([None if t is None else round(t) for t in tokens]),
                "tokens_per_step": statistics.fmean(c.tokens[-1] / max(c.steps[-1], 1) for c in runs),
                "wall_s": statistics.fmean(c.wall_s for c in runs),
            })
    return rows


def _steps_cell(steps: list[int | None]) -> str:
    return ", ".join("—" if s is None else str(s) for s in steps)


def _median_cell(value: float, fmt: str = "{:.0f}") -> str:
    return fmt.format(value) if math.isfinite(value) else "not reached"


def markdown(rows: list[dict], ratios: dict[str, tuple[str, float]], meta: dict[str, Any], budget: Budget) -> str:
    lines = [f"# Sample efficiency ({meta['date']})", "",
             f"Machine: {meta['machine']}; load average before / after: {meta['load_before']} / {meta['load_after']}; "
             f"wall time {meta['wall_s']:.0f} s; command: `{meta['command']}`.", "",
             f"{budget.steps} steps of {budget.batch_size} prompts x {budget.group_size} samples, lr {budget.lr:g} "
             f"(linear warm-up over {budget.warmup_steps} steps, then constant), LoRA as in experiments/reverse_text/rl.toml; held-out accuracy (greedy, "
             f"{budget.eval_prompts} prompts) every {budget.eval_every} steps; seeds {', '.join(map(str, budget.seeds))}. "
             f"'Reached' = first evaluation with accuracy >= {REACH} x the teacher's ('—': not within the budget).", "",
             "| task | method | teacher | target | start | final (mean ± sd) | steps to target, per seed | "
             "median steps | median sampled tokens | steps to half-gap, per seed | sampled tokens/step | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['teacher']:.3f} | {r['target']:.3f} | {r['start']:.3f} | "
                     f"{r['final_mean']:.3f} ± {r['final_sd']:.3f} | {_steps_cell(r['steps'])} | "
                     f"{_median_cell(r['median_steps'])} | {_median_cell(r['median_tokens'])} | "
                     f"{_steps_cell(r['half_steps'])} | {r['tokens_per_step']:.0f} | {r['wall_s']:.0f} |")
    lines += ["", "Sampled tokens are the student's own completions, except for sft (the teacher's samples). "
              f"Half-gap: accuracy >= start + {HALF:g} x (teacher - start), a secondary target.", "",
              "| task | RL steps / OPD steps, to target (median) | to half-gap (median) |", "|---|---|---|"]
    for task, pair in ratios.items():
        lines.append(f"| {task} | {' | '.join(_ratio_cell(*r) for r in pair)} |")
    return "\n".join(lines) + "\n"


def _ratio_cell(kind: str, value: float) -> str:
    return "n/a (neither reached)" if kind == "n/a" else f"{'' if kind == '=' else kind + ' '}{value:.2f}"


def ratios_of(rows: list[dict], budget: int) -> dict[str, tuple[tuple[str, float], tuple[str, float]]]:
    """Per task: RL/OPD step ratio to the target and to the half-gap target (:func:`step_ratio`)."""
    by = {(r["task"], r["method"]): r for r in rows}
    return {task: (step_ratio(by[task, "rl"]["steps"], by[task, "opd"]["steps"], budget),
                   step_ratio(by[task, "rl"]["half_steps"], by[task, "opd"]["half_steps"], budget))
            for task, method in by if method == "opd"}


def plot(curves: list[Curve], teachers: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS, ("tab:blue", "tab:red", "tab:purple", "tab:green")))
    fig, axes = plt.subplots(len(teachers), 2, figsize=(11, 4 * len(teachers)), squeeze=False)
    for row, (task, teacher) in zip(axes, teachers.items()):
        for ax, xkey, xlabel in ((row[0], "steps", "training step"),
                                 (row[1], "tokens", "sampled completion tokens (teacher's for sft)")):
            for c in (c for c in curves if c.task == task):
                ax.plot(getattr(c, xkey), c.accuracy, color=colors[c.method], alpha=0.8, lw=1.2,
                        label=c.method if c.seed == min(x.seed for x in curves) else None)
            ax.axhline(teacher, color="black", ls="--", lw=1, label="teacher")
            ax.axhline(REACH * teacher, color="gray", ls=":", lw=1, label=f"{REACH:g} x teacher")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(task)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reverse_text only, 2 seeds x 3 steps: a pipeline check")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the results go")
    ap.add_argument("--runs", type=Path, default=None, help="where the runs' outputs go (default: a temporary dir)")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                    help="default: both (--quick: reverse_text); arithmetic builds its pair on first use")
    args = ap.parse_args(argv)
    tasks = args.tasks or (TASKS[:1] if args.quick else TASKS)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    budget = QUICK if args.quick else FULL
    t0, load_before = time.perf_counter(), _load()
    runs = args.runs or Path(tempfile.mkdtemp(prefix="sample_efficiency_"))
    curves, teachers, startup = [], {}, {}
    for task, (env, base) in task_configs(budget, runs, tasks).items():
        task_curves, teachers[task], startup[task] = run_task(task, env, base, budget)
        curves += task_curves
        md = write_results(args.out, curves, teachers, budget, {  # after each task: a late failure keeps the first
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, float32",
            "load_before": load_before, "load_after": _load(), "wall_s": time.perf_counter() - t0,
            "command": " ".join(["python benchmarks/sample_efficiency.py", *(argv if argv is not None else sys.argv[1:])]),
            "startup_s": startup}, args.quick)
    if args.runs is None:
        shutil.rmtree(runs, ignore_errors=True)
    print(md.read_text(encoding="utf-8"))
    return 0


def write_results(out: Path, curves: list[Curve], teachers: dict[str, float], budget: Budget, meta: dict[str, Any],
                  quick: bool) -> Path:
    """``sample_efficiency_<date>[_quick].md`` / ``.json`` / ``.png`` in ``out``; the path of the table."""
    rows = summarize(curves, teachers, budget)
    ratios = ratios_of(rows, budget.steps)
    stem = f"sample_efficiency_{meta['date']}{'_quick' if quick else ''}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown(rows, ratios, meta, budget), encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(_finite({
        "meta": meta, "budget": asdict(budget), "teachers": teachers, "ratios": ratios, "rows": rows,
        "curves": [asdict(c) for c in curves]}), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    plot(curves, teachers, out / f"{stem}.png")
    return out / f"{stem}.md"


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float (not reached, no value) as null: strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
