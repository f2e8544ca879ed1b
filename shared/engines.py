"""Construction of a vLLM engine inside a role's actor process (student sampler or teacher scorer)."""

from __future__ import annotations

import os
from typing import Any


def engine_env(kv_cache_gib: int) -> dict[str, str]:
    """Environment for an engine actor: in-process engine core (no orphan processes), CPU KV cache."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def make_llm(
    model_path: str,
    *,
    dtype: str,
    max_model_len: int,
    seed: int,
    tp: int = 1,
    enforce_eager: bool = True,
    gpu_memory_utilization: float = 0.85,
    lora_rank: int = 0,
) -> Any:
    """A ``vllm.LLM``; ``lora_rank > 0`` enables LoRA (never for a scoring engine: the CPU path
    crashes on ``prompt_logprobs`` with LoRA enabled)."""
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=model_path,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        tensor_parallel_size=tp,
        enforce_eager=enforce_eager,
        disable_log_stats=True,
    )
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if lora_rank:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
    return LLM(**kwargs)
