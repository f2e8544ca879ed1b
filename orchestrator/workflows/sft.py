"""SFT on teacher samples, i.e. off-policy distillation (``orchestrator.workflow = "sft"``).

The teacher, seeing its own view of each prompt (with any context), samples ``group_size`` completions;
the trainer fits each after the *student's* view of its prompt by NLL (``policy = False`` samples of weight 1;
the loss divides by their tokens). The student samples nothing, so nothing is scored and ``teacher_kl`` is NaN.
"""

from __future__ import annotations

from typing import Any

from orchestrator.workflows.base import StepSamples, Workflow
from shared.wire import Rollout, TrainSample


def sft_samples(prompt_ids: list[list[int]], rollouts: list[Rollout], base: int) -> list[TrainSample]:
    """Each teacher sample after the student's view of its prompt (``prompt_ids[r.prompt_index - base]``)."""
    return [TrainSample(input_ids=prompt_ids[r.prompt_index - base] + r.completion_ids,
                        prompt_len=len(prompt_ids[r.prompt_index - base]), inference_logprobs=[],
                        advantages=[], sft_weight=1.0, policy=False) for r in rollouts]


class SFT(Workflow):
    name = "sft"
    sampler = "teacher"
    scores_rollouts = False

    def samples(self, batch: Any, rollouts: list[Rollout], teacher_lp: list[list[float]]) -> StepSamples:
        nan = float("nan")  # the student sampled nothing for the teacher to score
        return StepSamples(samples=sft_samples(batch.prompt_ids, rollouts, batch.base),
                           lens=[len(r.completion_ids) for r in rollouts],
                           metrics={"teacher_kl": nan, "teacher_kl/seq": nan, "combined_advantage": 0.0,
                                    "teacher/logprob_clipped": 0.0, "time/reward": 0.0})

    def train_metrics(self, summed: dict[str, float]) -> dict[str, float]:
        return {"loss/sft": summed["loss/corrective"]}  # the trainer counts a non-policy sample's NLL there
