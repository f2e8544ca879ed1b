"""End-of-run report: ``report.md`` (config, time per role, before/after table) and PNG plots.

Every file is written atomically (``shared.fsutil``) and the report's text has secrets redacted.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from orchestrator import skips
from shared.fsutil import atomic_write_bytes, atomic_write_text
from shared.metrics import read_metrics
from shared.redact import redact_text

PLOTS = [
    ("teacher_kl", "teacher KL (nats/token)", "teacher_kl.png"),
    ("reward/mean", "task reward (mean)", "reward.png"),
]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(rows: list[dict], keys: list[str], title: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        last = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=0)
        for key in keys:
            xs, ys = _series(rows, key)
            if "/baseline_" in key:  # logged once before training: a reference line across the run
                if key.endswith("/avg") and ys:
                    style = "--" if "baseline_teacher" in key else ":"
                    ax.hlines(ys[0], 0, max(last, 1), linestyles=style, colors="C3" if style == "--" else "C2",
                              label=key)
                    drawn = True
            elif xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
                drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            png = io.BytesIO()
            fig.savefig(png, format="png")
            atomic_write_bytes(path, png.getvalue())
    finally:
        plt.close(fig)
    return drawn


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def write_report(output_dir: str | Path, summary: dict[str, Any], config_toml: str) -> Path:
    out = Path(output_dir)
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "teacher_kl" in r]
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    images = []
    for key, title, name in PLOTS:
        if _plot(train, [key], title, out / name):
            images.append(name)
    if eval_keys and _plot(rows, eval_keys, "evaluation", out / "eval.png"):
        images.append("eval.png")

    kl = [r["teacher_kl"] for r in train if r.get("teacher_kl") is not None]
    k = max(1, min(3, len(kl) // 2))
    lines = [f"# Run report: {out.name}", ""]
    lines += ["## Result", "", "| metric | start | end |", "|---|---|---|"]
    if kl:
        lines.append(f"| teacher_kl (mean of first/last {k} steps) | {_mean(kl[:k]):.4f} | {_mean(kl[-k:]):.4f} |")
    rew = [r["reward/mean"] for r in train if r.get("reward/mean") is not None]
    if rew:
        lines.append(f"| reward/mean (first/last {k} steps) | {_mean(rew[:k]):.3f} | {_mean(rew[-k:]):.3f} |")
    for key in eval_keys:
        xs, ys = _series(rows, key)
        if len(ys) > 1:  # a value logged once (the step-0 baselines) has no start and end: see the table below
            lines.append(f"| {key} (step {xs[0]} → {xs[-1]}) | {ys[0]:.3f} | {ys[-1]:.3f} |")
    for key in eval_keys:
        if key.endswith("/baseline_teacher/avg"):
            env = key.split("/")[1]
            start = next((r for r in rows if key in r), {})
            xs, ys = _series(rows, f"eval/{env}/avg")
            lines += ["", f"Before/after on held-out `{env}` prompts:", "",
                      "| student (start) | teacher (with its context) | student (end) |", "|---|---|---|",
                      f"| {start.get(f'eval/{env}/baseline_student/avg', float('nan')):.3f} | {start[key]:.3f} | "
                      f"{ys[-1] if ys else float('nan'):.3f} |"]
    cores = sorted({k.split("/")[2] for k in eval_keys if k.startswith("eval/core/") and k.endswith("/avg")})
    if cores:  # continual learning: how much of each core behaviour was kept ([orchestrator.continual])
        lines += ["", "Core behaviours (continual learning; delta < 0 is forgetting):", "",
                  "| core | start | end | delta_from_start |", "|---|---|---|---|"]
        for name in cores:
            _, ys = _series(rows, f"eval/core/{name}/avg")
            _, ds = _series(rows, f"eval/core/{name}/delta_from_start")
            lines.append(f"| {name} | {ys[0]:.3f} | {ys[-1]:.3f} | {ds[-1]:+.3f} |")
        cont = summary.get("continual", {})
        if cont.get("gate_failed"):
            lines.append(f"\nThe gate failed ({', '.join(f'{k} {v:+.3f}' for k, v in cont['regressions'].items())}); "
                         f"the final adapter is the restored step {cont['final_step']}.")
    lines += ["", *skips.report_lines(rows)]  # nothing left out in silence: every skip counter's total
    lines += ["## Time", "", f"- wall time: {summary.get('wall_seconds', float('nan')):.1f} s "
              f"for {len(train)} steps"]
    for role, secs in summary.get("role_seconds", {}).items():
        lines.append(f"- {role}: {secs:.1f} s busy")
    startup = next((r for r in rows if any(k.startswith("time/startup_") for k in r)), {})
    for key, v in startup.items():
        if key.startswith("time/startup_"):
            lines.append(f"- start-up of {key.removeprefix('time/startup_')}: {v:.1f} s")
    evals = [r["time/eval"] for r in rows if "time/eval" in r]
    if evals:
        lines.append(f"- evaluations: {sum(evals):.1f} s for {len(evals)}")
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    lines += ["", "## Config", "", "```toml", config_toml.strip(), "```", ""]
    return atomic_write_text(out / "report.md", redact_text("\n".join(lines)))


def console_table(output_dir: str | Path) -> str:
    """The report's result table, for the console."""
    text = (Path(output_dir) / "report.md").read_text(encoding="utf-8")
    block = text.split("## Result", 1)[1].split("##", 1)[0]
    return block.strip()
