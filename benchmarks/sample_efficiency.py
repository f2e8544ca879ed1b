"""Sample efficiency: on-policy distillation against RL, hybrid and SFT, at the same student, prompts and steps.

    python benchmarks/sample_efficiency.py               # reverse_text and arithmetic, 4 methods x 3 seeds (< 20 min)
    python benchmarks/sample_efficiency.py --quick       # reverse_text, 4 methods x 2 seeds x 3 steps: checks the
                                                         # pipeline writes well-formed results (<= 2 min)
    python benchmarks/sample_efficiency.py --budget full   # running_sum, the long-horizon task: a 40-step learning-
                                                         # rate sweep per method, then the best rate for 150 steps
                                                         # on 3 seeds (about 70 minutes)
    python benchmarks/sample_efficiency.py --budget tiny   # running_sum end to end in a few minutes (smoke test)

Methods (every other setting equal; ``shared/advantages.py`` has the algebra):

- ``opd``: on-policy distillation, the per-token reverse-KL advantage ``logp_T - logp_S`` (kl_coef 1);
- ``rl``: the task's verifiable reward only, ``A = R - mean of R over the prompt's group`` (adv_tau 1, kl 0);
- ``hybrid``: both (adv_tau 1, kl_coef 1);
- ``sft``: off-policy distillation, the NLL of the teacher's own samples (``orchestrator.workflow = "sft"``).

They are data (:data:`METHODS`: the run's overrides, what the teacher does per sampled token, a colour), so a
new one, such as OPD with a top-k teacher estimator once the trainer has that loss option, is one entry.

Tasks: ``reverse_text`` on the tiny reverse pair (``experiments/reverse_text/rl.toml``), and two-digit
addition (the ``arithmetic`` environment) on a tiny arithmetic pair built here on first use and cached
next to the reverse pair: the reverse pair's character vocabulary has no digits and no capitals, so it
cannot read ``What is 37 + 12?``, and SmolLM2-135M would take ~1 min a step (README), 24 runs far over
budget.  The pair is built the way ``shared/builders/tiny_pair.py`` builds its own: a teacher trained on the
environment's training split until it solves the held-out split, a smaller student stopped early.
``running_sum`` is the long-horizon task (``shared/builders/tiny_long.py``, its pair built on first use):
answers of 16 dependent steps (32 tokens), where one wrong step makes every later one wrong; its evaluations also log a
partial credit (the fraction of steps right before the first wrong one).

All runs of a task share one start of the roles (``orchestrator.api.Session``): each run begins from the
base student with a LoRA adapter and optimizer drawn from its seed.  Per run the held-out accuracy
(greedy, 100 prompts) is read every ``eval_every`` steps; a method "reaches" the teacher at the first
evaluation with accuracy >= 0.9 x the teacher's.  With several learning rates (``Budget.lrs``), every method
runs every rate on ``Budget.sweep_seeds``, and the best rate per method (:func:`sweep_key`, the same rule for
every method: fewest median steps to the target, then the highest mean accuracy over the curve) runs the
remaining seeds; with ``Budget.sweep_steps`` the sweep runs are shorter than the budget, and the best rate
then runs every seed (the sweep's included) for the whole budget.  Steps to the target are also counted in sampled tokens and in teacher tokens, a compute
proxy: the tokens the teacher scores (opd, hybrid) or samples (sft); rl uses none.  Writes
``sample_efficiency_<date>[_<budget>].md`` (tables), ``.json`` (every curve) and ``.png`` (accuracy against
steps and against sampled tokens; partial credit against steps where logged) to ``--out``.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Method:
    """A training method: the run's config overrides, and what the teacher does per sampled token
    (``"scored"``: scores it, ``"sampled"``: samples it, ``"none"``), for the teacher-token count."""

    overrides: dict[str, Any]
    teacher: str
    color: str


OPD = {"trainer.loss.adv_tau": 0.0, "trainer.loss.kl_coef": 1.0}
METHODS: dict[str, Method] = {
    "opd": Method(OPD, "scored", "tab:blue"),
    "rl": Method({"trainer.loss.adv_tau": 1.0, "trainer.loss.kl_coef": 0.0}, "none", "tab:red"),
    "hybrid": Method({"trainer.loss.adv_tau": 1.0, "trainer.loss.kl_coef": 1.0}, "scored", "tab:purple"),
    "sft": Method({"trainer.loss.adv_tau": 0.0, "trainer.loss.kl_coef": 0.0, "orchestrator.workflow": "sft"}, "sampled",
                  "tab:green"),
    # OPD with the top-k teacher estimator (trainer/topk.py): the teacher's 8 most likely tokens + a tail bucket
    "opd_topk": Method({**OPD, "trainer.loss.teacher_topk": 8}, "scored", "tab:cyan"),
}
QUICK_METHODS = ("opd", "rl", "hybrid", "sft")  # --quick: a pipeline check of the four losses
TASKS = ("reverse_text", "arithmetic", "running_sum")
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
    lrs: tuple[float, ...] = ()  # a learning-rate sweep (every method, every rate, on sweep_seeds); () = lr alone
    sweep_seeds: tuple[int, ...] = ()  # the seeds of the sweep; () = all of seeds
    sweep_steps: int = 0  # the sweep's runs' length; 0 = steps (the sweep's runs then count as results too)

    @property
    def rates(self) -> tuple[float, ...]:
        return self.lrs or (self.lr,)

    @property
    def sweep(self) -> tuple[int, ...]:
        return self.sweep_seeds or self.seeds


FULL = Budget(steps=60, eval_every=10, seeds=(0, 1, 2))  # every 5: +3 min, over the 20-minute budget on first use
QUICK = Budget(steps=3, eval_every=1, seeds=(0, 1), eval_prompts=16, batch_size=8, warmup_steps=0)
# running_sum: 3 rates x 4 methods on seed 0, then the best rate per method on seeds 1 and 2 (20 runs)
LONG_RATES = (3e-4, 1e-3, 3e-3)  # 2e-3 was too high for every on-policy method on the short tasks (README)
BUDGETS = {
    "tiny": Budget(steps=3, eval_every=1, seeds=(0, 1), sweep_seeds=(0,), lrs=(1e-3, 3e-3), eval_prompts=16,
                   batch_size=8, warmup_steps=0),
    "smoke": Budget(steps=20, eval_every=5, seeds=(0, 1, 2), sweep_seeds=(0,), lrs=LONG_RATES, eval_prompts=50,
                    batch_size=8, warmup_steps=5),
    "medium": Budget(steps=60, eval_every=10, seeds=(0, 1, 2), sweep_seeds=(0,), lrs=LONG_RATES, batch_size=16),
    # the sweep in runs of 40 steps, then the best rate per method for 150 steps on 3 seeds: 15 x 40 + 15 x 150
    # steps, ~1.3 s each on 2 cores (running_sum's 34-token answers) (medium: no method reached the target in 60)
    "full": Budget(steps=150, eval_every=10, seeds=(0, 1, 2), sweep_seeds=(0,), lrs=LONG_RATES, batch_size=16,
                   sweep_steps=40),
}


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


def median_steps(per_seed: Sequence[int | float | None]) -> float:
    """Median over seeds, a seed that never reached counting as infinitely many steps (inf if half or more did not)."""
    return statistics.median(math.inf if s is None else float(s) for s in per_seed)


def reach_ratio(other: Sequence[float | None], opd: Sequence[float | None], other_cap: float,
                opd_cap: float) -> tuple[str, float]:
    """``other`` / OPD from the median (over seeds) cost to reach the target, where a cost is steps or tokens:
    ``("=", r)`` when both reached; ``(">", r)`` (a lower bound: ``other`` counted at its whole run's cost
    ``other_cap``) when only OPD did; ``("<", r)`` (OPD counted at ``opd_cap``) when only ``other`` did; else
    ``("n/a", nan)``."""
    r, o = median_steps(other), median_steps(opd)
    if math.isfinite(r) and math.isfinite(o):
        return "=", r / o
    if math.isfinite(o):
        return ">", other_cap / o
    if math.isfinite(r):
        return "<", r / opd_cap
    return "n/a", math.nan


def step_ratio(rl: Sequence[int | None], opd: Sequence[int | None], budget: int) -> tuple[str, float]:
    """RL steps / OPD steps to the target (:func:`reach_ratio`, both capped at the ``budget`` of steps)."""
    return reach_ratio(rl, opd, budget, budget)


def sweep_key(steps_per_seed: Sequence[int | None], mean_accuracy: float) -> tuple[float, float]:
    """How a learning rate ranks in the sweep (smaller is better): the median steps to the target over the sweep
    seeds (inf: not reached), then the accuracy averaged over the whole curve (higher is better)."""
    return median_steps(steps_per_seed), -mean_accuracy


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
    lr: float = math.nan
    partial: list[float] = field(default_factory=list)  # partial credit at each evaluation, where the task logs it
    teacher_tokens: list[float] = field(default_factory=list)  # tokens the teacher scored or sampled up to each
    sweep: bool = False  # a run of a shorter sweep (Budget.sweep_steps): in the sweep table only


def curve_from_rows(rows: list[dict], env: str, task: str, method: str, seed: int, wall_s: float,
                    lr: float = math.nan, uses_teacher: bool = True) -> Curve:
    """A :class:`Curve` from a run's metrics.jsonl rows (``eval/<env>/avg`` rows, ``eval/<env>/partial`` where
    logged, and per-step ``tokens/step``); ``uses_teacher``: the teacher handles every sampled token."""
    key, pkey = f"eval/{env}/avg", f"eval/{env}/partial"
    train = sorted((r for r in rows if "tokens/step" in r), key=lambda r: r["step"])
    sums = dict(zip((r["step"] for r in train), cumulative([r["tokens/step"] for r in train])))
    evals = sorted(((r["step"], r[key], r.get(pkey)) for r in rows if key in r), key=lambda e: e[0])
    kl = [r["teacher_kl"] for r in train if r.get("teacher_kl") is not None]
    tokens = [max((v for k, v in sums.items() if k <= s), default=0.0) for s, _, _ in evals]
    partial = [p for _, _, p in evals] if evals and all(p is not None for _, _, p in evals) else []
    return Curve(task, method, seed, [s for s, _, _ in evals], [a for _, a, _ in evals], tokens, wall_s,
                 statistics.fmean(kl[-3:]) if kl else math.nan, lr, partial,
                 tokens if uses_teacher else [0.0] * len(tokens))


# ------------------------------------------------------------------------------------------------
# The tiny arithmetic pair: "What is a + b?" -> "c" with a, b in 0..99


ARITH_ENV = {"environment": "arithmetic",
             "env_args": {"arithmetic": {"min_operand": 0, "max_operand": 99, "operators": ["+"], "terms": 2}}}
ARITH_CHARS = string.digits + string.ascii_letters + " +-*()=?.,"
ARITH_RECIPE = {"version": 1, "teacher": (128, 4, 4, 256), "student": (128, 2, 4, 256), "lr": 3e-3, "batch": 128,
                "steps": 4000, "teacher_stop": 0.97, "student_stop": 0.2, "env": ARITH_ENV}


def arith_tokenizer() -> Any:
    """A character tokenizer for the arithmetic prompts, with the reverse pair's special tokens and ids."""
    from shared.builders import tiny_long, tiny_pair

    return tiny_long.char_tokenizer(ARITH_CHARS, tiny_pair.MAX_POSITIONS)


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
    if "running_sum" in tasks:
        from shared.builders import tiny_long

        teacher, student = tiny_long.build_pair()
        configs["running_sum"] = ("running_sum", {
            **common, "output_dir": str(out / "running_sum"),
            "model": {"name": str(student), "max_model_len": tiny_long.MAX_POSITIONS}, "teacher": {"name": str(teacher)},
            "inference": {"max_tokens": 2 * tiny_long.MAX_DIGITS + 2},  # room to overrun the answer by a token, EOS
            "orchestrator": {**common["orchestrator"], "environment": "running_sum"}})
    return {task: configs[task] for task in tasks}


def run_task(task: str, env: str, base: dict[str, Any], budget: Budget,
             methods: Sequence[str] = tuple(METHODS)) -> tuple[list[Curve], float, dict, dict[str, float]]:
    """Every method of one task in one session: each rate of the sweep on ``budget.sweep``, then the best rate
    per method (:func:`best_rates`) on the other seeds; (curves, teacher accuracy, start-up seconds, best rates)."""
    from orchestrator.api import Session
    from shared.metrics import read_metrics

    experiment = ROOT / "experiments" / "reverse_text" / "rl.toml"
    curves, teacher = [], math.nan
    out = Path(base["output_dir"])
    with Session(experiment, base) as session:

        def one(method: str, lr: float, seed: int, sweep: bool = False) -> None:
            nonlocal teacher
            first = not curves
            t0 = time.perf_counter()
            steps = {"max_steps": budget.sweep_steps} if sweep else {}
            result = session.run(overrides={**METHODS[method].overrides, "trainer.lr": lr}, seed=seed,
                                 output_dir=str(out / f"{method}_lr{lr:g}_s{seed}{'_sweep' if sweep else ''}"),
                                 orchestrator={"eval_baseline": first}, **steps)
            rows = read_metrics(result.output_dir / "metrics.jsonl")
            if first:
                teacher = next(r[f"eval/{env}/baseline_teacher/avg"] for r in rows
                               if f"eval/{env}/baseline_teacher/avg" in r)
            curves.append(curve_from_rows(rows, env, task, method, seed, time.perf_counter() - t0, lr,
                                          METHODS[method].teacher != "none"))
            c = curves[-1]
            c.sweep = sweep
            print(f"{task} {method} lr {lr:g} seed {seed}{' (sweep)' if sweep else ''}: accuracy {c.accuracy[0]:.2f} -> {c.accuracy[-1]:.2f} "
                  f"({c.wall_s:.0f} s)", file=sys.stderr, flush=True)

        short = 0 < budget.sweep_steps < budget.steps
        for lr in budget.rates:
            for seed in budget.sweep:
                for method in methods:
                    one(method, lr, seed, sweep=short)
        best = best_rates(curves, task, teacher)
        for seed in (s for s in budget.seeds if short or s not in budget.sweep):
            for method in methods:
                one(method, best[method], seed)
        startup = dict(session.startup)
    return curves, teacher, startup, best


# ------------------------------------------------------------------------------------------------
# Reporting


def _auc(c: Curve) -> float:
    return statistics.fmean(c.accuracy)


def sweep_rows(curves: list[Curve], task: str, teacher: float) -> list[dict[str, Any]]:
    """One row per method x learning rate of ``task``, over the seeds every rate ran (the sweep seeds); the
    sweep's own runs alone when it had shorter ones (``Curve.sweep``)."""
    rows = []
    short = any(c.sweep for c in curves if c.task == task)
    for method in dict.fromkeys(c.method for c in curves if c.task == task):
        runs = [c for c in curves if c.task == task and c.method == method and c.sweep == short]
        rates = sorted({c.lr for c in runs})
        seeds = set.intersection(*({c.seed for c in runs if c.lr == lr} for lr in rates))
        for lr in rates:
            at = [c for c in runs if c.lr == lr and c.seed in seeds]
            steps = [steps_to_reach(c.steps, c.accuracy, REACH * teacher) for c in at]
            auc = statistics.fmean(_auc(c) for c in at)
            rows.append({"task": task, "method": method, "lr": lr, "seeds": sorted(seeds), "steps": steps,
                         "median_steps": median_steps(steps), "mean_accuracy": auc,
                         "final_mean": statistics.fmean(c.accuracy[-1] for c in at), "key": sweep_key(steps, auc)})
    return rows


def best_rates(curves: list[Curve], task: str, teacher: float) -> dict[str, float]:
    """Per method, the learning rate with the smallest :func:`sweep_key` (ties: the first rate, ascending)."""
    best: dict[str, dict[str, Any]] = {}
    for row in sweep_rows(curves, task, teacher):
        if row["method"] not in best or row["key"] < best[row["method"]]["key"]:
            best[row["method"]] = row
    return {m: row["lr"] for m, row in best.items()}


def summarize(curves: list[Curve], teachers: dict[str, float], budget: Budget,
              best: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """One row per task x method (its runs at the best rate, when ``best`` names one): start/final accuracy,
    steps, sampled tokens and teacher tokens to reach, per seed and median. A shorter sweep's runs are left out."""
    rows = []
    curves = [c for c in curves if not c.sweep]
    for task, teacher in teachers.items():
        target = REACH * teacher
        for method in dict.fromkeys([*METHODS, *(c.method for c in curves)]):
            lr = (best or {}).get(task, {}).get(method)
            runs = [c for c in curves if c.task == task and c.method == method and (lr is None or c.lr == lr)]
            if not runs:
                continue
            reached = [steps_to_reach(c.steps, c.accuracy, target) for c in runs]
            tokens = [None if s is None else c.tokens[c.steps.index(s)] for c, s in zip(runs, reached)]
            teacher_tokens = [None if s is None or not c.teacher_tokens else c.teacher_tokens[c.steps.index(s)]
                              for c, s in zip(runs, reached)]
            finals = [c.accuracy[-1] for c in runs]
            start = statistics.fmean(c.accuracy[0] for c in runs)
            half = start + HALF * (teacher - start)
            half_steps = [steps_to_reach(c.steps, c.accuracy, half) for c in runs]
            partial = [c.partial for c in runs if c.partial]
            rows.append({
                "task": task, "method": method, "lr": runs[0].lr, "seeds": [c.seed for c in runs],
                "teacher": teacher, "target": target, "start": start,
                "half_target": half, "half_steps": half_steps, "median_half_steps": median_steps(half_steps),
                "final_mean": statistics.fmean(finals), "final_sd": statistics.pstdev(finals),
                "steps": reached, "median_steps": median_steps(reached),
                "median_tokens": median_steps([None if t is None else round(t) for t in tokens]),
                "median_teacher_tokens": median_steps([None if t is None else round(t) for t in teacher_tokens]),
                "tokens_per_step": statistics.fmean(c.tokens[-1] / max(c.steps[-1], 1) for c in runs),
                "teacher_tokens_per_step": statistics.fmean(
                    c.teacher_tokens[-1] / max(c.steps[-1], 1) if c.teacher_tokens else math.nan for c in runs),
                "total_tokens": statistics.fmean(c.tokens[-1] for c in runs),
                "total_teacher_tokens": statistics.fmean(c.teacher_tokens[-1] if c.teacher_tokens else math.nan
                                                         for c in runs),
                "partial_start": statistics.fmean(p[0] for p in partial) if partial else math.nan,
                "partial_final": statistics.fmean(p[-1] for p in partial) if partial else math.nan,
                "wall_s": statistics.fmean(c.wall_s for c in runs),
            })
    return rows


def versus_opd(rows: list[dict], budget: int) -> list[dict[str, Any]]:
    """Per task and method other than opd: its cost to reach the target over OPD's, in steps, sampled tokens and
    teacher tokens (:func:`reach_ratio`; a method that uses no teacher has no teacher-token ratio)."""
    by = {(r["task"], r["method"]): r for r in rows}
    out = []
    for (task, method), r in by.items():
        o = by.get((task, "opd"))
        if o is None or method == "opd":
            continue
        uses_teacher = METHODS[method].teacher != "none" if method in METHODS else True
        out.append({
            "task": task, "method": method,
            "steps": reach_ratio(r["steps"], o["steps"], budget, budget),
            "tokens": reach_ratio([r["median_tokens"]], [o["median_tokens"]], r["total_tokens"], o["total_tokens"]),
            "teacher_tokens": reach_ratio([r["median_teacher_tokens"]], [o["median_teacher_tokens"]],
                                          r["total_teacher_tokens"], o["total_teacher_tokens"])
            if uses_teacher else ("none", math.nan),
        })
    return out


def _steps_cell(steps: list[int | None]) -> str:
    return ", ".join("—" if s is None else str(s) for s in steps)


def _median_cell(value: float, fmt: str = "{:.0f}") -> str:
    return fmt.format(value) if math.isfinite(value) else "not reached"


def _num(value: float, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if math.isfinite(value) else "—"


def markdown(rows: list[dict], ratios: dict[str, tuple[str, float]], meta: dict[str, Any], budget: Budget,
             sweep: list[dict] | None = None, versus: list[dict] | None = None) -> str:
    rates = ", ".join(f"{lr:g}" for lr in budget.rates)
    lr_text = (f"lr {budget.lr:g}" if len(budget.rates) == 1 else
               f"the best of lr {rates} per method (swept on seed{'s' if len(budget.sweep) > 1 else ''} "
               f"{', '.join(map(str, budget.sweep))}"
               f"{f' in runs of {budget.sweep_steps} steps' if 0 < budget.sweep_steps < budget.steps else ''}; "
               "table below)")
    lines = [f"# Sample efficiency ({meta['date']}{', ' + meta['label'] if meta.get('label') else ''})", "",
             f"Machine: {meta['machine']}; load average before / after: {meta['load_before']} / {meta['load_after']}; "
             f"wall time {meta['wall_s']:.0f} s; command: `{meta['command']}`.", "",
             f"{budget.steps} steps of {budget.batch_size} prompts x {budget.group_size} samples, {lr_text} "
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
    if len(budget.rates) > 1 or any(math.isfinite(r["partial_final"]) for r in rows):
        lines += ["", "Compute to the target: teacher tokens are the completion tokens the teacher scored (opd, "
                  "hybrid; their prompts, scored with them, are not counted) or sampled (sft) before the evaluation "
                  "that reached it (rl: none). Partial credit: the fraction of "
                  "steps right before the first wrong one (greedy, the same prompts).", "",
                  "| task | method | lr | median teacher tokens to target | teacher tokens/step | "
                  "partial credit start -> final |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['task']} | {r['method']} | {r['lr']:g} | "
                         f"{'0 (no teacher)' if r['teacher_tokens_per_step'] == 0 else _median_cell(r['median_teacher_tokens'])} | "
                         f"{_num(r['teacher_tokens_per_step'], '{:.0f}')} | "
                         f"{_num(r['partial_start'])} -> {_num(r['partial_final'])} |")
    if versus:
        lines += ["", "Cost to the target over OPD's (median over seeds; '>': a lower bound, the method not reaching "
                  "it within the budget and counted at its whole run):", "",
                  "| task | method | steps / OPD's | sampled tokens / OPD's | teacher tokens / OPD's |",
                  "|---|---|---|---|---|"]
        for v in versus:
            lines.append(f"| {v['task']} | {v['method']} | {_ratio_cell(*v['steps'])} | {_ratio_cell(*v['tokens'])} | "
                         f"{_ratio_cell(*v['teacher_tokens'])} |")
    if sweep and len(budget.rates) > 1:
        lines += ["", f"Learning-rate sweep (seed{'s' if len(budget.sweep) > 1 else ''} "
                  f"{', '.join(map(str, budget.sweep))}"
                  f"{f', {budget.sweep_steps} steps' if 0 < budget.sweep_steps < budget.steps else ''}; "
                  "the best rate per method, "
                  "marked *, has the fewest median steps to the target, then the highest accuracy averaged over "
                  "the curve):", "",
                  "| task | method | lr | steps to target, per seed | mean accuracy over the curve | final |",
                  "|---|---|---|---|---|---|"]
        chosen = {(r["task"], r["method"], r["lr"]) for r in rows}
        for s in sweep:
            star = " *" if (s["task"], s["method"], s["lr"]) in chosen else ""
            lines.append(f"| {s['task']} | {s['method']} | {s['lr']:g}{star} | {_steps_cell(s['steps'])} | "
                         f"{s['mean_accuracy']:.3f} | {s['final_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def _ratio_cell(kind: str, value: float) -> str:
    if kind in ("n/a", "none"):
        return "n/a (neither reached)" if kind == "n/a" else "n/a (no teacher)"
    return f"{'' if kind == '=' else kind + ' '}{value:.2f}"


def ratios_of(rows: list[dict], budget: int) -> dict[str, tuple[tuple[str, float], tuple[str, float]]]:
    """Per task: RL/OPD step ratio to the target and to the half-gap target (:func:`step_ratio`)."""
    by = {(r["task"], r["method"]): r for r in rows}
    return {task: (step_ratio(by[task, "rl"]["steps"], by[task, "opd"]["steps"], budget),
                   step_ratio(by[task, "rl"]["half_steps"], by[task, "opd"]["half_steps"], budget))
            for task, method in by if method == "opd" and (task, "rl") in by}


def plot(curves: list[Curve], teachers: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("steps", "accuracy", "training step", "held-out accuracy"),
              ("tokens", "accuracy", "sampled completion tokens (teacher's for sft)", "held-out accuracy")]
    if any(c.partial for c in curves):
        panels.append(("steps", "partial", "training step", "partial credit (steps right before the first error)"))
    fig, axes = plt.subplots(len(teachers), len(panels), figsize=(5.5 * len(panels), 4 * len(teachers)), squeeze=False)
    for row, (task, teacher) in zip(axes, teachers.items()):
        for ax, (xkey, ykey, xlabel, ylabel) in zip(row, panels):
            for c in (c for c in curves if c.task == task and getattr(c, ykey)):
                color = METHODS[c.method].color if c.method in METHODS else None
                ax.plot(getattr(c, xkey), getattr(c, ykey), color=color, alpha=0.8, lw=1.2,
                        label=c.method if c.seed == min(x.seed for x in curves) else None)
            if ykey == "accuracy":
                ax.axhline(teacher, color="black", ls="--", lw=1, label="teacher")
                ax.axhline(REACH * teacher, color="gray", ls=":", lw=1, label=f"{REACH:g} x teacher")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
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
    ap.add_argument("--budget", choices=BUDGETS, default=None,
                    help="running_sum (default task) with a learning-rate sweep: tiny (3 steps: the pipeline, ~2 min), "
                         "smoke (20 steps of 8 prompts), medium (60 of 16), full (the sweep at 40 steps, then 150 of 16: "
                         "about 70 minutes on 2 cores)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the results go")
    ap.add_argument("--runs", type=Path, default=None, help="where the runs' outputs go (default: a temporary dir)")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                    help="default: reverse_text and arithmetic (--quick: reverse_text; --budget: running_sum); "
                         "arithmetic and running_sum build their pairs on first use")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help=f"default: all ({', '.join(METHODS)}; --quick: {', '.join(QUICK_METHODS)})")
    args = ap.parse_args(argv)
    args.methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    if args.quick and args.budget:
        ap.error("--quick and --budget: choose one")
    tasks = args.tasks or (TASKS[:1] if args.quick else TASKS[2:] if args.budget else TASKS[:2])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    budget = QUICK if args.quick else BUDGETS[args.budget] if args.budget else FULL
    suffix = "_quick" if args.quick else f"_{args.budget}" if args.budget else ""
    label = {"quick": "quick: a pipeline check, not a result", "tiny": "tiny budget: a pipeline check, not a result",
             "smoke": "smoke budget: the harness end to end and first numbers, too few steps to conclude",
             "medium": "medium budget: 60 steps, a third of a full run's compute"}.get(suffix[1:], "")
    t0, load_before = time.perf_counter(), _load()
    runs = args.runs or Path(tempfile.mkdtemp(prefix="sample_efficiency_"))
    curves, teachers, startup, best = [], {}, {}, {}
    for task, (env, base) in task_configs(budget, runs, tasks).items():
        task_curves, teachers[task], startup[task], best[task] = run_task(task, env, base, budget, args.methods)
        curves += task_curves
        md = write_results(args.out, curves, teachers, budget, {  # after each task: a late failure keeps the first
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, float32",
            "load_before": load_before, "load_after": _load(), "wall_s": time.perf_counter() - t0,
            "command": " ".join(["python benchmarks/sample_efficiency.py", *(argv if argv is not None else sys.argv[1:])]),
            "startup_s": startup, "label": label}, suffix, best)
    if args.runs is None:
        shutil.rmtree(runs, ignore_errors=True)
    print(md.read_text(encoding="utf-8"))
    return 0


def write_results(out: Path, curves: list[Curve], teachers: dict[str, float], budget: Budget, meta: dict[str, Any],
                  suffix: str = "", best: dict[str, dict[str, float]] | None = None) -> Path:
    """``sample_efficiency_<date><suffix>.md`` / ``.json`` / ``.png`` in ``out``; the path of the table."""
    rows = summarize(curves, teachers, budget, best)
    ratios = ratios_of(rows, budget.steps)
    sweep = [s for task, teacher in teachers.items() for s in sweep_rows(curves, task, teacher)]
    versus = versus_opd(rows, budget.steps)
    stem = f"sample_efficiency_{meta['date']}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown(rows, ratios, meta, budget, sweep, versus), encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(finite_json({
        "meta": meta, "budget": asdict(budget), "teachers": teachers, "best_lr": best or {}, "ratios": ratios,
        "versus_opd": versus, "rows": rows, "sweep": sweep, "curves": [asdict(c) for c in curves]}),
        indent=1, allow_nan=False) + "\n", encoding="utf-8")
    plot([c for c in curves if (best or {}).get(c.task, {}).get(c.method, c.lr) == c.lr and not c.sweep], teachers,
         out / f"{stem}.png")  # the best rate's runs
    return out / f"{stem}.md"


def finite_json(x: Any) -> Any:
    """``x`` with every non-finite float (not reached, no value) as null: strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
