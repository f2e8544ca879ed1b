"""The student sampler: a vLLM engine with LoRA, swapping in the trainer's newest adapter each step."""

from __future__ import annotations

import time
from pathlib import Path

from shared.engines import make_llm_from_spec, sample
from shared.runtime import ADAPTER_COMPLETE, redirect_output
from shared.wire import RolloutBatch, encode


class InferenceEngine:
    """Ray actor body. One per data-parallel rank; the orchestrator spreads prompts across them."""

    def __init__(self, model_path: str, spec: dict, log_path: str):
        redirect_output(log_path)
        t0 = time.perf_counter()
        self.llm = make_llm_from_spec(model_path, spec, lora_rank=spec["lora_rank"])
        self.start_seconds = time.perf_counter() - t0
        self.lora = None
        self.adapter_step = 0

    def ready(self) -> float:
        return self.start_seconds

    def load_adapter(self, path: str, step: int) -> None:
        """Serve ``path`` (a complete peft adapter) from now on, under a fresh LoRA id."""
        from vllm.lora.request import LoRARequest

        if not (Path(path) / ADAPTER_COMPLETE).exists():
            raise RuntimeError(f"adapter {path} is not complete (no {ADAPTER_COMPLETE} marker)")
        self.lora = LoRARequest(f"step_{step}", step + 1, path)
        self.adapter_step = step

    def generate(self, prompt_ids: list[list[int]], prompt_indices: list[int], n: int, temperature: float,
                 top_p: float, max_tokens: int, seed: int) -> bytes:
        rollouts = sample(self.llm, prompt_ids, prompt_indices, n, temperature, top_p, max_tokens, seed, self.lora)
        return encode(RolloutBatch(rollouts=rollouts, adapter_step=self.adapter_step))
