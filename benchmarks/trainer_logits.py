"""What skipping the prompt's logits saves in a trainer step (SmolLM2-135M-Instruct, LoRA, float32).

    python benchmarks/trainer_logits.py [--reps 3] [--batch 8] [--prompt 50] [--completion 60]

One micro-batch of the context-distillation shape (8 sequences of ~50 prompt + ~60 completion tokens)
goes through forward, the sampled tokens' log-probs (``trainer.loss.token_logprobs``) and backward,
once with logits at every position and once with ``logits_to_keep`` from the first completion
position, as ``trainer/worker.py`` does. The two variants alternate, so load from other jobs hits both
alike; the script reports the median seconds of each and their ratio, and checks that both give the
same completion log-probs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=50)
    ap.add_argument("--completion", type=int, default=60)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.models import resolve
    from trainer.loss import token_logprobs

    path = resolve("smollm2-135m-instruct", "model.name")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"], task_type="CAUSAL_LM"))
    length = args.prompt + args.completion
    ids = torch.randint(100, 40000, (args.batch, length))
    first = args.prompt - 1  # the position that predicts the first completion token

    def step(keep: int) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        logits = model(input_ids=ids, logits_to_keep=keep).logits[:, :-1]
        logp = token_logprobs(logits, ids[:, length - keep + 1:] if keep else ids[:, 1:])
        completion = logp[:, -(length - 1 - first):]
        completion.sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, completion.detach()

    times: dict[str, list[float]] = {"all positions": [], "completion only": []}
    step(0)  # warm-up
    for _ in range(args.reps):
        t, full = step(0)
        times["all positions"].append(t)
        t, part = step(length - first)
        times["completion only"].append(t)
    diff = float((full - part).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SmolLM2-135M + LoRA r16, float32, batch {args.batch} x ({args.prompt} prompt + {args.completion} "
          f"completion) tokens, {platform.machine()}, {torch.get_num_threads()} threads, {args.reps} reps")
    print("| logits computed at | median step (s) | all reps (s) |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    print(f"ratio completion-only / all: {med['completion only'] / med['all positions']:.2f}; "
          f"max |Δ logprob| {diff:.1e}")


if __name__ == "__main__":
    main()
