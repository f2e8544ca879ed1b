"""The workflow interface: what the loop asks of a workflow, and never branches around.

A workflow decides how one step's batch becomes training signal; the loop (orchestrator/orchestrator.py)
owns sampling, scoring, the trainer, the engines' weights, evaluation and checkpoints. What the loop asks:

``sampler``
    The role whose engines write the training completions: ``"inference"`` (the student, on-policy) or
    ``"teacher"`` (the teacher with its context: off-policy distillation). Those completions are sampled from
    that role's view of the prompt (``Batch.views``).
``scores_rollouts``
    Whether the student's rollouts go to the teacher for per-token log-probs (the reverse-KL term and the
    ``teacher_kl`` metric); the teacher backend may still decline when they would only be a metric.
``samples(batch, rollouts, teacher_lp) -> StepSamples``
    The step's training samples from its prompts, kept rollouts and their teacher log-probs, with the
    workflow's entries of the step's row.
``train_metrics(summed)``
    The workflow's entries computed from the trainer ranks' summed metrics.
``state()`` / ``restore(state)``
    What a checkpoint keeps of the workflow (counters, trackers).

:class:`PolicyWorkflow` is the on-policy family (distill, judge, comparator): per-token advantages
``A_t = adv_tau * A_task + teacher_tau * logp_T(t) - student_tau * logp_S(t)`` (trainer/loss.py) from a
reward source, lock-in weights on rewarded samples and corrective targets for failed prompts. A subclass
only supplies its reward source (:meth:`PolicyWorkflow.make_reward`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import msgspec
import torch

from orchestrator import checkpoint
from orchestrator.data import Prompt
from shared.config import Config
from shared.wire import Rollout, TrainSample
from shared.advantages import combined_advantages, group_advantages, sanitize_logprobs, subtract_baseline

Generate = Callable[[list[list[int]], int, float], list[Rollout]]  # (prompt ids, max_tokens, temperature)
Score = Callable[[list[list[int]], list[list[int]]], list[list[float] | None]]  # teacher log-probs; None: failed
Rewards = tuple[list[float | None], dict[str, float]]


class StepSamples(msgspec.Struct, kw_only=True):
    """What a step trains on, and what its row says about them."""

    samples: list[TrainSample]
    lens: list[int]  # completion tokens of each sampled rollout; their sum normalises every loss term
    metrics: dict[str, float]  # the workflow's entries of the step's row
    reward_metrics: dict[str, float] = msgspec.field(default_factory=dict)  # kept even when the step is skipped
    teacher_seconds: float = 0.0  # teacher time spent building the samples (judge, references, corrective answers)


class Context(msgspec.Struct, kw_only=True):
    """What a workflow may use: the run's config, the renderer (prompt -> ids for either view), the teacher's
    generation and scoring, the prompt source's scorer, and the model directories."""

    cfg: Config
    render: Callable[[Prompt, bool], list[int]]  # render(prompt, teacher_view)
    generate: Generate  # the teacher's answers, one per prompt (each call its own seeds)
    sample: Callable[[list[list[int]], int, int, float], list[Rollout]]  # (ids, first index, n, temperature)
    score: Score
    env_score: Callable[[Prompt, str], float]  # the environment that drew the prompt scores a completion
    student_dir: str
    teacher_dir: str


class RewardSource:
    """The environment's verifiable score (``Context.env_score``); the base of the other sources: ``rewards``
    gives one reward per rollout (``None``: dropped, counted by the source) and namespaced metrics."""

    name = "env"

    def __init__(self, score: Callable[[Prompt, str], float]):
        self.score = score

    def rewards(self, prompts: Sequence[Prompt], rollouts: Sequence[Rollout], base: int) -> Rewards:
        return [self.score(prompts[r.prompt_index - base], r.text) for r in rollouts], {}

    def failed_prompts(self, groups: Sequence[int], rewards: Sequence[float]) -> list[int]:
        """Global indices of prompts with a failed rollout (r <= 0): the corrective step's targets."""
        return sorted({g for g, rw in zip(groups, rewards) if rw <= 0})

    def references(self) -> dict[int, Rollout]:
        """Teacher answers already generated this step, by global prompt index (reused as corrective targets)."""
        return {}


class Workflow:
    """The interface (see the module docstring); a subclass is registered in ``orchestrator.workflows``."""

    name: ClassVar[str]
    sampler: ClassVar[str] = "inference"
    scores_rollouts: ClassVar[bool] = True

    def __init__(self, ctx: Context):
        self.ctx, self.cfg = ctx, ctx.cfg

    def prompt_source(self, env: Any) -> Any:
        """Where the training prompts come from: the environment, unless the workflow has its own source."""
        return env

    def samples(self, batch: Any, rollouts: list[Rollout], teacher_lp: list[list[float]]) -> StepSamples:
        raise NotImplementedError

    def train_metrics(self, summed: dict[str, float]) -> dict[str, float]:
        return {}

    def state(self) -> Any:
        return None

    def restore(self, state: Any) -> None:
        pass


class PolicyWorkflow(Workflow):
    """On-policy training on the student's rollouts (see the module docstring)."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.reward = self.make_reward()

    def make_reward(self) -> RewardSource:
        return RewardSource(self.ctx.env_score)

    def samples(self, batch: Any, rollouts: list[Rollout], teacher_lp: list[list[float]]) -> StepSamples:
        lc = self.cfg.trainer.loss
        prompts, base = batch.prompts, batch.base
        # rollouts of one prompt share prompt_index, the group of the task baseline
        t_reward = time.perf_counter()
        skip = self.cfg.orchestrator.skip_verification
        rewards, reward_metrics = ([], {}) if skip else self.reward.rewards(prompts, rollouts, base)
        keep = [i for i, rw in enumerate(rewards) if rw is not None]  # None: dropped (e.g. an unparseable verdict)
        if len(keep) < len(rewards):
            rollouts, teacher_lp, rewards = ([x[i] for i in keep] for x in (rollouts, teacher_lp, rewards))
        groups = [r.prompt_index for r in rollouts]
        t_reward = time.perf_counter() - t_reward
        a_task = group_advantages(rewards, groups, lc.reward_std_scale) if lc.adv_tau else [0.0] * len(rollouts)
        kls, advs, lens, clipped = [], [], [], 0
        for r, tlp, a in zip(rollouts, teacher_lp, a_task):
            t_lp, n_bad = sanitize_logprobs(torch.tensor(tlp, dtype=torch.float64), lc.logprob_floor)
            clipped += n_bad
            s_lp = torch.tensor(r.logprobs, dtype=torch.float64)
            kls.append(s_lp - t_lp)  # (T,) per-token reverse-KL terms
            advs.append(combined_advantages(s_lp, t_lp, a, lc.adv_tau, lc.teacher_tau, lc.student_tau, lc.kl_level,
                                            lc.kl_discount))
            lens.append(len(r.completion_ids))
        if lc.kl_baseline == "batch_mean":
            advs = subtract_baseline(advs)
        lockin = [lc.lockin_coef if rw > 0 else 0.0 for rw in rewards] or [0.0] * len(rollouts)
        samples = [
            TrainSample(input_ids=r.prompt_ids + r.completion_ids, prompt_len=len(r.prompt_ids),
                        inference_logprobs=r.logprobs, advantages=adv.tolist(), sft_weight=w,
                        topk_ids=r.teacher_topk_ids, topk_logprobs=r.teacher_topk_logprobs)  # top-k: trainer/topk.py
            for r, adv, w in zip(rollouts, advs, lockin)
        ]
        all_kl = torch.cat(kls) if kls else torch.zeros(1)
        metrics = {
            "teacher_kl": float(all_kl.mean()),
            "teacher_kl/seq": float(statistics.fmean(float(k.sum()) for k in kls)) if kls else 0.0,
            "combined_advantage": float((torch.cat(advs) if advs else torch.zeros(1)).mean()),
            "teacher/logprob_clipped": float(clipped),
            "time/reward": t_reward,
            **({"reward/mean": statistics.fmean(rewards)} if rewards else {}),  # absent with skip_verification
            **reward_metrics,
        }
        if lc.lockin_coef:
            metrics["lockin/samples"] = float(sum(1 for w in lockin if w))
        teacher_seconds = t_reward  # judge verdicts and reference answers are teacher time
        if lc.corrective_coef:
            t0 = time.perf_counter()
            corrective = self._corrective_samples(batch, groups, rewards)
            metrics["time/teacher_corrective"] = time.perf_counter() - t0
            metrics["corrective/samples"] = float(len(corrective))
            teacher_seconds += metrics["time/teacher_corrective"]
            samples += corrective
        return StepSamples(samples=samples, lens=lens, metrics=metrics, reward_metrics=reward_metrics,
                           teacher_seconds=teacher_seconds)

    def _corrective_samples(self, batch: Any, groups: list[int], rewards: list[float]) -> list[TrainSample]:
        """Supervised targets for failed prompts: the teacher's greedy answer (with its context) to each,
        reusing the references the reward source already generated."""
        base = batch.base
        failed = self.reward.failed_prompts(groups, rewards)
        answers = dict(self.reward.references())
        missing = [i for i in failed if i not in answers]
        if missing:
            for ans in self.ctx.sample([batch.teacher_ids[i - base] for i in missing], 0, 1, 0.0):
                answers[missing[ans.prompt_index]] = ans
        weight = self.cfg.trainer.loss.corrective_coef
        return [TrainSample(input_ids=batch.prompt_ids[i - base] + answers[i].completion_ids,
                            prompt_len=len(batch.prompt_ids[i - base]), inference_logprobs=[], advantages=[],
                            sft_weight=weight, policy=False)
                for i in failed if answers[i].completion_ids]

    def state(self) -> Any:
        return checkpoint.state_of(self.reward)

    def restore(self, state: Any) -> None:
        checkpoint.restore(self.reward, state)
