"""A trainer step's compute padded against packed (trainer/packing.py), on the main job's batch shape.

    python benchmarks/trainer_packing.py [--reps 3] [--budgets 1024,4096] [--out benchmarks/results/x.md]

The batch is the one ``experiments/context_distill/rl.toml`` trained on until 2026-12-02 (it now samples 16 x 1
x 32 tokens): 8 French-environment prompts in
SmolLM2-135M-Instruct's chat template x 4 completions sampled from the model itself (temperature 0.8,
at most 64 new tokens, seeded), SmolLM2-135M + LoRA r16 on q/k/v/o, float32, the job's trainer spec.  One
real trainer rank (FSDP2 over gloo, world size 1) runs ``TrainerRank.accumulate`` (forward, loss,
backward over every micro-batch of the step; no optimizer step, so every rep sees the same weights) on:

- ``padded``: ``trainer.micro_batch_size`` (8) sequences per micro-batch, right-padded;
- ``packed B``: micro-batches of at most B tokens, one row each, attention per sequence (segment SDPA);
- ``packed B, block mask``: the same rows attended through transformers' own block-diagonal mask (the
  row's ``N^2`` query-key pairs; ``cu_seq_lens`` withheld), to show what the segment attention saves.

The sides alternate within each rep (the order reversed every other rep), so load from other jobs hits
them alike; medians of wall and process CPU seconds are reported with the load average before and after,
and the largest difference of the loss terms between sides.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

JOB = Path(__file__).resolve().parents[1] / "experiments" / "context_distill" / "rl.toml"


def _samples(model_path: Path, cfg, seed: int) -> list:
    """The step's 32 sequences: 8 training prompts x 4 completions sampled by the plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.environments.questions import TRAIN
    from shared.wire import TrainSample

    tok = AutoTokenizer.from_pretrained(str(model_path))
    questions = random.Random(seed).sample(TRAIN, cfg.orchestrator.batch_size)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False).input_ids
               for q in questions]
    group = cfg.orchestrator.group_size
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    rows = [p for p in prompts for _ in range(group)]
    width = max(len(p) for p in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])  # left-padded for generation
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=cfg.inference.temperature,
                             top_p=1.0, top_k=0, max_new_tokens=cfg.inference.max_tokens, pad_token_id=pad)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for p, row in zip(rows, out[:, width:].tolist()):
        c = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
        adv = torch.randn(len(c), generator=g).tolist()
        samples.append(TrainSample(input_ids=p + c, prompt_len=len(p), inference_logprobs=[-1.0] * len(c),
                                   advantages=adv))
    return samples


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budgets", default="1024,4096", help="token budgets of the packed sides, comma-separated")
    ap.add_argument("--block-mask-budget", type=int, default=1024, help="budget of the block-mask side; 0 = none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="also write the table to this markdown file")
    ap.add_argument("--samples", default="", help="keep the sampled batch in this file and reuse it when it exists")
    args = ap.parse_args()

    import tempfile

    import torch
    import torch.distributed as dist

    from orchestrator.orchestrator import Orchestrator
    from shared.config import load
    from shared.fsutil import atomic_write_bytes, atomic_write_text
    from shared.models import resolve
    from shared.wire import TrainBatch, decode, encode
    from trainer import packing, worker
    from trainer.packing import micro_batch_count, plan_micro_batches

    load_before = os.getloadavg()
    cfg = load(["@", str(JOB)])
    spec = Orchestrator._trainer_spec(types.SimpleNamespace(cfg=cfg))  # the job's trainer spec, as the run sends it
    path = resolve(cfg.model.name, "model.name")
    t0 = time.perf_counter()
    if args.samples and Path(args.samples).exists():
        samples = decode(Path(args.samples).read_bytes(), TrainBatch).samples
    else:
        samples = _samples(path, cfg, args.seed)
        if args.samples:
            atomic_write_bytes(Path(args.samples), encode(TrainBatch(step=0, samples=samples, total_tokens=0)))
    gen_s = time.perf_counter() - t0
    lengths = [len(s.input_ids) for s in samples]
    completion = [len(s.input_ids) - s.prompt_len for s in samples]
    total = sum(completion)
    mbs = cfg.trainer.micro_batch_size

    def padded_tokens(n: int) -> int:
        return sum(len(c) * max(lengths[i] for i in c) for c in (list(range(len(samples)))[k::n] for k in range(n)))

    sides: dict[str, tuple[TrainBatch, bool, int]] = {}
    n_pad = micro_batch_count([lengths], mbs, 0)
    sides[f"padded, {mbs} sequences/micro-batch"] = (
        TrainBatch(step=1, samples=samples, total_tokens=total, num_micro_batches=n_pad), False, padded_tokens(n_pad))
    budgets = [int(b) for b in args.budgets.split(",") if b]
    for b in budgets:
        n = micro_batch_count([lengths], mbs, b)
        sides[f"packed, {b} tokens/micro-batch"] = (
            TrainBatch(step=1, samples=samples, total_tokens=total, num_micro_batches=n, micro_batch_tokens=b), False,
            sum(lengths))
    if args.block_mask_budget:
        b = args.block_mask_budget
        n = micro_batch_count([lengths], mbs, b)
        sides[f"packed, {b} tokens/micro-batch, block mask"] = (
            TrainBatch(step=1, samples=samples, total_tokens=total, num_micro_batches=n, micro_batch_tokens=b), True,
            sum(lengths))

    real_pack = packing.pack

    def block_mask_pack(chunk, device="cpu"):  # the same row without the segment bounds: transformers' mask
        mb = real_pack(chunk, device)
        kw = {k: v for k, v in mb.model_kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        return mb._replace(model_kwargs=kw)

    tmp = tempfile.mkdtemp(prefix="trainer_packing_")
    rank = worker.TrainerRank(0, 1, "gloo", f"tcp://127.0.0.1:{_port()}", str(path), spec, tmp, None)
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}  # process CPU seconds: less sensitive to other jobs
    totals: dict[str, dict[str, float]] = {}
    try:
        rank.setup()

        def run(name: str) -> tuple[float, float]:
            batch, block, _ = sides[name]
            worker.pack = block_mask_pack if block else real_pack
            rank.optimizer.zero_grad(set_to_none=True)
            t, c = time.perf_counter(), time.process_time()
            totals[name] = rank.accumulate(batch)
            return time.perf_counter() - t, time.process_time() - c

        run(next(iter(sides)))  # warm-up
        for rep in range(args.reps):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for name in order:
                wall, used = run(name)
                times[name].append(wall)
                cpu[name].append(used)
                print(f"rep {rep} {name}: {wall:.2f} s wall, {used:.2f} s CPU", flush=True)
    finally:
        worker.pack = real_pack
        dist.destroy_process_group()
    load_after = os.getloadavg()

    ref = totals[next(iter(sides))]
    diff = max(abs(t[k] - ref[k]) for t in totals.values() for k in ref)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    base, base_cpu = med[next(iter(sides))], med_cpu[next(iter(sides))]
    lines = [
        f"SmolLM2-135M + LoRA r16 (q/k/v/o), float32, one trainer rank (FSDP2/gloo), {torch.get_num_threads()} threads, "
        f"{platform.machine()}, {os.cpu_count()} cores, {args.reps} reps alternating, after one warm-up.",
        f"Batch of experiments/context_distill/rl.toml as of 2026-11 (8 x 4 x 64): {len(samples)} sequences (8 prompts x 4 completions sampled "
        f"by the model, temperature {cfg.inference.temperature}, max {cfg.inference.max_tokens} new tokens, seed "
        f"{args.seed}; sampling or reading took {gen_s:.0f} s): prompt lengths {min(s.prompt_len for s in samples)}-"
        f"{max(s.prompt_len for s in samples)}, completion lengths {min(completion)}-{max(completion)} "
        f"(mean {statistics.fmean(completion):.1f}), {sum(lengths)} real tokens, {total} completion tokens.",
        f"Load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, after "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}.",
        "",
        "| side | micro-batches | tokens through the model | median wall (s) | vs padded | median CPU (s) | "
        "vs padded | wall, all reps (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (batch, _, tokens) in sides.items():
        lines.append(f"| {name} | {batch.num_micro_batches} | {tokens} | {med[name]:.2f} | {med[name] / base:.2f} | "
                     f"{med_cpu[name]:.2f} | {med_cpu[name] / base_cpu:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in times[name])} |")
    lines.append("")
    lines.append(f"Largest difference of any summed loss metric between sides: {diff:.1e} (the same loss).")
    plans = {b: [sum(lengths[i] for i in c) for c in plan_micro_batches(lengths, b)] for b in budgets}
    lines.append(f"Packed rows (tokens each): {plans}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)


if __name__ == "__main__":
    main()
