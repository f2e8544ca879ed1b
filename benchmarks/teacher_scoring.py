"""The teacher's scoring call with vLLM's own prompt log-probs against ``teacher/prompt_logprobs.py``'s batched
ones over the completion only, alternated on one engine.

    python benchmarks/teacher_scoring.py [--setup tiny|smollm2|both] [--pairs 10] [--out benchmarks/results]

Each setup starts one teacher engine in this process, as the teacher actor does (``shared/engines.py``: the
same ``make_llm`` and environment), and scores one batch the size of a training step: the teacher's own
prompts, rendered from the experiment's environment exactly as a run renders them (with the teacher's
context), each followed by a completion of ``inference.max_tokens`` tokens drawn at random from the vocabulary
(the cost of a scoring call does not depend on which tokens they are). Then ``--pairs`` pairs of calls, one
with vLLM's own method and one with ours, in an order that alternates between pairs. Reports each side's
median seconds per call, the median of the per-pair ratios ours / vLLM's (with min–max), and the rows each
computes (ours: the completions' only). The two sides' log-probs are checked equal first. Writes
``teacher_scoring_<date>[tag].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_run import loadavg, machine, ratio_stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETUPS = {  # (label, TOML, overrides as rl takes them)
    "tiny": ("tiny pair: reverse_text, 32 prompts x 4 samples x 12 tokens", "experiments/reverse_text/rl.toml", ()),
    "smollm2": ("SmolLM2-135M: the main job's 16 prompts x 1 sample x 32 tokens, teacher context "
                "\"Answer in French.\"", "experiments/context_distill/rl.toml", ()),
}


def batch(toml: str, overrides: tuple[str, ...]) -> tuple[str, dict, list[list[int]], list[list[int]]]:
    """(teacher path, its engine spec, prompt ids, completion ids) of one training step of the experiment."""
    from transformers import AutoTokenizer

    from orchestrator.environments import make
    from orchestrator.prompts import Renderer
    from shared.config import load
    from shared.models import resolve

    cfg = load(["@", str(REPO / toml), *overrides])
    oc = cfg.orchestrator
    teacher = str(resolve(cfg.teacher.name, "teacher.name"))
    tok = AutoTokenizer.from_pretrained(str(resolve(cfg.model.name, "model.name")))
    render = Renderer(tok, cfg.model.chat_template, oc.teacher_model)
    prompts = [list(render.ids(p, teacher=True)) for p in make(cfg).next_prompts(oc.batch_size)
               for _ in range(oc.group_size)]
    rng = random.Random(cfg.seed)
    completions = [[rng.randrange(3, len(tok)) for _ in range(cfg.inference.max_tokens)] for _ in prompts]
    spec = {"dtype": cfg.teacher.dtype, "max_model_len": cfg.model.max_model_len, "seed": cfg.seed,
            "kv_cache_gib": cfg.inference.kv_cache_gib}
    return teacher, spec, prompts, completions


def measure(name: str, pairs: int) -> dict:
    from shared.engines import completion_logprobs, engine_env, make_llm
    from teacher import prompt_logprobs as tp

    label, toml, overrides = SETUPS[name]
    teacher, spec, prompts, completions = batch(toml, overrides)
    os.environ.update(engine_env(spec["kv_cache_gib"], cpu=True))
    llm = make_llm(teacher, dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=spec["seed"])
    own = completion_logprobs(llm, prompts, completions)  # also the first call's warm-up
    installed = tp.install(llm)
    if installed != "batched":
        raise SystemExit(f"error: {installed}")
    ours = completion_logprobs(llm, prompts, completions)
    if ours != own:
        raise SystemExit(f"error: {name}: the batched log-probs differ from vLLM's own")
    seconds: dict[str, list[float]] = {"own": [], "batched": []}
    loads = [loadavg()]
    for i in range(pairs):
        for side in (("own", "batched") if i % 2 == 0 else ("batched", "own")):
            llm.collective_rpc(tp.uninstall)
            if side == "batched":
                tp.install(llm)
            t0 = time.perf_counter()
            completion_logprobs(llm, prompts, completions)
            seconds[side].append(time.perf_counter() - t0)
        loads.append(loadavg())
    ratios = [b / o for o, b in zip(seconds["own"], seconds["batched"])]
    del llm
    return {"setup": name, "label": label, "sequences": len(prompts),
            "prompt_tokens": sum(map(len, prompts)), "completion_tokens": sum(map(len, completions)),
            "rows_own": sum(len(p) + len(c) - 1 for p, c in zip(prompts, completions)),
            "rows_batched": sum(map(len, completions)),
            "own_s": statistics.median(seconds["own"]), "batched_s": statistics.median(seconds["batched"]),
            "ratio": ratio_stats(ratios), "seconds": seconds, "load": [min(loads), max(loads)]}


def markdown(command: str, results: list[dict]) -> str:
    lines = [f"`{command}` — {machine()}.", "",
             "One teacher engine per setup, one training step's batch, pairs of scoring calls alternated "
             "(vLLM's own method, then ours, then ours, then vLLM's, ...); the log-probs were checked equal "
             "first. Ratio: ours / vLLM's, median (min–max) of the per-pair ratios.", "",
             "| setup | sequences | prompt + completion tokens | rows computed: vLLM's / ours | vLLM's own (ms) "
             "| batched, completion only (ms) | ratio | pairs | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        st = r["ratio"]
        lines.append(f"| {r['label']} | {r['sequences']} | {r['prompt_tokens']} + {r['completion_tokens']} | "
                     f"{r['rows_own']} / {r['rows_batched']} | {1000 * r['own_s']:.0f} | "
                     f"{1000 * r['batched_s']:.0f} | **{st['median']:.2f}** ({st['min']:.2f}–{st['max']:.2f}) | "
                     f"{st['n']} | {r['load'][0]:.1f}–{r['load'][1]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", choices=[*SETUPS, "both"], default="both")
    ap.add_argument("--pairs", type=int, default=10, help="pairs of calls per setup (default 10)")
    ap.add_argument("--tag", default="", help="suffix of the results' file names (a second run on one date)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--one", choices=list(SETUPS), help=argparse.SUPPRESS)  # a child process: one setup, JSON out
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.pairs)))
        return 0
    names = list(SETUPS) if args.setup == "both" else [args.setup]
    results = []
    for name in names:  # each engine in a process of its own (an in-process engine keeps torch's process group)
        print(f"{name}: {args.pairs} pairs (load {loadavg():.1f})", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--pairs", str(args.pairs)], cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"error: {name}: exit {proc.returncode}: {tail}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    command = "python benchmarks/teacher_scoring.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    stem = f"teacher_scoring_{time.strftime('%Y-%m-%d', time.gmtime())}{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text("# Teacher scoring: vLLM's prompt log-probs against batched, completion "
                                         "only\n\n" + markdown(command, results))
    (args.out / f"{stem}.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    print(f"wrote {args.out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
