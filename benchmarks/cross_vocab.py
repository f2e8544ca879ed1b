"""Cross-vocabulary distillation: the tiny student from a teacher with another vocabulary, beside the same-vocabulary pair.

    python benchmarks/cross_vocab.py                        # 2 runs of experiments/cross_vocab/rl.toml (120 steps)
    python benchmarks/cross_vocab.py --steps 3 --out /tmp/cv   # a quick check of the pipeline

Runs (same student, prompts, steps and seed; ``rl`` as a subprocess each):

- ``cross``: teacher ``tiny-reverse-teacher-pairs`` (letter pairs) with ``teacher.vocabulary = "align"``;
- ``same``: teacher ``tiny-reverse-teacher`` (the student's characters) with ``teacher.vocabulary = "same"``.

(That one-to-one groups give the same-vocabulary estimator bit for bit is checked in tests/test_align.py and,
through ``vllm serve``, in tests/test_endpoint.py; a whole run of the same pair under ``"align"`` is not identical,
because the untrained student samples padding tokens its own tokenizer cannot re-encode: ``align/respelled``.)

Per run: held-out accuracy (greedy, 100 prompts) at step 0 and at the end, ``teacher_kl`` (and ``align/kl``) as the
mean over the first and the last 10 steps, the fraction of student tokens in groups that are not one-to-one, and
the wall time.  Writes ``cross_vocab_<date>.md`` and ``.json`` to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "experiments/cross_vocab/rl.toml"
RUNS = {
    "cross": ["--teacher.name", "tiny-reverse-teacher-pairs", "--teacher.vocabulary", "align"],
    "same": ["--teacher.name", "tiny-reverse-teacher", "--teacher.vocabulary", "same"],
}
WINDOW = 10  # steps averaged at the start and at the end


def run_rl(name: str, args: list[str], steps: int, runs: Path, reuse: bool = False) -> dict[str, Any]:
    """One run (or, with ``reuse``, the finished run already in ``runs/<name>``; its wall time from its files:
    config.toml is written first, metrics.jsonl last)."""
    out = runs / name
    if reuse:
        seconds = (out / "metrics.jsonl").stat().st_mtime - (out / "config.toml").stat().st_mtime
        return {"args": args, "steps": steps, "seconds": round(seconds, 1), "reused": True, **summarise(out)}
    shutil.rmtree(out, ignore_errors=True)
    rl = str(Path(sys.executable).parent / "rl")
    cmd = [rl, "@", CONFIG, "--max_steps", str(steps), "--output_dir", str(out), "--wandb.mode", "disabled",
           "--orchestrator.eval.interval", str(steps), *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{name}: rl exited with {p.returncode}:\n{p.stderr[-3000:]}")
    return {"args": args, "steps": steps, "seconds": round(time.perf_counter() - t0, 1), **summarise(out)}


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def summarise(out: Path) -> dict[str, Any]:
    """The numbers of one run from its metrics.jsonl (module docstring)."""
    from shared.metrics import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "teacher_kl" in r]
    evals = {r["step"]: r["eval/reverse_text/avg"] for r in rows if "eval/reverse_text/avg" in r}
    first, last = train[:WINDOW], train[-WINDOW:]
    return {
        "accuracy_start": evals[min(evals)], "accuracy_end": evals[max(evals)],
        "teacher_kl_first": _mean(first, "teacher_kl"), "teacher_kl_last": _mean(last, "teacher_kl"),
        "align_kl_first": _mean(first, "align/kl"), "align_kl_last": _mean(last, "align/kl"),
        "multi_token_frac": _mean(train, "align/multi_token_frac"),
        "teacher_per_student": _mean(train, "align/teacher_per_student"),
        "align_respelled": sum(r.get("align/respelled", 0.0) for r in train),
        "teacher_kl_per_step": [r["teacher_kl"] for r in train],
        "seq_len_per_step": [r.get("seq_len/mean") for r in train],
    }


def teacher_accuracy(alias: str) -> float:
    from shared import models
    from shared.builders.tiny_pair import read_build_info

    return read_build_info(models.resolve(alias, "teacher.name"))["heldout_accuracy"]


def _f(x: float | None, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def report(result: dict[str, Any]) -> str:
    lines = [f"# Cross-vocabulary on-policy distillation ({result['date']})", "",
             f"Machine: {result['machine']}; load average before / after: {result['load_before']} / "
             f"{result['load_after']}; wall time {result['wall_s']:.0f} s; command: `{result['command']}`.", "",
             f"`{CONFIG}` ({result['steps']} steps of 32 prompts x 4 samples, seed 0): the tiny reverse-text student "
             "distilled from a teacher with another vocabulary (letter pairs, `teacher.vocabulary = \"align\"`) and "
             "from the same-vocabulary teacher (characters), everything else equal. Accuracy: held-out, greedy, "
             f"100 prompts. KL columns: mean over the first / last {WINDOW} steps, per student token; `align/kl` is the "
             "sum over aligned groups of S_G - T_G, `teacher_kl` the same after `trainer.loss.logprob_floor` (-20) "
             "clips the mapped teacher log-probs.", "",
             "| run | teacher (held-out acc) | vocabulary | accuracy start → end | teacher_kl first → last | "
             "align/kl first → last | tokens in multi-token groups | teacher tokens / student token | "
             "completions respelled | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in RUNS:
        r = result["runs"][name]
        teacher = r["args"][1]
        lines.append(f"| {name} | {teacher} ({result['teacher_accuracy'][teacher]:.3f}) | {r['args'][3]} | "
                     f"{_f(r['accuracy_start'], 2)} → {_f(r['accuracy_end'], 2)} | {_f(r['teacher_kl_first'])} → "
                     f"{_f(r['teacher_kl_last'])} | {_f(r['align_kl_first'])} → {_f(r['align_kl_last'])} | "
                     f"{_f(r['multi_token_frac'])} | {_f(r['teacher_per_student'])} | "
                     f"{r['align_respelled']:.0f} | {r['seconds']:.0f}{' (reused run)' if r.get('reused') else ''} |")
    cross, same = result["runs"]["cross"], result["runs"]["same"]
    lines += ["", f"Cross-vocabulary: held-out accuracy {cross['accuracy_start']:.2f} → {cross['accuracy_end']:.2f} "
              f"({'up' if cross['accuracy_end'] > cross['accuracy_start'] else 'NOT up'}), aligned KL "
              f"{_f(cross['align_kl_first'])} → {_f(cross['align_kl_last'])} "
              f"({'down' if cross['align_kl_last'] < cross['align_kl_first'] else 'NOT down'}); same vocabulary: "
              f"{same['accuracy_start']:.2f} → {same['accuracy_end']:.2f}, teacher_kl {_f(same['teacher_kl_first'])} → "
              f"{_f(same['teacher_kl_last'])}. 'Completions respelled': summed over the steps, completions with a "
              "token the teacher's tokenizer spells otherwise (the student's unreachable `<extra_i>` padding tokens; "
              "that stretch is one group).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--runs", type=Path, default=None, help="where the runs' output_dirs go (default: a temp dir)")
    parser.add_argument("--reuse", nargs="*", default=[], choices=list(RUNS),
                        help="runs already finished in --runs (same code and steps) to read instead of rerunning")
    args = parser.parse_args(argv)
    runs = args.runs or Path(tempfile.mkdtemp(prefix="cross_vocab_"))
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "steps": args.steps,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, float32",
        "command": "python " + " ".join(["benchmarks/cross_vocab.py", *(argv if argv is not None else sys.argv[1:])]),
        "teacher_accuracy": {a: teacher_accuracy(a) for a in ("tiny-reverse-teacher-pairs", "tiny-reverse-teacher")},
        "runs": {name: run_rl(name, extra, args.steps, runs, name in args.reuse) for name, extra in RUNS.items()},
    }
    result.update(wall_s=time.perf_counter() - t0, load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
                  load_before=load_before)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cross_vocab_{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
