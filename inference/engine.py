"""The student sampler: a vLLM engine serving the trainer's newest LoRA adapter each step.

Two ways to serve it (``inference.lora_mode``): ``adapter`` loads it under a fresh ``LoRARequest`` id
(vLLM's LoRA kernels), ``merge`` writes ``W0 + scale * B @ A`` into the engine's weights
(``inference/merge.py``; no LoRA kernels, much faster decoding on the CPU); merged adapters arrive from
trainer rank 0's memory through Ray's object store (``trainer.weight_transfer = "memory"``, the default
there), not from ``broadcast/step_N``, which the trainer writes after the engines have the weights.  With
full fine-tuning (``trainer.finetune = "full"``) ``broadcast/step_N`` is a whole model, loaded in place
(``merge.load_model_dir``), or the weights arrive by NCCL broadcast from trainer rank 0
(``shared/weight_sync.py``, GPUs).

With a fixed answer set and ``orchestrator.env_args.answer_choice = "loglik"`` the engine scores the
allowed answers instead of decoding free text (``inference/answer_choice.py``).
"""

from __future__ import annotations

import time
from pathlib import Path

from shared.engines import Sleeps, completion_logprobs, make_llm_from_spec, sample
from shared.runtime import ADAPTER_COMPLETE, redirect_output
from shared.wire import Rollout, RolloutBatch, encode


class InferenceEngine(Sleeps):
    """Ray actor body. One per data-parallel rank; the orchestrator spreads prompts across them."""

    def __init__(self, model_path: str, spec: dict, log_path: str):
        redirect_output(log_path)
        t0 = time.perf_counter()
        self.mode = spec.get("lora_mode", "adapter")
        self.full = spec.get("finetune") == "full"  # full fine-tuning: broadcast/step_N is a whole model
        extra = None
        if spec.get("weight_transfer") == "nccl":
            from shared.weight_sync import engine_config

            extra = engine_config()
        if spec.get("logprobs_mode", "raw_logprobs") != "raw_logprobs":  # T != 1: log-probs of softmax(z / T)
            extra = {**(extra or {}), "logprobs_mode": spec["logprobs_mode"]}  # (shared/sampling.py)
        lora = self.mode == "adapter" and not self.full
        self.llm = make_llm_from_spec(model_path, spec, lora_rank=spec["lora_rank"] if lora else 0, extra=extra)
        self.merger = None
        if self.mode == "merge" and not self.full:
            import torch

            from inference.merge import Merger

            self.merger = Merger(model_path, torch.float32 if spec["dtype"] == "float32" else torch.bfloat16)
        self.start_seconds = time.perf_counter() - t0
        self.lora = None
        self.adapter_step = 0
        self.answers: list[str] = list(spec.get("answers") or []) if spec.get("answer_choice") == "loglik" else []
        if self.answers:
            from inference.answer_choice import answer_token_ids

            self.answer_ids = answer_token_ids(self.llm.get_tokenizer(), self.answers)

    def ready(self) -> float:
        return self.start_seconds

    def load_adapter(self, path: str, step: int) -> None:
        """Serve ``path`` (a complete peft adapter) from now on: a fresh LoRA id, or merged weights."""
        from vllm.lora.request import LoRARequest

        if not (Path(path) / ADAPTER_COMPLETE).exists():
            raise RuntimeError(f"adapter {path} is not complete (no {ADAPTER_COMPLETE} marker)")
        if self.full:
            from inference.merge import load_model_dir

            load_model_dir(self.llm, path)
        elif self.merger is not None:
            self._serve_merged(self.merger.merged(path))
        else:
            self.lora = LoRARequest(f"step_{step}", step + 1, path)
        self.adapter_step = step

    def load_adapter_tensors(self, payload: dict, step: int) -> None:
        """Serve the adapter trainer rank 0 sends from memory (``trainer.weight_transfer = "memory"``: Ray passes
        ``payload``, its :meth:`~trainer.worker.TrainerRank.adapter_payload`, from the object store; no file
        is read), merged into the weights as :meth:`load_adapter` does with a directory."""
        from inference.merge import lora_deltas
        from shared.adapter_payload import unpack

        if self.merger is None:
            raise RuntimeError('an adapter from memory is served merged; it needs inference.lora_mode = "merge"')
        self._serve_merged(self.merger.merged_deltas(lora_deltas(unpack(payload), payload["scale"], f"step {step}")))
        self.adapter_step = step

    def _serve_merged(self, weights: dict) -> None:
        """Write merged weights (``Merger``) into the engine's layers; its prefix cache goes with the old ones."""
        from inference.merge import set_linear_weights

        self.llm.apply_model(lambda model: set_linear_weights(model, weights))
        self.llm.reset_prefix_cache()  # cached keys/values came from the previous weights

    # -- NCCL weight transfer (shared/weight_sync.py; GPUs only) ------------------------------------------
    def node_address(self) -> str:
        from shared.weight_sync import node_address

        return node_address()

    def join_weight_group(self, init: dict) -> None:
        from shared.weight_sync import engine_join

        engine_join(self.llm, init)

    def receive_weights(self, info: dict, step: int) -> None:
        """Serve the weights trainer rank 0 broadcasts now (its ``send_weights`` runs concurrently)."""
        from shared.weight_sync import engine_receive

        engine_receive(self.llm, info)
        self.adapter_step = step

    def generate(self, prompt_ids: list[list[int]], prompt_indices: list[int], n: int, temperature: float,
                 top_p: float, max_tokens: int, seed: int) -> bytes:
        t0 = time.perf_counter()
        if self.answers:
            rollouts = self._choose_answers(prompt_ids, prompt_indices, n, temperature, seed)
        else:
            rollouts = sample(self.llm, prompt_ids, prompt_indices, n, temperature, top_p, max_tokens, seed, self.lora)
        return encode(RolloutBatch(rollouts=rollouts, adapter_step=self.adapter_step,
                                   seconds=time.perf_counter() - t0))

    def _choose_answers(self, prompt_ids: list[list[int]], prompt_indices: list[int], n: int, temperature: float,
                        seed: int) -> list[Rollout]:
        """``n`` answers per prompt drawn by the student's log-likelihood of each allowed answer."""
        from inference.answer_choice import draw_answers

        k = len(self.answer_ids)
        scores = completion_logprobs(self.llm, [p for p in prompt_ids for _ in range(k)],
                                     self.answer_ids * len(prompt_ids), self.lora)
        rollouts = []
        for j, (idx, ids) in enumerate(zip(prompt_indices, prompt_ids)):
            per_answer = scores[j * k:(j + 1) * k]
            for a in draw_answers([sum(lp) for lp in per_answer], n, temperature, seed + idx):
                rollouts.append(Rollout(prompt_index=idx, prompt_ids=list(ids), completion_ids=list(self.answer_ids[a]),
                                        logprobs=list(per_answer[a]), finish_reason="stop", text=self.answers[a]))
        return rollouts
