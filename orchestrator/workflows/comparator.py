"""Answer comparator (``orchestrator.workflow = "comparator"``): question -> teacher answer -> student answer
-> comparison, with corrective training on the teacher's answer where the student was wrong.

``comparator`` (:class:`ComparatorReward`)
    The teacher's greedy answer to each prompt (with its context, generated once per prompt) is the
    reference; each student answer is compared with ``orchestrator.comparator`` (exact | bleu |
    semantic, ``reward_threshold``); correct -> ``reward_correct``, wrong -> ``reward_wrong``, and the
    prompts with a wrong answer are the ones whose teacher answer becomes a corrective supervised sample
    (``trainer.loss.corrective_coef``), reusing the reference already generated.

Questions come from ``orchestrator.comparator.question_source``: the environment (``generator``), the dataset,
or the teacher itself (orchestrator/question_sources.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.comparator import compare_batch, outcome_reward
from orchestrator.data import Prompt
from orchestrator.prompts import render_messages
from orchestrator.transfer import TransferTracker
from orchestrator.workflows.base import Generate, PolicyWorkflow, RewardSource, Rewards
from shared.config import Config
from shared.wire import TEACHER_FAILED, Rollout


class ComparatorReward(RewardSource):
    """Student answers against the teacher's greedy reference answers (see the module docstring)."""

    name = "comparator"

    def __init__(self, cfg: Config, teacher_ids: Callable[[Prompt], list[int]], generate: Generate,
                 param_ratio: float | None = None):
        self.cc = cfg.orchestrator.comparator
        self.max_tokens = cfg.inference.max_tokens
        self.teacher_ids, self.generate = teacher_ids, generate
        self.tracker = TransferTracker(param_ratio=param_ratio)
        self.refs: dict[int, Rollout] = {}
        self.wrong: list[int] = []

    def rewards(self, prompts: Sequence[Prompt], rollouts: Sequence[Rollout], base: int) -> Rewards:
        wanted = sorted({r.prompt_index for r in rollouts})
        refs = self.generate([self.teacher_ids(prompts[i - base]) for i in wanted], self.max_tokens, 0.0)
        self.refs = dict(zip(wanted, refs))  # this step's prompts only
        results = compare_batch(self.cc, [r.text for r in rollouts], [self.refs[r.prompt_index].text for r in rollouts])
        correct = [ok for _, ok in results]
        rewards: list[float | None] = [outcome_reward(self.cc, ok) for ok in correct]
        # An external teacher gave no reference (after retries): those rollouts are dropped and counted.
        failed = {i for i, ref in self.refs.items() if ref.finish_reason == TEACHER_FAILED}
        if failed:
            rewards = [None if r.prompt_index in failed else rw for r, rw in zip(rollouts, rewards)]
            correct = [ok for r, ok in zip(rollouts, correct) if r.prompt_index not in failed]
        kept = [r for r in rollouts if r.prompt_index not in failed]
        self.wrong = sorted({r.prompt_index for r, ok in zip(kept, correct) if not ok})
        metrics = self.tracker.update(correct, [rw for rw in rewards if rw is not None])
        metrics["comparator/score_mean"] = statistics.fmean(s for s, _ in results) if results else float("nan")
        metrics["comparator/wrong_prompts"] = float(len(self.wrong))
        metrics["comparator/reference_empty"] = float(sum(1 for x in refs if not x.completion_ids))
        metrics["comparator/teacher_failed"] = float(len(failed))
        return list(rewards), metrics

    def failed_prompts(self, groups: Sequence[int], rewards: Sequence[float]) -> list[int]:
        return [i for i in self.wrong if i in set(groups)]

    def references(self) -> dict[int, Rollout]:
        return self.refs


class Comparator(PolicyWorkflow):
    name = "comparator"

    def make_reward(self) -> RewardSource:
        from orchestrator.transfer import parameter_ratio

        return ComparatorReward(self.cfg, lambda p: self.ctx.render(p, True), self.ctx.generate,
                                parameter_ratio(self.ctx.student_dir, self.ctx.teacher_dir))

    def prompt_source(self, env: Any) -> Any:
        """The environment's prompts (``question_source = "generator"``), the dataset's, or the teacher's questions."""
        if self.cfg.orchestrator.comparator.question_source == "generator":
            return env
        from orchestrator.question_sources import make_question_source

        return make_question_source(self.cfg, self._question)

    def _question(self, messages: list[dict[str, str]]) -> str:
        """question_source = teacher: one teacher reply to the question request."""
        from transformers import AutoTokenizer

        cfg, cc = self.cfg, self.cfg.orchestrator.comparator
        if not hasattr(self, "_tok"):
            self._tok = AutoTokenizer.from_pretrained(self.ctx.teacher_dir)
        ids = render_messages(self._tok, messages, cfg.model.chat_template != "off")
        room = max(1, cfg.model.max_model_len - len(ids))
        return self.ctx.generate([ids], min(cc.question_max_tokens, room), cc.question_temperature)[0].text
