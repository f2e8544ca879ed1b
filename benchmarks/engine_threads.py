"""How many cores a CPU vLLM engine decodes and scores on: one OpenMP thread (what Ray gives an actor that
reserves no CPUs) against every core (what ``shared.engines.engine_env`` now sets).

    python benchmarks/engine_threads.py [--pairs 2] [--reps 3] [--out benchmarks/results/engine_threads_DATE.md]

Each side is a fresh process with ``OMP_NUM_THREADS`` set before vLLM is imported, as in an engine actor
(in-process engine core, eager mode, float32). It starts SmolLM2-135M-Instruct, does one warm-up call of
each kind, then times ``--reps`` calls of the main job's shapes: sampling 16 prompts x 32 tokens at
temperature 0.8 (``ignore_eos``: every completion has 32 tokens) and scoring those 16 prompts + completions
with ``prompt_logprobs`` (the teacher's call). Sides alternate within each pair (1 thread first in even
pairs), so load from other jobs hits both alike; the table gives every call's median per side and the ratio
of medians over pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r'''
import json, os, random, statistics, sys, time
sys.path.insert(0, sys.argv[1])
if __name__ == "__main__":
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from shared.engines import make_llm
    from shared.models import resolve
    import torch
    reps = int(sys.argv[2])
    llm = make_llm(str(resolve("smollm2-135m-instruct", "model.name")), dtype="float32", max_model_len=384, seed=0)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 20000) for _ in range(40)] for _ in range(16)]
    def sample():
        params = [SamplingParams(temperature=0.8, max_tokens=32, ignore_eos=True, logprobs=0, seed=i, detokenize=False)
                  for i in range(16)]
        out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in out]
    completions = sample()
    def score():
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        llm.generate([TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompts, completions)], params,
                     use_tqdm=False)
    score()
    times = {"sample": [], "score": []}
    for _ in range(reps):
        for name, fn in (("sample", sample), ("score", score)):
            t0 = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"threads": torch.get_num_threads(), **times}))
'''


def run_side(threads: int, reps: int) -> dict:
    from shared.engines import engine_env

    # an engine actor's environment, with the thread count under test in place of its own
    env = {**os.environ, **engine_env(2), "OMP_NUM_THREADS": str(threads), "VLLM_LOGGING_LEVEL": "ERROR"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(reps)], env=env, capture_output=True, text=True,
                       timeout=1200)
    if p.returncode != 0:
        raise SystemExit(f"error: the {threads}-thread side failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main(argv: list[str] | None = None) -> int:
    from shared.engines import cpu_threads, omp_env

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, help="markdown to write (default: print)")
    args = ap.parse_args(argv)
    cores = cpu_threads()
    if cores < 2:
        raise SystemExit("error: this machine lets the process use one core: nothing to compare")
    rows, ratios = [], {"sample": [], "score": []}
    loads = [os.getloadavg()[0]]
    for pair in range(args.pairs):
        order = (1, cores) if pair % 2 == 0 else (cores, 1)
        got = {}
        for threads in order:
            got[threads] = run_side(threads, args.reps)
            loads.append(os.getloadavg()[0])
            r = got[threads]
            rows.append(f"| {pair} | {threads} | {r['threads']} | {statistics.median(r['sample']):.2f} | "
                        f"{statistics.median(r['score']):.2f} | {', '.join(f'{t:.2f}' for t in r['sample'])} |")
            print(rows[-1], flush=True)
        for kind in ratios:
            ratios[kind].append(statistics.median(got[cores][kind]) / statistics.median(got[1][kind]))
    text = "\n".join([
        "# CPU engine threads: one against every core",
        "",
        f"`python benchmarks/engine_threads.py --pairs {args.pairs} --reps {args.reps}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {cores} cores, "
        f"load average (1 min) {min(loads):.2f}–{max(loads):.2f} over the run; "
        f"OMP_WAIT_POLICY={omp_env()['OMP_WAIT_POLICY']}.",
        "",
        "SmolLM2-135M-Instruct, float32, eager, in-process engine core. Sampling: 16 prompts of 40 tokens x 32 "
        "new tokens (temperature 0.8, every completion 32 tokens). Scoring: `prompt_logprobs` of the same 16 "
        "prompts + completions.",
        "",
        "| pair | OMP_NUM_THREADS | torch threads in the engine | sampling median (s) | scoring median (s) | "
        "sampling, every call (s) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Every core / one thread, median over pairs: sampling **{statistics.median(ratios['sample']):.2f}**, "
        f"scoring **{statistics.median(ratios['score']):.2f}** (per pair: sampling "
        f"{', '.join(f'{x:.2f}' for x in ratios['sample'])}; scoring {', '.join(f'{x:.2f}' for x in ratios['score'])}).",
        "",
    ])
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
