"""Where a step's task reward comes from (``orchestrator.workflow``).

Every source has ``rewards(prompts, rollouts, base) -> (rewards, metrics)``: one reward per rollout
(the prompt of rollout ``r`` is ``prompts[r.prompt_index - base]``), where ``None`` means the rollout is
dropped from the step (counted by the source), and a dict of namespaced metrics for the step's row.

``distill`` (:class:`EnvReward`)
    The environment's verifiable score in [0, 1] (used only when ``trainer.loss.adv_tau``,
    ``lockin_coef`` or ``corrective_coef`` need it, and never with ``skip_verification``).
``judge`` (:class:`JudgeReward`, RLAIF)
    The teacher, through the teacher role's ``generate``, reads ``orchestrator.judge`` 's rubric for each
    ``(question, answer)`` (with the prompt's ground-truth answer, or ``target_spec``, as the reference)
    and replies; :func:`orchestrator.judge.judge_reward` turns the reply into +1/-1 (binary) or a graded
    reward in [-1, 1].  A reply without a verdict is counted (``judge/unparseable``) and becomes 0, -1 or
    a dropped rollout (``on_unparseable``).  With ``verdict = "loglik"`` the judge writes nothing: the
    teacher role scores the replies ``yes`` and ``no`` after the judge prompt and the likelier one (or,
    graded, ``2 P(yes) - 1``) is the reward (``judge/p_yes`` is the step's mean).  A judge prompt that
    does not fit ``model.max_model_len`` is counted (``judge/too_long``) and treated the same way.  The messages are rendered with the teacher
    tokenizer's chat template when it has one (and ``model.chat_template`` is not ``off``), else as plain
    text (the tiny pair).
``comparator`` (:class:`ComparatorReward`)
    The teacher's greedy answer to each prompt (with its context, generated once per prompt) is the
    reference; each student answer is compared with ``orchestrator.comparator`` (exact | bleu |
    semantic, ``reward_threshold``); correct -> ``reward_correct``, wrong -> ``reward_wrong``, and the
    prompts with a wrong answer are the ones whose teacher answer becomes a corrective supervised sample
    (``trainer.loss.corrective_coef``), reusing the reference already generated.

The teacher's generation is a callable given by the orchestrator (``generate(ids, max_tokens,
temperature) -> list[Rollout]`` in the order of ``ids``), so this module starts no engine.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.comparator import compare_batch, outcome_reward
from orchestrator.data import Prompt
from orchestrator.prompts import ChatIds
from orchestrator.judge import apply_unparseable, judge_messages, loglik_verdict, parse_verdict
from orchestrator.transfer import TransferTracker
from shared.config import Config
from shared.wire import TEACHER_FAILED, Rollout

Generate = Callable[[list[list[int]], int, float], list[Rollout]]
Score = Callable[[list[list[int]], list[list[int]]], list[list[float] | None]]  # teacher log-probs; None: failed
Rewards = tuple[list[float | None], dict[str, float]]


class RewardSource:
    """The environment's verifiable score; the base of the other sources."""

    name = "env"

    def __init__(self, score: Callable[[int, Prompt, str], float]):
        self.score = score  # score(batch-local prompt index, prompt, completion text)

    def rewards(self, prompts: Sequence[Prompt], rollouts: Sequence[Rollout], base: int) -> Rewards:
        return [self.score(r.prompt_index - base, prompts[r.prompt_index - base], r.text) for r in rollouts], {}

    def failed_prompts(self, groups: Sequence[int], rewards: Sequence[float]) -> list[int]:
        """Global indices of prompts with a failed rollout (r <= 0): the corrective step's targets."""
        return sorted({g for g, rw in zip(groups, rewards) if rw <= 0})

    def references(self) -> dict[int, Rollout]:
        """Teacher answers already generated this step, by global prompt index (reused as corrective targets)."""
        return {}


EnvReward = RewardSource


def render_messages(tokenizer: Any, messages: list[dict[str, str]], chat: bool) -> list[int]:
    """Token ids of chat ``messages``: the tokenizer's chat template (generation prompt added), or without
    one the contents joined by blank lines as plain text."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return ChatIds(tokenizer(text, add_special_tokens=False).input_ids, messages)
    return ChatIds(tokenizer("\n\n".join(m["content"] for m in messages)).input_ids, messages)


class JudgeReward(RewardSource):
    """The teacher as a reward model (see the module docstring)."""

    name = "judge"
    MIN_REPLY_TOKENS = 4  # a judge prompt leaving less room than this in max_model_len counts as too long

    def __init__(self, cfg: Config, render: Callable[[list[dict[str, str]]], list[int]], generate: Generate,
                 check: Callable[[int, Prompt, str], float] | None = None, score: Score | None = None,
                 options: tuple[list[int], list[int]] | None = None):
        self.jc = cfg.orchestrator.judge
        self.max_model_len = cfg.model.max_model_len
        self.render, self.generate, self.check = render, generate, check
        self.score, self.options = score, options  # verdict = loglik: the teacher's scorer, (yes ids, no ids)
        if self.jc.verdict == "loglik" and (score is None or not options or not all(options)):
            raise ValueError("verdict = loglik needs score() and the token ids of the yes and no replies")
        self.unparseable_total = 0

    def _replies(self, ids: list[list[int]], fits: list[int]) -> tuple[list[str], list[float | None], set[int]]:
        """The judge's reply text and parsed verdict per prompt (``verdict = reply``), and the indices whose
        request failed."""
        jc = self.jc
        replies, failed = [""] * len(ids), set()
        if fits:
            max_tokens = min(jc.max_tokens, self.max_model_len - max(len(ids[i]) for i in fits))
            for i, reply in zip(fits, self.generate([ids[i] for i in fits], max_tokens, jc.temperature)):
                replies[i] = reply.text
                if reply.finish_reason == TEACHER_FAILED:
                    failed.add(i)
        return replies, [parse_verdict(x, jc.mode, jc.scale_min, jc.scale_max) for x in replies], failed

    def _logliks(self, ids: list[list[int]], fits: list[int]) -> tuple[list[str], list[float | None], set[int]]:
        """``verdict = loglik``: one scoring pass of ``prompt + yes`` and ``prompt + no`` per fitting prompt."""
        yes, no = self.options
        replies, verdicts, failed = [""] * len(ids), [None] * len(ids), set()
        self.p_yes: list[float] = []
        if fits:
            scores = self.score([ids[i] for i in fits for _ in (0, 1)], [o for _ in fits for o in (yes, no)])
            for k, i in enumerate(fits):
                ly, ln = scores[2 * k], scores[2 * k + 1]
                if ly is None or ln is None:
                    failed.add(i)
                    continue
                ly, ln = sum(ly), sum(ln)
                verdicts[i] = loglik_verdict(ly, ln, self.jc.mode)
                if verdicts[i] is not None:
                    self.p_yes.append((loglik_verdict(ly, ln, "graded") + 1.0) / 2.0)
                    replies[i] = self.jc.yes if ly > ln else self.jc.no
        return replies, verdicts, failed

    def rewards(self, prompts: Sequence[Prompt], rollouts: Sequence[Rollout], base: int) -> Rewards:
        jc = self.jc
        ids = []
        for r in rollouts:
            p = prompts[r.prompt_index - base]
            ids.append(self.render(judge_messages(jc, p.text, r.text, p.answer)))
        loglik = jc.verdict == "loglik"
        room = self.max_model_len - (max(map(len, self.options)) if loglik else self.MIN_REPLY_TOKENS)
        fits = [i for i, x in enumerate(ids) if len(x) <= room]
        # failed: an external judge gave no reply (after retries): the rollout is dropped and counted
        replies, verdicts, failed = (self._logliks if loglik else self._replies)(ids, fits)
        rewards: list[float | None] = []
        unparseable = 0
        for i, v in enumerate(verdicts):
            reward, bad = (None, 0) if i in failed else apply_unparseable(v, jc.on_unparseable)
            rewards.append(reward)
            unparseable += bad
        self.unparseable_total += unparseable
        parsed = [v for v in verdicts if v is not None]
        n = max(len(rollouts), 1)
        metrics = {
            "judge/unparseable": float(unparseable),
            "judge/unparseable_frac": unparseable / n,
            "judge/unparseable_total": float(self.unparseable_total),
            "judge/too_long": float(len(rollouts) - len(fits)),
            "judge/teacher_failed": float(len(failed)),
            "judge/dropped": float(sum(1 for rw in rewards if rw is None)),
            "judge/reward_mean": statistics.fmean(parsed) if parsed else float("nan"),  # over parsed verdicts
            "judge/reply_len": statistics.fmean(len(x) for x in replies) if replies else 0.0,
        }
        if loglik:
            metrics["judge/p_yes"] = statistics.fmean(self.p_yes) if self.p_yes else float("nan")
        if self.check is not None:  # how often a parsed verdict agrees with the verifiable score
            agree = [(v > 0) == (self.check(r.prompt_index - base, prompts[r.prompt_index - base], r.text) > 0.5)
                     for r, v in zip(rollouts, verdicts) if v is not None]
            if agree:
                metrics["judge/agreement"] = statistics.fmean(float(a) for a in agree)
        return rewards, metrics


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


__all__ = ["ComparatorReward", "EnvReward", "JudgeReward", "RewardSource", "render_messages"]
