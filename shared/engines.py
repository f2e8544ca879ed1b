"""Construction of a vLLM engine inside a role's actor process (student sampler or teacher scorer)."""

from __future__ import annotations

import os
from typing import Any


def cpu_threads() -> int:
    """The cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def engine_env(kv_cache_gib: int, cpu: bool = True) -> dict[str, str]:
    """Environment for an engine actor: in-process engine core (no orphan processes), CPU KV cache.

    A CPU engine (``cpu``: no GPU ids) gets every core as OpenMP threads: Ray sets ``OMP_NUM_THREADS=1`` in
    an actor that reserves no CPUs, as ours do, and vLLM's CPU worker takes its thread count from it, so an
    engine would run on one core (SmolLM2 on 2 cores: sampling 16 x 32 tokens takes 0.65x the time on both,
    scoring 0.57x; ``benchmarks/results/engine_threads_2026-12-02.md``)."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cpu:
        env["OMP_NUM_THREADS"] = str(cpu_threads())
    return {**env, **omp_env()}


def omp_env() -> dict[str, str]:
    """OpenMP's waiting policy for every role's actor: ``PASSIVE`` (a thread waiting for work sleeps at once
    instead of spinning), unless the user's environment sets one. The roles share the cores, each with every
    core's threads; spinning threads took the cores from the role that had work: on the tiny pair with one step
    of asynchrony, 1.3-1.5 s a step spinning against 0.35-0.44 s passive (``benchmarks/results/
    vs_trl_2026-12-02_engines.md`` against ``_passive.md``), with no loss on SmolLM2's sampling
    (``engine_threads_2026-12-02_passive.md``)."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def llm_kwargs(
    model_path: str,
    *,
    dtype: str,
    max_model_len: int,
    seed: int,
    tp: int = 1,
    enforce_eager: bool = True,
    gpu_memory_utilization: float = 0.85,
    lora_rank: int = 0,
    sleep: bool = False,
    gpu: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for an engine; ``gpu``: the actor sees a GPU (its
    ``CUDA_VISIBLE_DEVICES`` is set). ``lora_rank > 0`` enables LoRA (never for a scoring engine: the CPU path
    crashes on ``prompt_logprobs`` with LoRA enabled).

    ``sleep`` (an engine that shares a GPU with the trainer, ``ActorPlan.sleeps``) turns on vLLM's sleep mode
    (``enable_sleep_mode=True``: its weights and KV cache are allocated through vLLM's CuMem pool so that
    ``LLM.sleep(level=1)`` can copy the weights to CPU memory and free both, and ``LLM.wake_up()`` can map them
    back; checked in vLLM 0.32's ``vllm/entrypoints/llm.py``). vLLM offers it on CUDA and ROCm only and refuses
    it elsewhere ("Sleep mode is not supported on current platform"), so a CPU engine never asks for it."""
    kwargs: dict[str, Any] = dict(
        model=model_path,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        tensor_parallel_size=tp,
        enforce_eager=enforce_eager,
        disable_log_stats=True,
    )
    if gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if sleep:
            kwargs["enable_sleep_mode"] = True
    if lora_rank:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
    return kwargs


def make_llm(model_path: str, extra: dict[str, Any] | None = None, **kw: Any) -> Any:
    """A ``vllm.LLM`` from :func:`llm_kwargs` (``kw``) on the devices this process sees, plus ``extra``."""
    from vllm import LLM

    return LLM(**llm_kwargs(model_path, gpu=bool(os.environ.get("CUDA_VISIBLE_DEVICES")), **kw), **(extra or {}))


def make_llm_from_spec(model_path: str, spec: dict, lora_rank: int = 0, extra: dict[str, Any] | None = None) -> Any:
    """``make_llm`` from the spec dict the orchestrator sends each engine actor."""
    return make_llm(
        model_path,
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        seed=spec["seed"],
        tp=spec.get("tp", 1),
        enforce_eager=spec.get("enforce_eager", True),
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.85),
        lora_rank=lora_rank,
        sleep=spec.get("sleep", False),
        extra=extra,
    )


def sample(llm: Any, prompt_ids: list[list[int]], prompt_indices: list[int], n: int, temperature: float,
           top_p: float, max_tokens: int, seed: int, lora_request: Any = None) -> list:
    """``n`` completions per prompt with the sampler's log-prob of every sampled token.

    Each prompt gets its own seed (``seed + prompt index``), so a rerun samples the same rollouts. vLLM does
    not detokenize as it decodes (``detokenize=False``: its incremental detokenizer costs a few ms per engine
    step, a sixth of a tiny-pair generate); the texts are decoded once at the end by :func:`completion_texts`."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from shared.wire import Rollout

    params = [
        SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0, seed=seed + i,
                       detokenize=False)
        for i in prompt_indices
    ]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    texts = iter(completion_texts(llm.get_tokenizer(), [c for out in outputs for c in out.outputs]))
    rollouts = []
    for idx, ids, out in zip(prompt_indices, prompt_ids, outputs):
        for comp in out.outputs:
            toks = list(comp.token_ids)
            lps = [float(d[t].logprob) for t, d in zip(toks, comp.logprobs or [])]
            rollouts.append(Rollout(prompt_index=idx, prompt_ids=list(ids), completion_ids=toks, logprobs=lps,
                                    finish_reason=str(comp.finish_reason or ""), text=next(texts)))
    return rollouts


def completion_texts(tokenizer: Any, completions: list) -> list[str]:
    """The text vLLM's own detokenizer would give each completion (``CompletionOutput``), in one batched decode:
    special tokens skipped, and the token that stopped it (EOS or a stop token id: ``finish_reason == "stop"``
    with no stop string) left out, as vLLM 0.32's ``v1/engine/detokenizer.py`` does. Checked against vLLM's
    own texts in ``tests/test_e2e.py``."""
    ids = []
    for c in completions:
        toks = list(c.token_ids)
        if toks and c.finish_reason == "stop" and not isinstance(c.stop_reason, str):
            toks = toks[:-1]
        ids.append(toks)
    return tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []


LOGPROBS_FROM = "opd_logprobs_from"  # SamplingParams.extra_args key: index of the first token whose log-prob is read


def scoring_params(prompt_ids: list[list[int]], k: int) -> list:
    """One ``SamplingParams`` per prompt for scoring ``prompt + completion``: ``prompt_logprobs = k``, ids only
    (no detokenizing), and the completion's first index as ``extra_args[LOGPROBS_FROM]``, so the teacher's
    batched prompt log-probs (``teacher/prompt_logprobs.py``) compute no row for the prompt; an engine without
    them ignores the key."""
    from vllm import SamplingParams

    return [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False,
                           extra_args={LOGPROBS_FROM: len(p)}) for p in prompt_ids]


def completion_logprobs(llm: Any, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                        lora_request: Any = None) -> list[list[float]]:
    """Log-probs of the given completion tokens after each prompt (``prompt_logprobs`` of one pass over
    ``prompt + completion``; the prompt's own entries are dropped). A missing entry is NaN."""
    from vllm.inputs import TokensPrompt

    params = scoring_params(prompt_ids, 0)
    prompts = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompt_ids, completion_ids)]
    outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    result = []
    for p, c, out in zip(prompt_ids, completion_ids, outputs):
        entries = out.prompt_logprobs[len(p):]
        result.append([float(e[t].logprob) if e is not None else float("nan") for t, e in zip(c, entries)])
    return result


def completion_topk(llm: Any, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int,
                    ) -> tuple[list[list[float]], list[list[list[int]]], list[list[list[float]]]]:
    """:func:`completion_logprobs` plus the ``k`` most likely tokens at each completion position: per completion
    the token log-probs, the top-k ids and their log-probs (most likely first), from one ``prompt_logprobs = k``
    pass (vLLM adds the scored token when it is not among the top k; it is left out of the top k here).
    The log-probs are the model's own (vLLM's prompt log-probs are untempered in every ``logprobs_mode``)."""
    from vllm.inputs import TokensPrompt

    params = scoring_params(prompt_ids, k)
    prompts = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompt_ids, completion_ids)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    lps, ids, tops = [], [], []
    for p, c, out in zip(prompt_ids, completion_ids, outputs):
        entries = out.prompt_logprobs[len(p):]
        lps.append([float(e[t].logprob) if e is not None else float("nan") for t, e in zip(c, entries)])
        best = [sorted(e.items(), key=lambda kv: -kv[1].logprob)[:k] for e in entries]
        ids.append([[int(t) for t, _ in b] for b in best])
        tops.append([[float(x.logprob) for _, x in b] for b in best])
    return lps, ids, tops


SLEEP_LEVEL = 1  # level 1 keeps the weights (copied to CPU memory); level 2 would drop them, and the base
# weights (LoRA) or the last merged ones (merge) would have to be reloaded from disk every step


class Sleeps:
    """The ``sleep`` / ``wake_up`` actor methods of an engine (its ``self.llm``) that shares a GPU with the
    trainer: ``orchestrator/colocation.py`` puts it to sleep before the trainer steps and wakes it after, in the
    synchronous loop only (nothing is sampled meanwhile). vLLM 0.32: ``LLM.sleep(level=1)`` copies the weights
    to CPU memory and frees them and the KV cache (the prefix cache is cleared with it); ``LLM.wake_up()``
    maps both back (a fresh, empty KV cache). Only an engine started with ``enable_sleep_mode`` (GPUs) can."""

    llm: Any

    def sleep(self, level: int = SLEEP_LEVEL) -> None:
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()
