"""The student sampler: a vLLM engine serving the trainer's newest LoRA adapter each step.

Two ways to serve it (``inference.lora_mode``): ``adapter`` loads it under a fresh ``LoRARequest`` id
(vLLM's LoRA kernels), ``merge`` writes ``W0 + scale * B @ A`` into the engine's weights
(``inference/merge.py``; no LoRA kernels, much faster decoding on the CPU).
"""

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
        self.mode = spec.get("lora_mode", "adapter")
        self.llm = make_llm_from_spec(model_path, spec, lora_rank=spec["lora_rank"] if self.mode == "adapter" else 0)
        self.merger = None
        if self.mode == "merge":
            import torch

            from inference.merge import Merger

            self.merger = Merger(model_path, torch.float32 if spec["dtype"] == "float32" else torch.bfloat16)
        self.start_seconds = time.perf_counter() - t0
        self.lora = None
        self.adapter_step = 0

    def ready(self) -> float:
        return self.start_seconds

    def load_adapter(self, path: str, step: int) -> None:
        """Serve ``path`` (a complete peft adapter) from now on: a fresh LoRA id, or merged weights."""
        from vllm.lora.request import LoRARequest

        if not (Path(path) / ADAPTER_COMPLETE).exists():
            raise RuntimeError(f"adapter {path} is not complete (no {ADAPTER_COMPLETE} marker)")
        if self.merger is not None:
            from inference.merge import set_linear_weights

            weights = self.merger.merged(path)
            self.llm.apply_model(lambda model: set_linear_weights(model, weights))
            self.llm.reset_prefix_cache()  # cached keys/values came from the previous weights
        else:
            self.lora = LoRARequest(f"step_{step}", step + 1, path)
        self.adapter_step = step

    def generate(self, prompt_ids: list[list[int]], prompt_indices: list[int], n: int, temperature: float,
                 top_p: float, max_tokens: int, seed: int) -> bytes:
        rollouts = sample(self.llm, prompt_ids, prompt_indices, n, temperature, top_p, max_tokens, seed, self.lora)
        return encode(RolloutBatch(rollouts=rollouts, adapter_step=self.adapter_step))
