"""The teacher scorer: a LoRA-free vLLM engine returning log-probs of given completion tokens."""

from __future__ import annotations

import time

from shared.engines import Sleeps, completion_logprobs, completion_topk, make_llm_from_spec, sample
from shared.runtime import redirect_output
from teacher.prompt_logprobs import install
from shared.wire import RolloutBatch, ScoreRequest, ScoreResult, decode, encode


class TeacherEngine(Sleeps):
    """Ray actor body: ``score`` runs ``prompt + completion`` through the teacher with
    ``prompt_logprobs`` and keeps the entries of the completion tokens."""

    def __init__(self, model_path: str, spec: dict, log_path: str):
        redirect_output(log_path)
        t0 = time.perf_counter()
        # vLLM refuses prompt_logprobs above max_logprobs (20 by default): raised for trainer.loss.teacher_topk
        extra = {"max_logprobs": spec["max_logprobs"]} if spec.get("max_logprobs") else None
        self.llm = make_llm_from_spec(model_path, spec, extra=extra)
        self.prompt_logprobs = install(self.llm)  # "batched", or why vLLM's own loop is kept
        print(f"teacher prompt log-probs: {self.prompt_logprobs}", flush=True)
        self.start_seconds = time.perf_counter() - t0

    def ready(self) -> float:
        return self.start_seconds

    def score(self, request: bytes) -> bytes:
        req = decode(request, ScoreRequest)
        t0 = time.perf_counter()
        if req.topk:  # the top-k estimator (trainer/topk.py): the same pass also returns the top k
            lps, ids, tops = completion_topk(self.llm, req.prompt_ids, req.completion_ids, req.topk)
            return encode(ScoreResult(logprobs=lps, topk_ids=ids, topk_logprobs=tops, seconds=time.perf_counter() - t0))
        lps = completion_logprobs(self.llm, req.prompt_ids, req.completion_ids)
        return encode(ScoreResult(logprobs=lps, seconds=time.perf_counter() - t0))

    def generate(self, prompt_ids: list[list[int]], prompt_indices: list[int], n: int, temperature: float,
                 top_p: float, max_tokens: int, seed: int) -> bytes:
        """The teacher's own answers (baselines, judge replies, reference answers)."""
        t0 = time.perf_counter()
        rollouts = sample(self.llm, prompt_ids, prompt_indices, n, temperature, top_p, max_tokens, seed)
        return encode(RolloutBatch(rollouts=rollouts, seconds=time.perf_counter() - t0))
