"""Teacher as judge (RLAIF, ``orchestrator.workflow = "judge"``): the reward of each rollout is the teacher's
verdict on it, through the on-policy loop of :class:`~orchestrator.workflows.base.PolicyWorkflow`.

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
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from orchestrator.data import Prompt
from orchestrator.judge import apply_unparseable, judge_messages, loglik_verdict, parse_verdict
from orchestrator.prompts import render_messages
from orchestrator.workflows.base import Generate, PolicyWorkflow, RewardSource, Rewards, Score
from shared.config import Config
from shared.wire import TEACHER_FAILED, Rollout


class JudgeReward(RewardSource):
    """The teacher as a reward model (see the module docstring)."""

    name = "judge"
    MIN_REPLY_TOKENS = 4  # a judge prompt leaving less room than this in max_model_len counts as too long

    def __init__(self, cfg: Config, render: Callable[[list[dict[str, str]]], list[int]], generate: Generate,
                 check: Callable[[Prompt, str], float] | None = None, score: Score | None = None,
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
        # loglik: prompt + option is scored in one pass that asks the engine for one output token (vLLM refuses
        # a prompt that fills max_model_len), so the pair must leave one position free
        room = self.max_model_len - (max(map(len, self.options)) + 1 if loglik else self.MIN_REPLY_TOKENS)
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
            truth = [self.check(prompts[r.prompt_index - base], r.text) > 0.5 for r in rollouts]
            if truth:  # the true (verifiable) accuracy of the rollouts the judge scored
                metrics["judge/check_mean"] = statistics.fmean(float(t) for t in truth)
            agree = [(v > 0) == t for t, v in zip(truth, verdicts) if v is not None]
            if agree:
                metrics["judge/agreement"] = statistics.fmean(float(a) for a in agree)
        return rewards, metrics


class Judge(PolicyWorkflow):
    name = "judge"

    def make_reward(self) -> RewardSource:
        from transformers import AutoTokenizer

        cfg, jc = self.cfg, self.cfg.orchestrator.judge
        tok = AutoTokenizer.from_pretrained(self.ctx.teacher_dir)
        chat = cfg.model.chat_template != "off"
        options = tuple(tok(w, add_special_tokens=False).input_ids for w in (jc.yes, jc.no)) \
            if jc.verdict == "loglik" else None
        return JudgeReward(cfg, lambda m: render_messages(tok, m, chat), self.ctx.generate, check=self.ctx.env_score,
                           score=self.ctx.score, options=options)
